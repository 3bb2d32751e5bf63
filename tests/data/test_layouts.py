"""Other tools' layouts read as they are written: LLaMA-Factory sharegpt and alpaca (SFT,
preference, KTO; role names, system prompts, histories), HH-RLHF text pairs, OpenAI preference
fine-tuning, UltraFeedback binarized and OpenAI chat JSONL; and every row of a file converted, with
the rows a layout cannot convert named by row and field."""

from __future__ import annotations

import json

import pytest

from criteriapo.data.loading import load_data, read_data
from criteriapo.data.records import PreferenceExample, SFTExample, UnpairedExample
from criteriapo.data.tokenize import TokenizeOptions, tokenize_examples
from criteriapo.data.validation import BadRowsError
from tests.helpers import train_dpo_briefly

SYSTEM = {"role": "system", "content": "Be brief."}
Q1 = {"role": "user", "content": "What is an owl?"}
A1 = {"role": "assistant", "content": "A bird of prey."}
Q2 = {"role": "user", "content": "Do they hunt at night?"}


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sharegpt_turns():
    return [
        {"from": "human", "value": Q1["content"]},
        {"from": "gpt", "value": A1["content"]},
        {"from": "human", "value": Q2["content"]},
    ]


def test_sharegpt_preference_rows_become_conversational_pairs(tmp_path):
    row = {
        "conversations": sharegpt_turns(),
        "system": "Be brief.",
        "chosen": {"from": "gpt", "value": "Yes, most do."},
        "rejected": {"from": "gpt", "value": "Owls are fish."},
    }
    data = read_data(write(tmp_path, [row] * 3))
    assert data.kind == "preference" and data.layout == "LLaMA-Factory sharegpt" and not data.bad_rows
    ex = data.examples[0]
    assert isinstance(ex, PreferenceExample)
    assert ex.prompt == [SYSTEM, Q1, A1, Q2]
    assert ex.chosen == [{"role": "assistant", "content": "Yes, most do."}]
    assert ex.rejected == [{"role": "assistant", "content": "Owls are fish."}]


def test_sharegpt_sft_and_kto_rows(tmp_path):
    turns = [*sharegpt_turns(), {"from": "gpt", "value": "Mostly."}]
    sft = read_data(write(tmp_path, [{"conversations": turns}], "sft.jsonl"))
    assert isinstance(sft.examples[0], SFTExample) and sft.examples[0].prompt == [Q1]
    kto = read_data(write(tmp_path, [{"messages": turns, "kto_tag": False}], "kto.jsonl"), kind="unpaired")
    ex = kto.examples[0]
    assert isinstance(ex, UnpairedExample) and ex.label is False and ex.prompt == [Q1, A1, Q2]
    tools = [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."},
    ]
    called = read_data(write(tmp_path, [{"conversations": tools}], "tools.jsonl")).examples[0]
    assert [m["role"] for m in called.prompt + called.completion] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]


def test_alpaca_rows_with_input_history_and_system(tmp_path):
    base = {
        "instruction": "Summarise:",
        "input": "Owls hunt at night.",
        "system": "Be brief.",
        "history": [["What is an owl?", "A bird of prey."]],
    }
    sft = read_data(write(tmp_path, [{**base, "output": "Night hunters."}], "a.jsonl")).examples[0]
    assert sft.prompt == [SYSTEM, Q1, A1, {"role": "user", "content": "Summarise:\nOwls hunt at night."}]
    assert sft.completion == [{"role": "assistant", "content": "Night hunters."}]
    pref = read_data(write(tmp_path, [{**base, "chosen": "Night hunters.", "rejected": "Fish."}], "p.jsonl"))
    assert pref.kind == "preference" and pref.examples[0].rejected == [
        {"role": "assistant", "content": "Fish."}
    ]
    old = read_data(write(tmp_path, [{"instruction": "Hi", "output": ["Hello!", "Go away."]}], "o.jsonl"))
    assert old.kind == "preference" and old.examples[0].chosen[0]["content"] == "Hello!"
    kto = read_data(
        write(tmp_path, [{"instruction": "Hi", "output": "Hello!", "kto_tag": True}], "k.jsonl"),
        kind="unpaired",
    )
    assert kto.examples[0].label is True


