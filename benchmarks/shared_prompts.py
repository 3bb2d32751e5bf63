"""DPO training speed with a prompt's pairs in one batch (``train.share_prompts``: the prompt and the
replies its pairs share computed once) against pairs shuffled one by one; the same model, pairs
(finegrained pairs of the made criteria data, as the main job trains on), batch and number of
steps, alternating in one process. Prints pairs per second and the positions each computes.

    .venv/bin/python benchmarks/shared_prompts.py --model runs/smollm2-pipeline/sft/model \\
        --data ~/.cache/criteriapo/data/criteria-*/train.jsonl --steps 8
"""

from __future__ import annotations

import argparse
import time

import torch

from criteriapo.config import DPOConfig, OptimConfig, TrainConfig
from criteriapo.criteria.pairs import build_finegrained
from criteriapo.data.loading import load_data
from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions, tokenize_examples
from criteriapo.models import load_model, load_tokenizer, resolve_model
from criteriapo.models.training import disable_dropout
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.loop import Trainer
from criteriapo.train.scores import score_pairs
from criteriapo.train.tasks import DPOTask


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", required=True, help="multi-criteria JSONL (the made criteria data)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    source = resolve_model(args.model)
    tok = load_tokenizer(source.path)
    examples = load_data(args.data, kind="multi_criteria", on_bad_row="skip").examples
    pairs = tokenize_examples(
        build_finegrained(examples), ChatTokenizer(tok), TokenizeOptions(320), on_bad_row="skip"
    )
    model = load_model(source.path)
    disable_dropout(model)
    reference = score_pairs(model, pairs, tok.pad_token_id, args.batch)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    best: dict[str, tuple[float, float, float]] = {}
    for r in range(args.rounds):
        for share in (False, True):
            model.load_state_dict(start)
            task = DPOTask(DPOConfig(rpo_alpha=1.0), tok.pad_token_id, len(tok), reference=reference)
            train = TrainConfig(batch_size=args.batch, share_prompts=share, seed=r)
            trainer = Trainer(model, task, pairs, OptimConfig(lr=2e-5), train, Loggers([]))
            positions = 0
            t = time.perf_counter()
            for _ in range(args.steps):
                indices = trainer.order.next_batch(args.batch)
                positions += int(task.collate([pairs[i] for i in indices], indices)["input_ids"].numel())
                trainer.train_step(indices)
            seconds = time.perf_counter() - t
            name = "a prompt's pairs together" if share else "pairs shuffled one by one"
            rate = args.steps * args.batch / seconds
            print(f"round {r}: {name}: {rate:.2f} pairs/s, {positions} positions", flush=True)
            if rate > best.get(name, (0.0, 0, 0))[0]:
                best[name] = (rate, positions, seconds)
    print(f"\n{len(pairs)} finegrained pairs, batch {args.batch}, {args.steps} steps, {source.spec}:")
    base = best["pairs shuffled one by one"][0]
    for name, (rate, positions, _) in best.items():
        print(f"  {name}: {rate:.2f} pairs/s ({rate / base:.2f}x), {positions} positions computed")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
