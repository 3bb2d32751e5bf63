"""Section 5 of gpu_check.py: our log-probs against each model's own forward, on the GPU (the rule
is "never quietly wrong"), and the updates each precision setting applies.

Tolerances are the tests' and the guard's, not new ones:

- float32, ours against the model's own forward: each sequence's summed log-prob within
  ``assert_close``'s float32 default (``rtol=1.3e-6, atol=1e-5``, tests/losses/test_logprobs.py), and
  within ``rtol=0, atol=1e-5`` on the pair shapes of tests/models/test_zoo.py (the first four: on the
  longer ones a sum of ~800 is 6e-5 per float32 step, so a zero rtol cannot hold); the guard's 1e-4
  per token (:mod:`criteriapo.train.guard`);
- bf16 (weights, or autocast over float32 weights), ours against the own forward: the guard's
  half-precision check, at most 1e-2 per token on average and 0.25 on any token;
- packed against padded: float32 ``rtol=1e-5, atol=1e-5`` on log-probs and ``rtol=1e-4, atol=1e-5``
  on gradients (tests/train/test_packing.py); bf16: the guard's 2e-2 per token on log-probs; for bf16
  gradients the tests have no tolerance, so their relative error is reported, not judged;
- updates (tests/train/test_precision.py): 50 steps at lr 5e-7 apply the float32 update within 5%
  (bf16-mixed, cosine > 0.98) or 15% (bf16 weights with adamw_sr); plain AdamW on bf16 weights < 10%;
- the first DPO step's loss is ln 2 within 1e-6 (tests/models/test_zoo.py), the reference scored as
  training scores it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gpu_check import Context

PAD = 0
ARCHS = ("llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "qwen2_moe", "granite")
SETTINGS = ("fp32", "bf16", "bf16-mixed")  # float32; bf16 weights (bf16-true); float32 under bf16 autocast
# (prompt, chosen, rejected) lengths: the zoo test's (empty prompt, 1-token completions) and longer ones
SHAPES = [(9, 3, 8), (0, 4, 2), (7, 1, 6), (2, 6, 1), (60, 40, 30), (33, 17, 45), (100, 64, 64)]
ZOO_PAIRS = 4  # the first SHAPES are tests/models/test_zoo.py's


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """torch.testing.assert_close's criterion, as a bool."""
    return bool(((a.float() - b.float()).abs() <= atol + rtol * b.float().abs()).all())


def row(cells: list[str]) -> str:
    """A markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


# -- 5. precision ---------------------------------------------------------------------------------
def _zoo_pairs():
    from tests.zoo import VOCAB

    from criteriapo.data.records import RowRef
    from criteriapo.data.tokenize import TokenizedPair

    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, VOCAB - 4, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), RowRef("check", i)) for i, (p, c, r) in enumerate(SHAPES)]


def _own_logps(model, pairs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's summed log-prob from the model's own logits, one sequence at a time, no
    padding; labels as pair_segment makes them (an empty prompt leaves the first token unlabelled)."""
    sums, counts = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            ids = torch.tensor([pair.prompt_ids + getattr(pair, side)], device=device)
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]  # (T-1, V)
            lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T-1,): position t predicts t+1
            start = max(len(pair.prompt_ids), 1)
            sums.append(lp[start - 1 :].sum())
            counts.append(ids.shape[1] - start)
    return torch.stack(sums), torch.tensor(counts, device=device)


def _param_subset(model) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    picks = [named[0]]
    picks += [
        next((x for x in named if re.search(pattern, x[0])), named[0])
        for pattern in (r"q_proj|qkv", r"down_proj|fc2")
    ]
    picks.append(named[-1])
    return list({n: (n, p) for n, p in picks}.values())


