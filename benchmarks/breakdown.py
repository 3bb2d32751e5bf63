"""Where a DPO step of ours spends its time: data (collation), forward (decoder), loss (output layer
on completion positions and the DPO loss), backward, optimizer. The same rows as dpo_vs_trl.py, the
embedded model in fp32 by default; each phase is timed on its own and the last of ``--steps``
steps is printed with the matmul FLOPs each phase does and what fraction of the measured rate that
is.

    .venv/bin/python benchmarks/breakdown.py --pairs 4 --length 200
"""

from __future__ import annotations

import argparse
import time

import torch
from dpo_vs_trl import build_model, matmul_rate, rows

from criteriapo.config import OptimConfig
from criteriapo.data.records import PreferenceExample, RowRef
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions
from criteriapo.losses.dpo import LOSSES, LogPs, LossParams
from criteriapo.losses.logprobs import token_logps
from criteriapo.rows.packing import attention_mask
from criteriapo.rows.pairs import collate_pairs
from criteriapo.train.optim import build_optimizer
from criteriapo.train.scores import score_pairs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-packing", dest="packing", action="store_false")
    args = p.parse_args()
    model, tok = build_model(args.model, torch.float32, "cpu")
    chat = ChatTokenizer(tok)
    pairs = [
        chat.encode_pair(
            PreferenceExample(r["prompt"], r["chosen"], r["rejected"], RowRef("b", i)), TokenizeOptions(None)
        )
        for i, r in enumerate(rows(args.pairs, args.length))
    ]
    ref = score_pairs(model, pairs, tok.pad_token_id, args.pairs, packing=args.packing)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-6))
    loss_fn, params = LOSSES["sigmoid"].fn, LossParams(0.1, 0.0, 0.0)
    model.train()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    n_params = sum(x.numel() for x in model.parameters())
    b = len(pairs)
    for _ in range(args.steps):
        times = {}
        t = time.perf_counter()
        batch = collate_pairs(pairs, range(b), tok.pad_token_id, args.packing)
        if "segment" in batch:
            mask = attention_mask(batch["segment"], batch["branch"], "sdpa", torch.float32)
            position_ids = batch["position_ids"]
        else:
            mask, position_ids = batch["attention_mask"], None
        times["data"] = time.perf_counter() - t
        t = time.perf_counter()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids)
        hidden = hidden.last_hidden_state
        times["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        lp, _ = token_logps(hidden.flatten(0, 1)[batch["src"]], head.weight, batch["target"])
        logps = torch.zeros(2 * b).index_add(0, batch["seq"], lp)
        loss = loss_fn(LogPs(logps[:b], logps[b:], ref.chosen.logps, ref.rejected.logps), params).mean()
        times["loss"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        times["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - t
    rate = matmul_rate("cpu", torch.float32)
    computed = batch["input_ids"].numel()
    labels = batch["target"].numel()
    vocab, width = head.weight.shape
    body = (
        2 * (n_params - vocab * width) * computed
    )  # forward matmuls of the blocks (the embedding is a lookup)
    head_flops = 2 * vocab * width * labels
    flops = {
        "forward": body,
        "loss": head_flops,
        "backward": 2 * body + 2 * 2 * head_flops,  # twice the forward, plus the head's chunks recomputed
    }
    total = sum(times.values())
    tokens = int(batch["tokens"])
    print(
        f"{args.model}, {b} pairs, {tokens} chosen + rejected tokens, {computed} positions computed "
        f"({'packed' if args.packing else 'padded'}), {labels} labels; "
        f"fp32 matmul rate {rate / 1e9:.0f} GFLOP/s"
    )
    print("| phase | seconds | share | matmul GFLOP | of the matmul rate |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        f = flops.get(k)
        cells = [
            k,
            f"{v:.3f}",
            f"{v / total:.0%}",
            f"{f / 1e9:.0f}" if f else "-",
            f"{f / v / rate:.0%}" if f else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"| step | {total:.3f} | 100% | | tokens/s {tokens / total:.1f} |")


if __name__ == "__main__":
    main()
