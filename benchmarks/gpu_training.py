"""Sections 6 and 7 of gpu_check.py: full-parameter DPO of the Llama 3.2 3B architecture (memory,
speed, MFU), and ours against TRL on the Llama 3.2 1B architecture."""

from __future__ import annotations

import gc
import math
import resource
import time
from typing import TYPE_CHECKING

import torch
from gpu_precision import PAD, row

if TYPE_CHECKING:
    from gpu_check import Context


# -- 6. 3B full-parameter DPO ----------------------------------------------------------------------
def _adamw_sr_probe(ctx: Context) -> str | None:
    """None when torchao's stochastic-rounding AdamW steps a bf16 weight here, else why not."""
    try:
        from torchao.optim import _AdamW

        p = torch.nn.Parameter(torch.randn(64, 64, device=ctx.device, dtype=torch.bfloat16))
        p.grad = torch.randn_like(p)
        _AdamW([p], lr=1e-3, bf16_stochastic_round=True).step()
        return None
    except Exception as e:  # noqa: BLE001 -- not installed, or built for another torch
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _nonembed(model) -> int:
    embeds = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in embeds.values())


def _dpo_variant(ctx: Context, v: dict, arch: str, length: int, batch: int, steps: int) -> dict:
    import memory_3b
    from dpo_3b_gpu import ARCHS, pairs
    from transformers import LlamaConfig, LlamaForCausalLM

    from criteriapo.config import DPOConfig, OptimConfig, TrainConfig
    from criteriapo.models.training import disable_dropout, enable_activation_checkpointing
    from criteriapo.tracking.loggers import Loggers
    from criteriapo.train.loop import Trainer
    from criteriapo.train.optim import BackwardAdamW
    from criteriapo.train.precision import resolve_precision
    from criteriapo.train.scores import score_pairs
    from criteriapo.train.tasks import DPOTask

    cuda = ctx.device.type == "cuda"
    prec = resolve_precision(v["precision"], torch.bfloat16)
    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=max(4096, 2 * length))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with ctx.device:
        model = LlamaForCausalLM(config).to(prec.weights)
    checkpointing = v.get("checkpointing", True)
    if checkpointing:
        enable_activation_checkpointing(model)
    disable_dropout(model)
    out: dict = {**v, "build_s": time.perf_counter() - t0}
    data = pairs(batch * (steps + 1), length, config.vocab_size)
    p, c = len(data[0].prompt_ids), len(data[0].chosen_ids)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ref = score_pairs(model, data, PAD, batch, precision=prec)  # precompute_ref_log_probs: once, before
    ctx.sync()
    out["ref_s"] = time.perf_counter() - t0
    if cuda:
        out["ref_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    train = TrainConfig(
        batch_size=batch,
        micro_batch_size=batch,
        max_steps=steps + 1,
        gradient_checkpointing=checkpointing,
        precision=v["precision"],
        optimizer_in_backward=v["in_backward"],
        checkpoint_every=None,
    )
    optim = OptimConfig(
        lr=5e-7, scheduler="constant", name=v["optim"], max_grad_norm=None if v["in_backward"] else 1.0
    )
    trainer = Trainer(
        model,
        DPOTask(DPOConfig(), PAD, config.vocab_size, reference=ref),
        data,
        optim,
        train,
        Loggers([]),
        precision=prec,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, norms = [], [], []
    for _ in range(steps + 1):
        ctx.sync()
        t = time.perf_counter()
        m = trainer.train_step(trainer.order.next_batch(batch))
        ctx.sync()
        times.append(time.perf_counter() - t)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    timed = sum(times[1:]) if steps else float("nan")
    positions = batch * (p + 2 * c) * steps  # each computed position once: the prompt once per pair
    n = _nonembed(model)
    out |= {
        "pairs_per_step": batch,
        "prompt_chosen_rejected": [p, c, c],
        "params": sum(x.numel() for x in model.parameters()),
        "params_nonembed": n,
        "step_s": times,
        "warmup_s": times[0],
        "losses": losses,
        "grad_norms": norms,
        "step1_loss_minus_ln2": losses[0] - math.log(2),
        "positions_per_s": positions / timed,
        "sequence_tokens_per_s": batch * 2 * (p + c) * steps / timed,
        "mfu": 6 * n * positions / timed / ctx.peak_flops,
    }
    if cuda:
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    setup = memory_3b.Setup(
        v["name"], "dpo", 1, False, batch, length, checkpointing, v["precision"], v["in_backward"]
    )
    out["predicted_gib"] = memory_3b.gib(config, setup)["total"]
    if isinstance(trainer.optimizer, BackwardAdamW):
        trainer.optimizer.close()
    del trainer, model, ref
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def dpo_3b(ctx: Context) -> dict:
    arch, length, batch, steps = ("tiny", 64, 2, 1) if ctx.dry else ("llama3.2-3b", 2048, 4, 3)
    # torchao compiles its step per weight shape with fullgraph=True, so a 9th shape in one process
    # (dynamo's recompile_limit is 8) fails: forget the shapes compiled by earlier sections
    torch._dynamo.reset()
    why_not_sr = _adamw_sr_probe(ctx)
    first = (
        {"name": "bf16 weights, adamw_sr (torchao)", "precision": "bf16-true", "optim": "adamw_sr"}
        if why_not_sr is None
        else {
            "name": "bf16 weights, AdamW (torchao unusable: fallback)",
            "precision": "bf16-true",
            "optim": "adamw",
        }
    )
    variants = [
        {**first, "in_backward": False},
        # configs/llama3.2-3b-24gb.yaml's own settings (torchao's stochastic rounding, stepped in backward)
        {**first, "name": first["name"] + " stepped in backward (the 24 GB config)", "in_backward": True},
        {
            "name": "bf16 weights, AdamW stepped in backward",
            "precision": "bf16-true",
            "optim": "adamw",
            "in_backward": True,
        },
        {
            "name": "bf16-mixed (fp32 master weights), AdamW",
            "precision": "bf16-mixed",
            "optim": "adamw",
            "in_backward": False,
        },
        # the speed this architecture reaches without recompute: the MFU target's best case
        {**first, "name": first["name"] + ", no checkpointing", "in_backward": False, "checkpointing": False},
    ]
    results: list[dict] = []
    ctx.partial["variants"] = results
    for v in variants:
        if ctx.left() < (10 if ctx.dry else 40):
            results.append({**v, "status": "skipped: time"})
            continue
        ctx.say(f"dpo_3b: {v['name']}")
        gc.collect()  # a failed variant's model is freed once its traceback is gone
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            results.append(_dpo_variant(ctx, v, arch, length, batch, steps))
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: recorded, the next variant still runs
            results.append({**v, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    head = ["variant", "max allocated GiB", "max reserved GiB", "predicted GiB", "positions/s", "MFU"]
    head += ["warm-up s", "step-1 loss - ln 2"]
    summary = [
        (
            f"{arch} (random weights), {batch} pairs x {length} tokens per sequence (prompt half) per step, "
            "gradient checkpointing (except where the variant says not), reference precomputed "
            f"(score_pairs, before the timed steps), {steps} timed steps after one warm-up. positions/s "
            "counts each computed position once (a pair's prompt once); MFU = 6 x N(non-embedding) x "
            "positions/s / peak, recomputation not counted. Predicted: benchmarks/memory_3b.py's estimate "
            "for the same setup (it assumes two unpacked sequences per pair)."
        ),
        "",
        f"adamw_sr: {'available' if why_not_sr is None else 'NOT available: ' + why_not_sr}",
        "",
        row(head),
        "|---" * len(head) + "|",
    ]
    for r in results:
        if "positions_per_s" not in r:
            summary.append(row([r["name"], str(r.get("error") or r.get("status"))]))
            continue
        mem = [r.get("max_allocated_gib"), r.get("max_reserved_gib")]
        cells = [r["name"], *(f"{x:.1f}" if x is not None else "-" for x in mem), f"{r['predicted_gib']:.2f}"]
        cells += [f"{r['positions_per_s']:.0f}", f"{r['mfu']:.1%}", f"{r['warmup_s']:.1f}"]
        summary.append(row([*cells, f"{r['step1_loss_minus_ln2']:.2g}"]))
    return {"adamw_sr": why_not_sr or "available", "variants": results, "summary": summary}


# -- 7. ours against TRL --------------------------------------------------------------------------
def ours_vs_trl(ctx: Context) -> dict:
    from dpo_vs_trl import ContenderFailed, run_contender, summarize

    dry = ctx.dry
    argv = ["--model", "tiny" if dry else "llama3.2-1b", "--tokenizer", "synthetic"]
    argv += ["--device", ctx.device.type, "--dtype", "float32" if dry else "bfloat16"]
    argv += [
        "--pairs",
        "2" if dry else "4",
        "--length",
        "64" if dry else "2048",
        "--steps",
        "1" if dry else "3",
    ]
    trl = ctx.imports.get("trl", {"ok": False, "stderr": "not checked"})
    liger = ctx.imports.get("liger_kernel.transformers", {"ok": False})
    results: dict = {}
    ctx.partial["contenders"] = results
    for contender in ("ours", "trl-precomputed", "ours-no-checkpointing", "ours-lean", "trl-default"):
        if contender.startswith("trl") and not trl["ok"]:
            results[contender] = {"status": f"TRL not importable: {trl.get('stderr')}"}
            continue
        extra: list[str] = []
        for attempt in range(2):
            left = ctx.left() - 10
            if left < (20 if dry else 60):
                results[contender] = {"status": "skipped: time"}
                break
            ctx.say(f"ours_vs_trl: {' '.join([contender, *extra])} (timeout {min(left, 240):.0f} s)")
            try:
                run = run_contender(argv + extra, contender, timeout=min(left, 240))
            except ContenderFailed as e:
                results[contender] = {"error": str(e)[-2000:], "argv": extra}
                if contender == "trl-precomputed" and attempt == 0 and not dry and liger["ok"]:
                    extra = ["--no-liger"]  # Liger may be what failed: once more without it
                    continue
                break
            s = summarize([run], ctx.peak_flops)
            s |= {"ref_s": run.get("ref_seconds"), "argv": extra}
            results[contender] = s
            break
    head = ["contender", "positions/s", "sequence tokens/s", "peak GiB", "step-1 loss", "MFU", "utilisation"]
    head += ["Liger", "ref in loop"]  # the figures are dpo_vs_trl.summarize's
    summary = [
        (
            f"`dpo_vs_trl.py {' '.join(argv)}` per contender, each in its own process (ours: reference "
            "precomputed; trl-precomputed: precompute_ref_log_probs, no gradient checkpointing, Liger "
            "where importable; ours-no-checkpointing: ours without gradient checkpointing, like TRL's "
            "fastest; ours-lean: checkpointing + optimizer in backward; trl-default: TRL's defaults, "
            "reference in the loop). positions/s counts each position of a pair once (the prompt "
            "once), for both; MFU = 6 x N(non-embedding) x positions/s / peak; utilisation = useful FLOPs "
            "(the non-embedding weights per position, the output layer at completion positions, attention "
            "over the pairs causal attention allows; x3 for backward, +1 forward with the reference in the "
            "loop) per second / peak."
        ),
        "",
        (
            f"TRL: {'importable' if trl['ok'] else 'NOT importable: ' + str(trl.get('stderr'))}; "
            f"Liger: {'importable' if liger.get('ok') else 'NOT importable: ' + str(liger.get('stderr'))}"
        ),
        "",
        row(head),
        "|---" * len(head) + "|",
    ]
    for c, r in results.items():
        if "positions_per_second" not in r:
            summary.append(row([c, str(r.get("error") or r.get("status"))[-300:].replace("\n", " ")]))
            continue
        cells = [c + (" " + " ".join(r["argv"]) if r["argv"] else ""), f"{r['positions_per_second']:.0f}"]
        cells += [f"{r['tokens_per_second']:.0f}", f"{r['peak_gib']:.2f}", f"{r['step1_loss']:.6f}"]
        cells += [f"{r['mfu']:.1%}", f"{r['utilisation']:.1%}", r["liger_status"], str(r["ref_in_loop"])]
        summary.append(row(cells))
    return {"argv": argv, "contenders": results, "summary": summary}