def test_hh_rlhf_text_pairs_split_into_turns(tmp_path):
    shared = "\n\nHuman: What is an owl?\n\nAssistant: A bird of prey.\n\nHuman: Do they hunt at night?"
    row = {
        "chosen": shared + "\n\nAssistant: Yes, most do.",
        "rejected": shared + "\n\nAssistant: Owls are fish.",
    }
    data = read_data(write(tmp_path, [row]))
    assert data.layout == "Anthropic HH-RLHF"
    ex = data.examples[0]
    assert ex.prompt == [Q1, A1, Q2] and ex.chosen == [{"role": "assistant", "content": "Yes, most do."}]
    bad = {"chosen": row["chosen"], "rejected": "\n\nHuman: Something else?\n\nAssistant: No."}
    data = read_data(write(tmp_path, [row, bad], "mixed.jsonl"))
    assert len(data.examples) == 1 and data.bad_rows[0].row == 2 and data.bad_rows[0].field == "rejected"
    assert "HH-RLHF layout" in data.bad_rows[0].reason


def test_openai_preference_and_chat_jsonl(tmp_path):
    row = {
        "input": {"messages": [Q1]},
        "preferred_output": [{"role": "assistant", "content": "A bird of prey."}],
        "non_preferred_output": [{"role": "assistant", "content": "A fish."}],
    }
    pref = read_data(write(tmp_path, [row], "pref.jsonl"))
    assert pref.layout == "OpenAI preference fine-tuning" and pref.examples[0].prompt == [Q1]
    chat = read_data(write(tmp_path, [{"messages": [SYSTEM, Q1, A1]}], "chat.jsonl"))
    assert chat.kind == "sft" and chat.layout is None and chat.examples[0].prompt == [SYSTEM, Q1]


def test_ultrafeedback_binarized_reads_as_it_is(tmp_path):
    row = {
        "prompt": Q1["content"],
        "prompt_id": "abc",
        "chosen": [Q1, {"role": "assistant", "content": "A bird of prey."}],
        "rejected": [Q1, {"role": "assistant", "content": "A fish."}],
        "messages": [Q1, {"role": "assistant", "content": "A bird of prey."}],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    data = read_data(write(tmp_path, [row]))
    assert data.kind == "preference" and data.examples[0].prompt == [Q1]


def test_a_real_sized_sharegpt_file_loads_and_tokenizes_every_row(tmp_path, chat_tokenizer):
    rows = [
        {
            "conversations": [{"from": "human", "value": f"Question {i}: " + "why? " * (i % 50)}],
            "chosen": {"from": "gpt", "value": f"A good answer {i}."},
            "rejected": {"from": "gpt", "value": f"A bad answer {i}."},
        }
        for i in range(300)
    ]
    data = load_data(write(tmp_path, rows))
    counts: dict[str, int] = {}
    out = tokenize_examples(data.examples, chat_tokenizer, TokenizeOptions(max_length=96), counts=counts)
    assert len(out) == 300 and counts["prompt_cut"] > 0  # the long prompts kept, cut from the start


def test_rows_a_layout_cannot_convert_are_named_once_by_kind(tmp_path):
    good = {
        "conversations": sharegpt_turns(),
        "chosen": {"from": "gpt", "value": "Yes."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    odd = {**good, "conversations": [{"from": "narrator", "value": "Once"}]}
    with pytest.raises(BadRowsError) as e:
        load_data(write(tmp_path, [good] * 3 + [odd] * 4))
    message = str(e.value)
    assert "4 of 7 rows cannot be used" in message
    assert "4 rows (4, 5, 6, 7), field 'conversations[0].from': unknown speaker 'narrator'" in message
    assert message.count("unknown speaker") == 1


@pytest.mark.parametrize("layout", ["sharegpt", "hh-rlhf"])
def test_dpo_trains_on_another_tools_file_as_it_is(layout, tmp_path, tiny_llama_dir, capsys):
    """The files as their tools write them, named in the config, no conversion step."""
    if layout == "sharegpt":
        rows = [
            {
                "conversations": [{"from": "human", "value": f"Tell me about owls, part {i}."}],
                "system": "Be brief.",
                "chosen": {"from": "gpt", "value": f"Owls hunt at night ({i})."},
                "rejected": {"from": "gpt", "value": f"Owls are fish ({i})."},
            }
            for i in range(6)
        ]
    else:
        rows = [
            {
                "chosen": f"\n\nHuman: Tell me about owls, part {i}.\n\nAssistant: Owls hunt at night.",
                "rejected": f"\n\nHuman: Tell me about owls, part {i}.\n\nAssistant: Owls are fish.",
            }
            for i in range(6)
        ]
    out = tmp_path / "run"
    assert train_dpo_briefly(tiny_llama_dir, str(write(tmp_path, rows)), out) == 0, capsys.readouterr().err
    assert (out / "dpo" / "model" / "model.safetensors").exists()
