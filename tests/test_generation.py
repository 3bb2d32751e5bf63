"""Batched generation says which replies the token limit cut off."""

from __future__ import annotations

import pytest

from criteriapo.generation import generate_batch
from criteriapo.models import load_model, load_tokenizer
from tests.zoo import ZOO, zoo_model

HI = [{"role": "user", "content": "Hi"}]


def test_a_reply_is_cut_off_only_when_no_token_ended_it(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    greedy = {"max_new_tokens": 4, "temperature": 0.0}
    first = generate_batch(model, tok, [HI], **greedy)[0]
    assert first.cut_off  # a random model does not end its turn within 4 tokens
    enc = tok.apply_chat_template([HI], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    next_token = int(model(**enc).logits[0, -1].argmax())
    model.generation_config.eos_token_id = next_token  # the first greedy token now ends the turn
    ended = generate_batch(model, tok, [HI, HI], **greedy)
    assert [r.cut_off for r in ended] == [False, False]


PROMPTS = [  # of different lengths, so the batch is left-padded
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me three things about owls, and keep it short, please."}],
    [{"role": "user", "content": "Why?"}],
]


@pytest.mark.parametrize("arch", sorted(set(ZOO) - {"gemma3"}))  # gemma3_text is its text model
def test_several_samples_per_prompt_reuse_the_prompt_and_change_no_reply(arch, smollm2_tokenizer):
    """Each prompt computed once and copied to its samples gives, greedily, exactly the replies of
    computing it once per sample: the cache copy and positions under left padding are right."""
    # weights larger than usual, so that a random model's replies depend on its prompt
    model = zoo_model(arch, vocab_size=len(smollm2_tokenizer), initializer_range=0.5, init_std=0.5).eval()
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "batch_size": 16}
    alone = generate_batch(model, smollm2_tokenizer, PROMPTS, **greedy)
    shared = generate_batch(model, smollm2_tokenizer, PROMPTS, samples=3, **greedy)
    assert shared == [r for r in alone for _ in range(3)]
    assert len({r.text for r in alone}) > 1, "the prompts gave one reply: the test could not fail"


def test_sampled_replies_of_one_prompt_differ_and_repeat_with_the_seed(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    hot = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "samples": 4, "seed": 3}
    replies = generate_batch(model, tok, PROMPTS, **hot)
    assert len(replies) == 12
    assert len({r.text for r in replies[:4]}) > 1
    assert generate_batch(model, tok, PROMPTS, **hot) == replies


def test_generation_leaves_the_process_rng_and_the_tokenizer_alone(tiny_llama_dir):
    """Sampling draws from a generator of the call's own, and left padding is built, not set on the
    tokenizer: anything long-running (a server, a trainer) can generate between its own steps."""
    import torch

    from criteriapo.generation import generate

    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    side = tok.padding_side
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_batch(model, tok, PROMPTS, max_new_tokens=4, temperature=1.0, samples=2)
    generate(model, tok, PROMPTS[0], max_new_tokens=4, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected) and tok.padding_side == side
    a = generate(model, tok, PROMPTS[1], max_new_tokens=6, temperature=1.0, seed=5)
    assert generate(model, tok, PROMPTS[1], max_new_tokens=6, temperature=1.0, seed=5) == a


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 50, 0.95), (0.7, 8, 0.8), (1.3, 0, 1.0)])
def test_the_sampler_draws_what_transformers_sampling_draws(temperature, top_k, top_p):
    """Its draws follow the distribution of transformers' own warpers (temperature, top-k, top-p),
    and it never draws a token those warpers remove."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from criteriapo.generation import _Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 200, generator=g) * 2.5  # a peaked row: top-k and top-p both cut
    want = logits.clone()
    for warp in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None):
        want = warp(None, want) if warp else want
    want = TopPLogitsWarper(top_p)(None, want) if top_p < 1 else want
    p = want.softmax(-1)[0]
    n = 40_000
    sampler = _Sampler(temperature, top_k, top_p, torch.Generator().manual_seed(1))
    rows = sampler(None, logits.expand(n, -1).clone())
    drawn = rows.argmax(-1)
    assert torch.isfinite(rows).sum(-1).eq(1).all()  # one finite entry per row: greedy emits it
    freq = torch.bincount(drawn, minlength=200).float() / n
    assert float(p[freq > 0].min()) > 0  # nothing outside what transformers keeps
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / n).sqrt().max()) + 1e-3
    again = _Sampler(temperature, top_k, top_p, torch.Generator().manual_seed(1))(
        None, logits.expand(n, -1).clone()
    )
    assert torch.equal(again.argmax(-1), drawn)  # its own generator: the same seed draws the same
