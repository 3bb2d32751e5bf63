"""Batched generation says which replies the token limit cut off."""

from __future__ import annotations

import pytest

from criteriapo.generation import Sampling, generate_batch
from criteriapo.models import load_model, load_tokenizer
from tests.zoo import ZOO, zoo_model

HI = [{"role": "user", "content": "Hi"}]


def test_a_reply_is_cut_off_only_when_no_token_ended_it(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    greedy = Sampling(max_new_tokens=4)
    first = generate_batch(model, tok, [HI], greedy)[0]
    assert first.cut_off  # a random model does not end its turn within 4 tokens
    enc = tok.apply_chat_template([HI], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    next_token = int(model(**enc).logits[0, -1].argmax())
    model.generation_config.eos_token_id = next_token  # the first greedy token now ends the turn
    ended = generate_batch(model, tok, [HI, HI], greedy)
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
    greedy = Sampling(max_new_tokens=6)
    alone = generate_batch(model, smollm2_tokenizer, PROMPTS, greedy)
    shared = generate_batch(model, smollm2_tokenizer, PROMPTS, greedy, samples=3)
    assert shared == [r for r in alone for _ in range(3)]
    assert len({r.text for r in alone}) > 1, "the prompts gave one reply: the test could not fail"


def test_sampled_replies_of_one_prompt_differ_and_repeat_with_the_seed(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    hot = Sampling(max_new_tokens=8, temperature=1.0, seed=3)
    replies = generate_batch(model, tok, PROMPTS, hot, samples=4)
    assert len(replies) == 12
    assert len({r.text for r in replies[:4]}) > 1
    assert generate_batch(model, tok, PROMPTS, hot, samples=4) == replies


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
    generate_batch(model, tok, PROMPTS, Sampling(max_new_tokens=4, temperature=1.0), samples=2)
    generate(model, tok, PROMPTS[0], Sampling(max_new_tokens=4, temperature=1.0, seed=5))
    assert torch.equal(torch.rand(3), expected) and tok.padding_side == side
    hot = Sampling(max_new_tokens=6, temperature=1.0, seed=5)
    assert generate(model, tok, PROMPTS[1], hot) == generate(model, tok, PROMPTS[1], hot)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 50, 0.95), (0.7, 8, 0.8), (1.3, 0, 1.0)])
