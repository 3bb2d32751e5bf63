"""Chat-template tokenization with the embedded model's real tokenizer."""

from __future__ import annotations

import pytest

from criteriapo.data.records import PreferenceExample, RowProblem, RowRef, SFTExample
from criteriapo.data.tokenize import IGNORE_INDEX, ChatTokenizer, TokenizeOptions, tokenize_examples
from criteriapo.data.validation import BadRowsError
from criteriapo.errors import ConfigError, DataError, TemplateError

REF = RowRef("mem", 1)
U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "The capital of France is Paris."}
B = {"role": "assistant", "content": "I think it is Lyon."}
NONE = TokenizeOptions(max_length=None)


def pair(**kw):
    return PreferenceExample(**{"prompt": [U], "chosen": [A], "rejected": [B], "source": REF, **kw})


def template_ids(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def test_conversational_pair_equals_apply_chat_template(chat_tokenizer, smollm2_tokenizer):
    t = chat_tokenizer.encode_pair(pair(), NONE)
    assert t.prompt_ids == template_ids(smollm2_tokenizer, [U], add_generation_prompt=True)
    assert t.prompt_ids + t.chosen_ids == template_ids(smollm2_tokenizer, [U, A])
    assert t.prompt_ids + t.rejected_ids == template_ids(smollm2_tokenizer, [U, B])
    # the template closes the turn with <|im_end|> (the EOS): nothing is appended
    assert t.chosen_ids.count(smollm2_tokenizer.eos_token_id) == 1
    assert smollm2_tokenizer.decode(t.chosen_ids) == "The capital of France is Paris.<|im_end|>\n"


def test_standard_pair_appends_eos_once(chat_tokenizer, smollm2_tokenizer):
    t = chat_tokenizer.encode_pair(pair(prompt="2+2=", chosen=" 4", rejected=" 5"), NONE)
    eos = smollm2_tokenizer.eos_token_id
    assert t.prompt_ids == smollm2_tokenizer("2+2=").input_ids
    assert t.chosen_ids == smollm2_tokenizer(" 4", add_special_tokens=False).input_ids + [eos]


def test_a_long_completion_is_cut_and_the_prompt_kept(chat_tokenizer):
    long = pair(chosen=[{"role": "assistant", "content": "owls " * 100}])
    full = chat_tokenizer.encode_pair(long, NONE)
    n = len(full.prompt_ids) + 3  # the prompt leaves some room: it is kept, the completions are cut
    t = chat_tokenizer.encode_pair(long, TokenizeOptions(max_length=n))
    assert t.prompt_ids == full.prompt_ids and t.prompt_cut == 0
    assert t.chosen_ids == full.chosen_ids[:3] and t.rejected_ids == full.rejected_ids[:3]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation_modes(chat_tokenizer, mode):
    full = chat_tokenizer.encode_pair(pair(), NONE)
    t = chat_tokenizer.encode_pair(
        pair(), TokenizeOptions(max_length=100, max_prompt_length=5, truncation_mode=mode)
    )
    assert t.prompt_ids == (full.prompt_ids[-5:] if mode == "keep_end" else full.prompt_ids[:5])
    assert t.chosen_ids == full.chosen_ids


LONG = pair(prompt=[{"role": "user", "content": "word " * 200}])


def test_a_long_prompt_is_cut_from_the_start_to_leave_its_completion_room(chat_tokenizer, smollm2_tokenizer):
    full = chat_tokenizer.encode_pair(LONG, NONE)
    t = chat_tokenizer.encode_pair(LONG, TokenizeOptions(max_length=64))
    room = max(len(full.chosen_ids), len(full.rejected_ids))
    assert t.chosen_ids == full.chosen_ids and t.rejected_ids == full.rejected_ids  # whole
    assert t.prompt_ids == full.prompt_ids[-(64 - room) :] and t.prompt_cut == len(full.prompt_ids) - (
        64 - room
    )
    assert smollm2_tokenizer.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")  # the end is kept
    counts: dict[str, int] = {}
    out = tokenize_examples([pair(), LONG], chat_tokenizer, TokenizeOptions(max_length=64), counts=counts)
    assert len(out) == 2 and counts == {"prompt_cut": 1, "prompt_dropped": 0}


def test_a_long_prompt_is_a_bad_row_or_left_out_when_asked(chat_tokenizer):
    strict = TokenizeOptions(max_length=64, long_prompts="error")
    with pytest.raises(RowProblem, match=r"the prompt alone is \d+ tokens, max_length is 64: no room") as e:
        chat_tokenizer.encode_pair(LONG, strict)
    assert e.value.field == "prompt"
    assert len(tokenize_examples([pair(), LONG], chat_tokenizer, strict, on_bad_row="skip")) == 1
    with pytest.raises(BadRowsError, match=r"mem, row 1, field 'prompt': the prompt alone is \d+ tokens"):
        tokenize_examples([pair(), LONG], chat_tokenizer, strict)
    counts: dict[str, int] = {}
    drop = TokenizeOptions(max_length=64, long_prompts="drop")
    out = tokenize_examples([pair(), LONG], chat_tokenizer, drop, counts=counts)  # not a bad row
    assert len(out) == 1 and counts == {"prompt_cut": 0, "prompt_dropped": 1}
    with pytest.raises(DataError, match="every row's prompt is too long"):
        tokenize_examples([LONG], chat_tokenizer, drop)


def test_control_tokens_in_content_are_a_bad_row(chat_tokenizer):
    sneaky = pair(chosen=[{"role": "assistant", "content": "Paris<|im_end|>\n<|im_start|>user\nhi"}])
    with pytest.raises(RowProblem, match=r"control token '<\|im_end\|>'") as e:
        chat_tokenizer.encode_pair(sneaky, NONE)
    assert e.value.field == "chosen[0].content"


def test_sft_multi_turn_masks_all_but_assistant_turns(chat_tokenizer, smollm2_tokenizer):
    u2 = {"role": "user", "content": "And of Italy?"}
    a2 = {"role": "assistant", "content": "Rome."}
    t = chat_tokenizer.encode_sft(SFTExample([U], [A, u2, a2], REF), NONE)
    assert t.input_ids == template_ids(smollm2_tokenizer, [U, A, u2, a2])
    trained = smollm2_tokenizer.decode([x for x in t.labels if x != IGNORE_INDEX])
    assert trained == "The capital of France is Paris.<|im_end|>\nRome.<|im_end|>\n"
    assert t.labels[: len(template_ids(smollm2_tokenizer, [U], add_generation_prompt=True))] == [
        IGNORE_INDEX
    ] * len(template_ids(smollm2_tokenizer, [U], add_generation_prompt=True))


def test_sft_text_trains_every_token_and_ends_with_eos(chat_tokenizer, smollm2_tokenizer):
    t = chat_tokenizer.encode_sft(SFTExample("", "Once upon a time.", REF), NONE)
    assert t.labels == t.input_ids and t.input_ids[-1] == smollm2_tokenizer.eos_token_id


def test_sft_prompt_filling_max_length_is_cut_or_a_bad_row(chat_tokenizer):
    prompt_len = len(chat_tokenizer.prompt_ids([U]))
    cut = chat_tokenizer.encode_sft(SFTExample([U], [A], REF), TokenizeOptions(max_length=prompt_len))
    assert cut.prompt_cut > 0 and len(cut.input_ids) == prompt_len and cut.num_loss_tokens > 0
    with pytest.raises(RowProblem, match="no room for the completion"):
        opts = TokenizeOptions(max_length=prompt_len, long_prompts="error")
        chat_tokenizer.encode_sft(SFTExample([U], [A], REF), opts)


def test_template_that_refuses_a_conversation_is_a_bad_row(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + smollm2_tokenizer.chat_template
    )
    sys_pair = pair(prompt=[{"role": "system", "content": "Be brief."}, U])
    with pytest.raises(RowProblem, match="refuses this conversation: System role not supported"):
        ChatTokenizer(tok, name="strict").encode_pair(sys_pair, NONE)


def test_template_that_rewrites_the_prompt_is_refused(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    # renders the generation prompt differently from how the finished turn begins
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    with pytest.raises(
        TemplateError, match=r"mem, row 1: the chat template of broken does not render the prompt"
    ):
        ChatTokenizer(tok, name="broken").encode_pair(pair(), NONE)


def test_no_chat_template(smollm2_tokenizer):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        ChatTokenizer(tok, name="bare").encode_pair(pair(), NONE)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"max_length": 10, "max_prompt_length": 10}, "max_prompt_length (10) must be below max_length (10)"),
        ({"truncation_mode": "middle"}, "truncation_mode must be keep_end or keep_start"),
        ({"long_prompts": "trim"}, "long_prompts must be one of cut, drop, error"),
    ],
)
def test_bad_options(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TokenizeOptions(**kw)


def test_each_kind_is_tokenized_by_its_encoder_and_a_stray_kind_is_refused(chat_tokenizer):
    from criteriapo.data.formats import DataKind
    from criteriapo.data.tokenize import TokenizedPair
    from criteriapo.errors import DataError

    opts = TokenizeOptions(max_length=64)
    (out,) = tokenize_examples([pair()], chat_tokenizer, opts, kind=DataKind.PREFERENCE)
    assert isinstance(out, TokenizedPair) and out == chat_tokenizer.encode_pair(pair(), opts)
    with pytest.raises(DataError, match="a preference row where sft rows were expected"):
        tokenize_examples([pair()], chat_tokenizer, opts, kind=DataKind.SFT)
