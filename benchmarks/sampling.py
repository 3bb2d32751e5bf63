"""Sampling speed of the criteria data maker: several replies per prompt, each prompt computed once
and copied to its samples (``samples=k``) against one round per sample, at two batch sizes, and our
sampler (the exponential race over the top 50 tokens) against transformers' own (``do_sample``:
top-k, a top-p sort over the vocabulary, ``torch.multinomial``); the same prompts, model and
settings, alternating in one process. Prints replies per second.

    .venv/bin/python benchmarks/sampling.py --model runs/smollm2-pipeline/sft/model --prompts 64

With fewer prompts than the batch, a round per sample decodes smaller batches than the shared
prompt does: keep ``--prompts`` at 64 or more for a fair comparison.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from criteriapo.criteria.maker import draw_prompts
from criteriapo.generation import Sampling, generate_batch
from criteriapo.generation.batch import _prefilled
from criteriapo.models import load_model, load_tokenizer, resolve_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--larger", action="store_true", help="also the shared prompt at batch 128")
    args = p.parse_args()
    source = resolve_model(args.model)
    model, tok = load_model(source.path), load_tokenizer(source.path)
    convs = [[{"role": "user", "content": d.text}] for d in draw_prompts(args.prompts, 5, 0.2)]
    hot = Sampling(max_new_tokens=64, temperature=1.0, top_p=0.95)
    k = args.samples

    def per_round(batch: int) -> int:
        return sum(
            len(generate_batch(model, tok, convs, replace(hot, seed=s), batch_size=batch)) for s in range(k)
        )

    def shared(batch: int) -> int:
        return len(generate_batch(model, tok, convs, hot, samples=k, batch_size=batch))

    def transformers_sampler(batch: int) -> int:
        """The shared prompt, as generate_batch does it, but sampled by transformers' do_sample."""
        import torch

        side, tok.padding_side = tok.padding_side, "left"
        n, per = 0, batch // k
        for start in range(0, len(convs), per):
            enc = tok.apply_chat_template(
                convs[start : start + per],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
                padding=True,
            )
            torch.manual_seed(start)
            with torch.inference_mode():
                out = model.generate(
                    **_prefilled(model, enc, k),
                    max_new_tokens=64,
                    pad_token_id=tok.pad_token_id,
                    do_sample=True,
                    temperature=1.0,
                    top_p=0.95,
                    top_k=50,
                )
            n += out.shape[0]
        tok.padding_side = side
        return n

    ways = [("one round per sample, batch 64", per_round, 64), ("prompt shared, batch 64", shared, 64)]
    ways += [("prompt shared, transformers' sampler, batch 64", transformers_sampler, 64)]
    ways += [("prompt shared, batch 128", shared, 128)] if args.larger else []
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, way, batch in ways:
            t = time.perf_counter()
            n = way(batch)
            rate = n / (time.perf_counter() - t)
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {r}: {name}: {rate:.2f} replies/s", flush=True)
    base = best[ways[0][0]]
    print(f"\n{args.prompts} prompts x {k} samples, 64 new tokens, {source.spec}:")
    for name, rate in best.items():
        print(f"  {name}: {rate:.2f} replies/s ({rate / base:.2f}x)")


if __name__ == "__main__":
    main()
