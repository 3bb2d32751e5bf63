"""Batched generation says which replies the token limit cut off."""

from __future__ import annotations

from criteriapo.generation import generate_batch
from criteriapo.models import load_model, load_tokenizer

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
