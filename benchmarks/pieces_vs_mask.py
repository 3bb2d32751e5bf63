"""Attention by pieces against the full packed mask, side by side in one process.

One pair of about ``L`` tokens per sequence (prompt about half) on the embedded model in fp32: a
forward and backward through ``batch_logps`` with the row's pieces, then the same with the full
mask only (the SDPA call the pieces replace), alternating; the first round is a warm-up.

    .venv/bin/python benchmarks/pieces_vs_mask.py            # 2048 and 4096 tokens, about 10 min
"""

from __future__ import annotations

import argparse
import time

import torch
from dpo_vs_trl import build_model, rows

from criteriapo.data.records import PreferenceExample, RowRef
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions
from criteriapo.losses import logprobs
from criteriapo.rows.pairs import collate_pairs
from criteriapo.train.allocator import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,4096")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of both, after a warm-up round")
    args = p.parse_args()
    keep_freed_memory()  # as training on a CPU does
    model, tok = build_model("smollm2", torch.float32, "cpu")
    chat = ChatTokenizer(tok)
    with_pieces = logprobs.use_pieces
    ways = {"pieces": with_pieces, "mask": lambda _model: False}  # without pieces: SDPA with the mask
    for length in map(int, args.lengths.split(",")):
        data = rows(1, length)[0]
        pair = chat.encode_pair(
            PreferenceExample(data["prompt"], data["chosen"], data["rejected"], RowRef("bench", 0)),
            TokenizeOptions(max_length=None),
        )
        batch = collate_pairs([pair], range(1), tok.pad_token_id, True)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(args.rounds + 1):
            for way, use in ways.items():
                logprobs.use_pieces = use
                t = time.perf_counter()
                logprobs.batch_logps(model, batch, 2).logps.sum().backward()
                if r:
                    times[way].append(time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
        logprobs.use_pieces = with_pieces
        piece, mask = (sum(times[w]) / args.rounds for w in ways)
        sizes = f"{len(pair.prompt_ids)}+{len(pair.chosen_ids)}+{len(pair.rejected_ids)}"
        print(f"{length} ({sizes} tokens): pieces {piece:.1f} s, full mask {mask:.1f} s; {mask / piece:.2f}x")


if __name__ == "__main__":
    main()