def _one_model(arch: str, setting: str, device, pairs) -> dict:
    from tests.zoo import VOCAB, zoo_model

    from criteriapo.config import DPOConfig
    from criteriapo.losses.logprobs import LogitTransform, batch_logps
    from criteriapo.models.training import disable_dropout
    from criteriapo.rows.packing import packing_problem
    from criteriapo.rows.pairs import collate_pairs
    from criteriapo.train.guard import ModelCheckError, check_logprobs
    from criteriapo.train.precision import resolve_precision
    from criteriapo.train.scores import score_pairs
    from criteriapo.train.tasks import DPOTask

    prec = resolve_precision(
        {"fp32": "fp32", "bf16": "bf16-true", "bf16-mixed": "bf16-mixed"}[setting], torch.float32
    )
    model = zoo_model(arch).to(device=device, dtype=prec.weights)
    disable_dropout(model)
    model.eval()
    row: dict = {"weights": str(prec.weights), "autocast": str(prec.autocast)}
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs[:4]]
    try:  # as the pipeline does before training (outside autocast): calibrates the logit transform
        transform = check_logprobs(model, seqs, PAD)
        changed = {k: v for k, v in vars(transform).items() if v != getattr(LogitTransform(), k)}
        row["guard"] = "ok" + "".join(f", {k} {v}" for k, v in changed.items())
    except ModelCheckError as e:
        row["guard"] = f"REFUSED: {str(e)[:300]}"
    problem = packing_problem(model.config)
    row["packing"] = "on" if problem is None else f"off: {problem}"
    n = 2 * len(pairs)
    with torch.no_grad(), prec.context(device):
        own, counts = _own_logps(model, pairs, device)
        layouts = {"packed": problem is None, "padded": False}
        ours = {
            k: batch_logps(
                model,
                {x: t.to(device) for x, t in collate_pairs(pairs, range(len(pairs)), PAD, v).items()},
                n,
            )
            for k, v in layouts.items()
        }
    half = prec.autocast is not None or prec.weights != torch.float32
    for k, out in ours.items():
        assert torch.equal(out.num_tokens, counts), (out.num_tokens, counts)
        diff = (out.logps - own).abs()
        per_token = diff / counts.clamp(min=1)
        r = {
            "max_abs_seq": float(diff.max()),
            "max_per_token": float(per_token.max()),
            "mean_per_token": float(per_token.mean()),
        }
        if half:
            r["pass"] = r["mean_per_token"] <= 1e-2 and r["max_per_token"] <= 0.25
            r["criterion"] = "guard, half precision: per token mean <= 1e-2 and max <= 0.25"
        else:  # the zoo test's shapes are the first four pairs: its stricter atol holds on those
            short = torch.cat([diff[:ZOO_PAIRS], diff[len(pairs) : len(pairs) + ZOO_PAIRS]])
            r["max_abs_seq_zoo_shapes"] = float(short.max())
            r["pass"] = (
                _close(out.logps, own, 1.3e-6, 1e-5)
                and float(short.max()) <= 1e-5
                and r["max_per_token"] <= 1e-4
            )
            r["criterion"] = (
                "test_logprobs: assert_close's float32 default (rtol 1.3e-6, atol 1e-5) per sequence; "
                "test_zoo: atol 1e-5, rtol 0 on its pair shapes; guard: <= 1e-4 per token"
            )
        row[f"{k}_vs_own"] = r
    pk, pd = ours["packed"], ours["padded"]
    per_token = ((pk.logps - pd.logps).abs() / counts.clamp(min=1)).max()
    ok = float(per_token) <= 2e-2 if half else _close(pk.logps, pd.logps, 1e-5, 1e-5)
    row["packed_vs_padded"] = {"max_abs_seq": float((pk.logps - pd.logps).abs().max()), "pass": ok}
    if problem is None:
        row["dpo_grads"] = _dpo_grads(
            model, pairs, prec, device, half, VOCAB, DPOConfig, DPOTask, score_pairs
        )
    return row