def test_the_sampler_draws_what_transformers_sampling_draws(temperature, top_k, top_p):
    """Its draws follow the distribution of transformers' own warpers (temperature, top-k, top-p),
    and it never draws a token those warpers remove."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from criteriapo.generation.sampler import Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 200, generator=g) * 2.5  # a peaked row: top-k and top-p both cut
    want = logits.clone()
    for warp in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None):
        want = warp(None, want) if warp else want
    want = TopPLogitsWarper(top_p)(None, want) if top_p < 1 else want
    p = want.softmax(-1)[0]
    n = 40_000
    sampler = Sampler(temperature, top_k, top_p, torch.Generator().manual_seed(1))
    rows = sampler(None, logits.expand(n, -1).clone())
    drawn = rows.argmax(-1)
    assert torch.isfinite(rows).sum(-1).eq(1).all()  # one finite entry per row: greedy emits it
    freq = torch.bincount(drawn, minlength=200).float() / n
    assert float(p[freq > 0].min()) > 0  # nothing outside what transformers keeps
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / n).sqrt().max()) + 1e-3
    again = Sampler(temperature, top_k, top_p, torch.Generator().manual_seed(1))(
        None, logits.expand(n, -1).clone()
    )
    assert torch.equal(again.argmax(-1), drawn)  # its own generator: the same seed draws the same


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": "7"}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_options_refuse_what_no_generation_could_do(given, named):
    from criteriapo.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        Sampling(**given)


def test_sampling_options_take_one_stop_string_or_several():
    assert Sampling(stop="\n\n").stop == ("\n\n",)
    assert Sampling(stop=["a", "b"]).stop == ("a", "b")


def test_streamed_text_never_shows_a_stop_string_or_half_a_character(smollm2_tokenizer):
    """Fed token by token, the text handed out is the final text: a stop string's start is held
    back until it is known not to be one, and a character whose bytes span tokens is shown whole."""
    from criteriapo.generation.replies import ReplyText

    tok = smollm2_tokenizer
    text = "Owls hunt at night. End of story: 🦉 owls END here"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids))), "no split character: cannot fail"
    row = ReplyText(tok, {tok.eos_token_id}, stop=("END",))
    pieces = [p for t in ids if (p := row.add(t))]
    assert "".join(pieces) == "Owls hunt at night. End of story: 🦉 owls " and row.finish == "stop"
    assert all("\ufffd" not in p for p in pieces)
    plain = ReplyText(tok, {tok.eos_token_id})
    shown = "".join(plain.add(t) for t in [*ids, tok.eos_token_id, *ids])  # after the end, nothing
    assert shown == text and plain.finish == "stop"
    cut = ReplyText(tok, {tok.eos_token_id}, stop=("ENDING",))
    shown = "".join(cut.add(t) for t in ids) + cut.end("length")
    assert shown == text and cut.finish == "length"  # "END" was held, then shown at the limit


def test_a_batch_stops_each_reply_at_its_stop_string_and_streams_what_it_returns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = zoo_model("llama", vocab_size=len(tok), initializer_range=0.5, init_std=0.5).eval()
    free = generate_batch(model, tok, PROMPTS, Sampling(max_new_tokens=12))
    assert all(r.cut_off for r in free)
    text = free[1].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # two characters the second reply says mid-way
    assert stop.strip(), f"no text to stop at in {text!r}"
    streamed: dict[int, str] = {}
    replies = generate_batch(
        model,
        tok,
        PROMPTS,
        Sampling(max_new_tokens=12, stop=(stop,)),
        on_text=lambda i, piece: streamed.__setitem__(i, streamed.get(i, "") + piece),
    )
    for before, after in zip(free, replies, strict=True):
        if stop in before.text:
            assert after.text == before.text[: before.text.index(stop)].strip()
            assert after.finish_reason == "stop" and not after.cut_off
        else:
            assert after == before
    assert any(stop in r.text for r in free)
    assert [streamed.get(i, "").strip() for i in range(len(PROMPTS))] == [r.text for r in replies]


def test_a_streamed_reply_can_be_stopped_from_another_thread(smollm2_tokenizer):
    import threading

    from criteriapo.generation import ReplyStream

    tok = smollm2_tokenizer
    model = zoo_model("llama", vocab_size=len(tok), initializer_range=0.5, init_std=0.5).eval()
    whole = ReplyStream(model, tok, PROMPTS[1], Sampling(max_new_tokens=10))
    pieces = list(whole)
    reply = whole.result()
    assert "".join(pieces).strip() == reply.text and reply.finish_reason == "length"
    stream = ReplyStream(model, tok, PROMPTS[1], Sampling(max_new_tokens=10_000))
    first = next(iter(stream))
    threading.Timer(0.2, stream.stop).start()
    rest = "".join(stream)
    stopped = stream.result()
    assert stopped.finish_reason == "interrupted" and (first + rest).strip() == stopped.text


def test_ctrl_c_while_a_piece_is_printed_stops_the_reply(smollm2_tokenizer):
    """The chat's printing loop: Ctrl-C landing while a piece is printed (not while the stream waits
    for the next one) stops the reply all the same, instead of printing it to its end."""
    from criteriapo.cli import _streamed
    from criteriapo.generation import ReplyStream

    tok = smollm2_tokenizer
    model = zoo_model("llama", vocab_size=len(tok), initializer_range=0.5, init_std=0.5).eval()
    printed: list[str] = []

    def out(piece: str, **_) -> None:
        printed.append(piece)
        if len(printed) == 1:
            raise KeyboardInterrupt  # as SIGINT's handler raises it in the main thread

    reply = _streamed(ReplyStream(model, tok, PROMPTS[1], Sampling(max_new_tokens=10_000)), out)
    assert reply.finish_reason == "interrupted"
    assert "".join(printed).strip() == reply.text


def test_requests_batched_together_each_get_the_reply_they_get_alone(smollm2_tokenizer):
    """Settings per prompt, as a server batches separate requests: each row samples with its own
    seed, temperature and limits and ends at its own stop strings, whatever shares its batch."""
    tok = smollm2_tokenizer
    model = zoo_model("llama", vocab_size=len(tok), initializer_range=0.5, init_std=0.5).eval()
    asked = [
        Sampling(max_new_tokens=5),
        Sampling(max_new_tokens=9, temperature=1.0, seed=11),
        Sampling(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=20, seed=3),
    ]
    together = generate_batch(model, tok, PROMPTS, asked)
    alone = [generate_batch(model, tok, [p], [s])[0] for p, s in zip(PROMPTS, asked, strict=True)]
    assert together == alone
    assert [r.tokens for r in together] == [5, 9, 7] and all(r.cut_off for r in together)
    other_seed = generate_batch(
        model, tok, PROMPTS[1:2], [Sampling(max_new_tokens=9, temperature=1.0, seed=12)]
    )
    assert other_seed[0].text != together[1].text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3", "olmo2"])
def test_replies_joining_and_leaving_a_running_batch_are_the_replies_made_alone(arch, smollm2_tokenizer):
    """Continuous batching: prompts that join between steps (their caches left-padded and stacked
    onto the batch's) and replies that leave at their own limits (the batch cut and its padding
    trimmed) give each reply exactly what it gets generated alone."""
    from criteriapo.generation import prompt_ids
    from criteriapo.generation.continuous import Request, RunningBatch, supported

    tok = smollm2_tokenizer
    model = zoo_model(arch, vocab_size=len(tok), initializer_range=0.5, init_std=0.5).eval()
    assert supported(model)
    more = [*PROMPTS, [{"role": "user", "content": "Name a colour, any colour at all."}]]
    asked = [
        Sampling(max_new_tokens=5),
        Sampling(max_new_tokens=9, temperature=1.0, seed=11),
        Sampling(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=20, seed=3),
        Sampling(max_new_tokens=8),
    ]
    requests = [
        Request(prompt_ids(tok, p), s, key=i) for i, (p, s) in enumerate(zip(more, asked, strict=True))
    ]
    batch = RunningBatch(model, tok)
    done = dict(batch.add(requests[:2]))
    for _ in range(2):
        done.update(batch.step())
    done.update(batch.add(requests[2:]))  # join a batch two tokens in
    sizes = []
    while len(batch):
        sizes.append(len(batch))
        done.update(batch.step())
    assert sizes[0] == 4 and sizes[-1] == 1  # all four ran together, and left one by one
    alone = [generate_batch(model, tok, [p], [s])[0] for p, s in zip(more, asked, strict=True)]
    assert [done[i] for i in range(4)] == alone


def test_a_sliding_window_model_is_not_batched_continuously(smollm2_tokenizer):
    from criteriapo.generation.continuous import supported

    assert not supported(zoo_model("mistral", vocab_size=len(smollm2_tokenizer)))
