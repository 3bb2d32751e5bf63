"""Continuous batching on a shared prefix: prompts that start with the chat template's fixed tokens
are computed from the prefix's cached keys and values on, and get the replies computed whole; the
fused batch (joining prompts computed in the running replies' forward) gives the replies made alone."""

from __future__ import annotations

import pytest

from criteriapo.generation import Sampling, generate_batch, prompt_ids
from criteriapo.generation.continuous import (
    FusedBatch,
    Request,
    RunningBatch,
    batch_maker,
    fused_agrees,
    supported,
    template_prefix,
)
from criteriapo.generation.ragged import RAGGED, Plan
from tests.zoo import ZOO, zoo_model

CONTINUOUS = sorted(a for a in ZOO if a not in {"mistral", "gemma2", "gemma3", "gemma3_text", "falcon_h1"})
CHATS = [  # of different lengths, so the padding sits between the prefix and the rest
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me three things about owls, and keep it short, please."}],
    [{"role": "user", "content": "Why?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],  # no prefix
    [{"role": "user", "content": "Name a colour, any colour at all."}],
]
ASKED = [
    Sampling(max_new_tokens=5),
    Sampling(max_new_tokens=9, temperature=1.0, seed=11),
    Sampling(max_new_tokens=6, temperature=1.0, seed=12),  # drawn together with the one above
    Sampling(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=20, seed=3),
    Sampling(max_new_tokens=8),
]


def _model(arch: str, tok):
    # weights larger than usual, so that a random model's replies depend on its prompt
    return zoo_model(arch, vocab_size=len(tok), initializer_range=0.5, init_std=0.5).eval()


def _run(batch: RunningBatch, requests: list[Request]) -> dict:
    """Two requests, two steps, then the rest joining the running batch, until all have ended."""
    done = dict(batch.add(requests[:2]))
    for _ in range(2):
        done.update(batch.step())
    done.update(batch.add(requests[2:]))
    while len(batch):
        done.update(batch.step())
    return done


def test_the_template_prefix_is_what_every_conversation_opening_with_a_user_renders_first(
    smollm2_tokenizer,
):
    tok = smollm2_tokenizer
    prefix = template_prefix(tok)
    text = tok.decode(prefix)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\n")
    starts = [prompt_ids(tok, c)[: len(prefix)] == prefix for c in CHATS]
    assert starts == [True, True, True, False, True]


@pytest.mark.parametrize("arch", CONTINUOUS)
def test_prompts_joining_on_the_shared_prefix_get_the_replies_computed_whole(arch, smollm2_tokenizer):
    """Greedy and seeded replies are exactly those computed whole (no prefix) and those generated
    alone: the prefix's copied keys and values, the padding after them, and the positions are right.
    A prompt without the prefix (a system message of its own, a plain text) joins whole."""
    tok = smollm2_tokenizer
    model = _model(arch, tok)
    assert supported(model)
    prompts = [prompt_ids(tok, c) for c in CHATS]
    prompts[2] = tok("Once upon a time, an owl")["input_ids"]  # a text prompt: no template at all
    requests = [Request(p, s, key=i) for i, (p, s) in enumerate(zip(prompts, ASKED, strict=True))]
    shared = RunningBatch(model, tok)
    assert len(shared.prefix) > 10
    assert sum(p[: len(shared.prefix)] == shared.prefix for p in prompts) == 3
    on_prefix = _run(shared, requests)
    whole = _run(RunningBatch(model, tok, prefix=()), requests)
    alone = [generate_batch(model, tok, [p], [s])[0] for p, s in zip(prompts, ASKED, strict=True)]
    assert [on_prefix[i] for i in range(5)] == [whole[i] for i in range(5)] == alone
    assert len({r.text for r in alone}) > 1, "the prompts gave one reply: the test could not fail"


@pytest.mark.parametrize("arch", CONTINUOUS)
def test_keys_and_values_computed_on_the_prefix_are_those_of_the_whole_prompt(arch, smollm2_tokenizer):
    """Every layer's cached keys and values of every real prompt token, computed on the prefix's,
    are those of the prompt computed whole, to float rounding (the replies' equality above is not
    luck of the argmax); only where the padding sits differs."""
    import torch

    tok = smollm2_tokenizer
    model = _model(arch, tok)
    requests = [Request(prompt_ids(tok, c), Sampling(max_new_tokens=2)) for c in CHATS[:3]]
    shared, whole = RunningBatch(model, tok), RunningBatch(model, tok, prefix=())
    for batch in (shared, whole):
        batch.add(requests)
        assert len(batch) == 3
    assert not torch.equal(shared.mask, whole.mask)  # the padding sits after the prefix
    for i in range(3):
        mine, theirs = shared.mask[i].bool(), whole.mask[i].bool()
        for a, b in zip(shared.cache.layers, whole.cache.layers, strict=True):
            torch.testing.assert_close(a.keys[i][:, mine], b.keys[i][:, theirs], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.values[i][:, mine], b.values[i][:, theirs], rtol=1e-4, atol=1e-5)


def test_a_repetition_penalty_is_applied_as_generate_applies_it(smollm2_tokenizer):
    """The model's own penalty, on each row's prompt and reply so far (rows of different lengths
    penalized together). Below 1 it favours seen tokens: a random model's replies, which repeat
    nothing by themselves, change with it."""
    tok = smollm2_tokenizer
    model = _model("llama", tok)
    prompts = [prompt_ids(tok, c) for c in CHATS]
    asked = [Sampling(max_new_tokens=12), *ASKED[1:]]
    requests = [Request(p, s, key=i) for i, (p, s) in enumerate(zip(prompts, asked, strict=True))]
    plain = _run(RunningBatch(model, tok), requests)
    model.generation_config.repetition_penalty = 0.3
    penalized = _run(RunningBatch(model, tok), requests)
    alone = [generate_batch(model, tok, [p], [s])[0] for p, s in zip(prompts, asked, strict=True)]
    assert [penalized[i] for i in range(5)] == alone
    assert any(penalized[i] != plain[i] for i in range(5)), "the penalty changed nothing: cannot fail"


FUSED = sorted(a for a in CONTINUOUS if a != "opt")  # OPT's forward asks its cache for its length


def _run_long(batch, requests: list[Request]) -> dict:
    """As :func:`_run` (rows leave at their own limits, the last ones moving into their slots), then
    two more requests joining the emptied batch."""
    done = _run(batch, requests[:-2])
    done.update(batch.add(requests[-2:]))
    while len(batch):
        done.update(batch.step())
    return done


@pytest.mark.parametrize("arch", FUSED)
def test_a_fused_batch_gives_each_reply_what_it_gets_alone(arch, smollm2_tokenizer):
    """Prompts computed in the running replies' forward pass (on the shared prefix or whole), rows
    leaving at their own limits and the last rows moving into their slots, slots growing past their
    first 64 tokens (a 70-token reply), two prompts joining an emptied batch: every greedy and seeded
    reply is the one generated alone."""
    tok = smollm2_tokenizer
    model = _model(arch, tok)
    prompts = [prompt_ids(tok, c) for c in CHATS] + [prompt_ids(tok, CHATS[1]), prompt_ids(tok, CHATS[0])]
    prompts[2] = tok("Once upon a time, an owl")["input_ids"]
    asked = [*ASKED, Sampling(max_new_tokens=70, temperature=1.0, seed=5), Sampling(max_new_tokens=3)]
    requests = [Request(p, s, key=i) for i, (p, s) in enumerate(zip(prompts, asked, strict=True))]
    batch = FusedBatch(model, tok)
    assert model.config._attn_implementation == RAGGED
    fused = _run_long(batch, requests)
    assert len(batch) == 0 and batch.cache.keys == []  # an idle batch let its slots go
    alone = [generate_batch(model, tok, [p], [s])[0] for p, s in zip(prompts, asked, strict=True)]
    assert [fused[i] for i in range(len(prompts))] == alone
    assert alone[5].tokens == 70 and len({r.text for r in alone}) > 3, "the test could not fail"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_fused_logits_agree_with_the_models_own_forward(arch, dtype, smollm2_tokenizer):
    import torch

    model = zoo_model(arch, vocab_size=len(smollm2_tokenizer)).to(getattr(torch, dtype)).eval()
    assert fused_agrees(model, smollm2_tokenizer)
    assert isinstance(batch_maker(model, smollm2_tokenizer, 4)(), FusedBatch)


def test_a_model_the_fused_batch_cannot_run_is_served_by_the_padded_batch(smollm2_tokenizer, caplog):
    """OPT's forward asks its cache for its length; an eager model's attention is not SDPA: both get
    :class:`RunningBatch`, OPT's reason is logged, and its replies are still those made alone."""
    tok = smollm2_tokenizer
    opt = zoo_model("opt", vocab_size=len(tok)).eval()
    with caplog.at_level("INFO"):
        assert not fused_agrees(opt, tok)
    assert "fused batching is off" in caplog.text and "get_seq_length" in caplog.text
    batch = batch_maker(opt, tok, 8)()
    assert isinstance(batch, RunningBatch)
    prompts = [prompt_ids(tok, c) for c in CHATS]
    requests = [Request(p, s, key=i) for i, (p, s) in enumerate(zip(prompts, ASKED, strict=True))]
    done = _run(batch, requests)  # still right after the fused path was tried on it
    assert [done[i] for i in range(5)] == [
        generate_batch(opt, tok, [p], [s])[0] for p, s in zip(prompts, ASKED, strict=True)
    ]
    eager = zoo_model("llama", vocab_size=len(tok), attn_implementation="eager").eval()
    assert isinstance(batch_maker(eager, tok, 4)(), RunningBatch)
    assert eager.config._attn_implementation == "eager"


def test_a_forward_whose_attention_never_sees_the_plan_is_refused(smollm2_tokenizer):
    """A model whose attention layers do not run on the plan (here: set back to eager attention after
    the batch was made) would compute from the slots as if they were one row: the step raises rather
    than draw from those logits."""
    tok = smollm2_tokenizer
    model = _model("llama", tok)
    batch = FusedBatch(model, tok)
    batch.add([Request(prompt_ids(tok, CHATS[0]), Sampling(max_new_tokens=4))])
    batch.step()
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError):
        batch.step()


def test_the_plan_counts_the_layers_that_ran_on_it():
    plan = Plan(decode=2, joins=[(2, 3)], past=[5, 7, 4], prefix=[2])
    assert plan.width == 8 and plan.positions() == [5, 7, 4, 5, 6] and plan.last() == [0, 1, 4]
    plan.layers = 3
    plan.check(3)
    with pytest.raises(RuntimeError, match="2 of the model's 3 attention layers"):
        Plan(decode=1, joins=[], past=[0], layers=2).check(3)