def _dpo_grads(model, pairs, prec, device, half, vocab, DPOConfig, DPOTask, score_pairs) -> dict:
    """The DPO loss's gradients on a few weights, packed against padded, against a reference scored
    as training scores it; the first step's loss is ln 2."""
    ref = score_pairs(model, pairs, PAD, micro_batch_size=len(pairs), packing=True, precision=prec)
    params = _param_subset(model)
    out: dict = {}
    grads = {}
    for packed in (True, False):
        task = DPOTask(DPOConfig(), PAD, vocab, reference=ref, packing=packed)
        batch = {k: v.to(device) for k, v in task.collate(pairs, range(len(pairs))).items()}
        with prec.context(device):
            loss, _ = task.loss(model, batch, task.counts(batch))
        grads[packed] = torch.autograd.grad(loss, [p for _, p in params])
        out["loss_minus_ln2_packed" if packed else "loss_minus_ln2_padded"] = float(loss) - math.log(2)
    per = {}
    for (name, _), a, b in zip(params, grads[True], grads[False], strict=True):
        per[name] = {
            "max_abs": float((a - b).abs().max()),
            "rel": _rel(a, b),
            "finite": bool(torch.isfinite(a).all()),
        }
        if not half:
            per[name]["pass"] = _close(a, b, 1e-4, 1e-5)
    out["params"] = per
    out["pass"] = all(v["finite"] for v in per.values()) and (half or all(v["pass"] for v in per.values()))
    out["ln2_pass"] = abs(out["loss_minus_ln2_packed"]) <= 1e-6  # test_zoo: fp32 and bf16-mixed alike
    return out


def _updates(ctx: Context) -> dict:
    """tests/train/test_precision.py's check, on this device: the share of the float32 update that
    50 steps at lr 5e-7 apply in each setting (the dry run takes 10 steps and judges nothing)."""
    from tests.train.test_loop import tiny_model, toy_sft

    from criteriapo.config import OptimConfig, TrainConfig
    from criteriapo.tracking.loggers import Loggers
    from criteriapo.train.loop import Trainer
    from criteriapo.train.precision import resolve_precision
    from criteriapo.train.tasks import SFTTask

    def applied(precision: str, optimizer: str = "adamw") -> torch.Tensor:
        prec = resolve_precision(precision, torch.float32)
        m = tiny_model(0, hidden=64).to(device=ctx.device, dtype=prec.weights)
        before = torch.cat([p.detach().float().flatten() for p in m.parameters()])
        optim = OptimConfig(lr=5e-7, scheduler="constant", name=optimizer)
        train = TrainConfig(batch_size=8, precision=precision)
        t = Trainer(m, SFTTask(0), toy_sft(8), optim, train, Loggers([]), precision=prec)
        for _ in range(steps):
            t.train_step(list(range(8)))
        return torch.cat([p.detach().float().flatten() for p in m.parameters()]) - before

    steps = 10 if ctx.dry else 50
    torch._dynamo.reset()  # torchao compiles its step once per weight shape, fullgraph: at most 8 shapes
    ref = applied("fp32")
    proj = lambda u: float(u @ ref / (ref @ ref))  # noqa: E731
    out = {}
    mixed = applied("bf16-mixed")
    cos = float(torch.nn.functional.cosine_similarity(mixed, ref, dim=0))
    out["bf16-mixed"] = {
        "applied": proj(mixed),
        "cosine": cos,
        "pass": abs(proj(mixed) - 1) <= 0.05 and cos > 0.98,
    }
    plain = applied("bf16-true")
    out["bf16-true + adamw"] = {"applied": proj(plain), "pass": proj(plain) < 0.1}
    try:
        sr = applied("bf16-true", "adamw_sr")
        out["bf16-true + adamw_sr"] = {"applied": proj(sr), "pass": abs(proj(sr) - 1) <= 0.15}
    except Exception as e:  # noqa: BLE001 -- torchao missing or built for another torch
        out["bf16-true + adamw_sr"] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "pass": None}
    if ctx.dry:
        for v in out.values():
            v["pass"] = None  # 10 steps: the tolerances are for 50
    return out


def precision(ctx: Context) -> dict:
    pairs = _zoo_pairs()
    rows: dict = {}
    ctx.partial["rows"] = rows
    for arch in ARCHS:
        for setting in SETTINGS:
            if ctx.left() < 5:
                rows[f"{arch}/{setting}"] = {"status": "skipped: time"}
                continue
            try:
                rows[f"{arch}/{setting}"] = _one_model(arch, setting, ctx.device, pairs)
            except Exception as e:  # noqa: BLE001 -- one architecture's failure is recorded, the others still run
                rows[f"{arch}/{setting}"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        ctx.say(f"precision: {arch} done")
    updates = {"status": "skipped: time"}
    if ctx.left() > (60 if ctx.dry else 30):
        try:
            updates = _updates(ctx)
        except Exception as e:  # noqa: BLE001 -- e.g. pytest missing for tests.train.test_loop
            updates = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    failures = [k for k, r in rows.items() if _row_failed(r)]
    failures += [f"updates/{k}" for k, r in updates.items() if isinstance(r, dict) and r.get("pass") is False]
    summary = _precision_table(rows)
    ups = [
        f"{k}: {v.get('applied', v.get('error'))} (pass: {v.get('pass')})"
        if isinstance(v, dict)
        else f"{k}: {v}"
        for k, v in updates.items()
    ]
    summary += [
        "",
        "Updates, test_precision's check here (share of the fp32 update applied): " + "; ".join(ups),
        "",
    ]
    summary.append(f"**FAILURES: {', '.join(failures)}**" if failures else "All within the tolerances.")
    return {"rows": rows, "updates": updates, "failures": failures, "summary": summary}


def _precision_table(rows: dict) -> list[str]:
    head = [
        "arch/setting",
        "guard",
        "packing",
        "packed vs own: max/seq, max/token",
        "pass",
        "padded vs own pass",
        "packed vs padded pass",
        "DPO grads packed vs padded: max rel",
        "grads pass",
        "loss - ln 2",
    ]
    lines = [
        (
            f"{len(SHAPES)} pairs (prompts 0-100 tokens, completions 1-64) on the zoo's tiny models; ours = "
            "batch_logps on the training layout (packed where the model allows), own = "
            "log_softmax(model(ids).logits) one sequence at a time. Criteria: gpu_precision.py's docstring."
        ),
        "",
        row(head),
        "|---" * len(head) + "|",
    ]
    for key, r in rows.items():
        if "error" in r or "status" in r:
            lines.append(f"| {key} | {r.get('error') or r.get('status')} " + "|" * (len(head) - 1))
            continue
        pk, pd, g = r["packed_vs_own"], r["padded_vs_own"], r.get("dpo_grads")
        cells = [
            key,
            r["guard"][:40],
            r["packing"][:30],
            f"{pk['max_abs_seq']:.2g}, {pk['max_per_token']:.2g}",
        ]
        cells += [str(pk["pass"]), str(pd["pass"]), str(r["packed_vs_padded"]["pass"])]
        if g:
            cells += [f"{max(v['rel'] for v in g['params'].values()):.2g}", str(g["pass"])]
            cells.append(f"{g['loss_minus_ln2_packed']:.2g}")
        else:
            cells += ["-", "-", "-"]
        lines.append(row(cells))
    return lines


def _row_failed(r: dict) -> bool:
    if "error" in r:
        return True
    if "status" in r:
        return False
    checks = [r["packed_vs_own"]["pass"], r["padded_vs_own"]["pass"], r["packed_vs_padded"]["pass"]]
    if r.get("dpo_grads"):
        checks += [r["dpo_grads"]["pass"], r["dpo_grads"]["ln2_pass"]]
    return not all(checks) or r["guard"].startswith("REFUSED")
