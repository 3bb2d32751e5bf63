"""The attention sections of gpu_check.py: which SDPA kernel runs our packed-pair mask, cuDNN's
masked attention at awkward lengths, and three ways to compute one pair's attention.

A DPO pair is one row ``prompt | chosen | rejected`` (:mod:`criteriapo.rows.packing`): token i sees
token j when j is not after i, except that a rejected token never sees a chosen one. The mask reaches
the model as a boolean (R, 1, L, L) tensor (``batch_logps`` -> ``packing.attention_mask``); transformers
passes a 4D mask through unchanged, and with a mask its SDPA path repeats K/V to the query heads
(``use_gqa_in_sdpa`` is False) and calls SDPA with ``is_causal=False``. Section 2 records those calls.
"""

from __future__ import annotations

import re
import statistics
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from criteriapo.rows.packing import CHOSEN, REJECTED, SHARED, attention_mask

if TYPE_CHECKING:
    from gpu_check import Context

BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
ATTENTION_NAME = re.compile(
    r"scaled_dot_product|flash|fmha|attention|attn|cudnn|softmax|mem_eff", re.IGNORECASE
)


# -- shared helpers --------------------------------------------------------------------------------
def layout(length: int) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) of a pair whose row is ``length`` long: half, a quarter, the rest."""
    p, c = length // 2, length // 4
    return p, c, length - p - c


def pair_mask(batch: int, length: int, device, implementation: str = "sdpa", dtype=torch.bfloat16):
    """The project's mask for ``batch`` rows of one pair each: (B, 1, L, L)."""
    p, c, r = layout(length)
    branch = torch.tensor([SHARED] * p + [CHOSEN] * c + [REJECTED] * r, device=device).expand(batch, length)
    segment = torch.zeros(batch, length, dtype=torch.long, device=device)
    return attention_mask(segment, branch, implementation, dtype)


def qkv(b: int, hq: int, hk: int, length: int, d: int, device, dtype, seed: int = 0, grad: bool = True):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, length, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hk, length, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hk, length, d, device=device, dtype=dtype, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hk, L, D) -> (B, Hk * n, L, D), as transformers does before SDPA with a mask."""
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def first_line(e: BaseException) -> str:
    text = next((x for x in str(e).splitlines() if x.strip()), "")
    return f"{type(e).__name__}: {text[:300]}"


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs, dout=None):
    out = fn()
    grads = torch.autograd.grad(out, inputs, out.detach() if dout is None else dout)
    return out, grads


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().float(), ref.detach().float()
    return float((a - ref).norm() / ref.norm().clamp(min=1e-30))


def attempt(fn: Callable[[], object]) -> tuple[object, str | None]:
    """``fn()``, or None and why not: the error's first line and the warnings SDPA gave for each kernel
    it turned down (on CUDA they say why, e.g. "Flash attention does not support non-null attn_mask")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 -- no kernel for these inputs: the reason is the finding
            reasons = [first_line(e)] + [str(w.message).splitlines()[0][:200] for w in caught]
            return None, "; ".join(dict.fromkeys(reasons))


def finite(*ts: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def attention_ops(prof) -> dict:
    """The attention ops (aten, with their call counts) and device kernels (with their time in ms)
    that a profile saw."""
    ops, kernels = {}, {}
    for e in prof.key_averages():
        if not ATTENTION_NAME.search(e.key):
            continue
        if e.key.startswith("aten::"):
            ops[e.key] = e.count
        elif str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1")):  # a kernel
            ms = (getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0) or 0) / 1e3
            kernels[e.key[:160]] = round(ms, 3)
    return {"aten_ops": ops, "kernels": kernels}


# -- 2. which SDPA backend --------------------------------------------------------------------------
def _mask_text(mask) -> object:
    if mask is None:
        return None
    variant = getattr(mask, "variant", None)  # a CausalBias (our pieces' lower-right causal mask)
    if variant is not None:
        return f"CausalBias {variant.name} ({mask.seq_len_q} x {mask.seq_len_kv})"
    return [list(mask.shape), str(mask.dtype)]


def _sdpa_calls(model, batch, n: int, keep: int = 4) -> list[dict]:
    """SDPA's arguments in one forward of ``model`` through our scoring path (the first ``keep``
    calls: with attention by pieces, the first layer's pieces)."""
    from criteriapo.losses.logprobs import batch_logps

    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if len(calls) < keep:
            calls.append(
                {
                    "query": list(q.shape),
                    "key": list(k.shape),
                    "mask": _mask_text(attn_mask),
                    "is_causal": bool(is_causal),
                    "enable_gqa": bool(kw.get("enable_gqa", False)),
                    "dtype": str(q.dtype),
                }
            )
        # a CausalBias dispatches only when SDPA is torch's own function: put it back for this call
        F.scaled_dot_product_attention = original
        try:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        finally:
            F.scaled_dot_product_attention = spy

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            batch_logps(model, batch, n)
    finally:
        F.scaled_dot_product_attention = original
    return calls


def _profile_model(ctx: Context, hq: int, hk: int, d: int, length: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from criteriapo.data.records import RowRef
    from criteriapo.data.tokenize import TokenizedPair
    from criteriapo.losses.logprobs import batch_logps
    from criteriapo.rows.pairs import collate_pairs

    torch.manual_seed(0)
    hidden = hq * d
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=hq,
        num_key_value_heads=hk,
        head_dim=d,
        max_position_embeddings=2 * length,
    )
    with ctx.device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    p, c, r = layout(length)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 1024, (n,), generator=g).tolist()  # noqa: E731
    pairs = [TokenizedPair(ids(p), ids(c), ids(r), RowRef("check", i)) for i in range(2)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    out = {"model": f"Llama, {hq}/{hk} heads x {d}, 2 layers, bf16; 2 pairs of {p}+{c}+{r} tokens"}
    for packed in (True, False):
        batch = {k: v.to(ctx.device) for k, v in collate_pairs(pairs, range(2), 0, packed).items()}
        name = "packed" if packed else "padded"
        calls = _sdpa_calls(model, batch, 4)
        batch_logps(model, batch, 4).logps.sum().backward()  # warm-up
        ctx.sync()
        with profile(activities=activities) as prof:
            batch_logps(model, batch, 4).logps.sum().backward()
            ctx.sync()
        out[name] = {"sdpa_calls": calls, **attention_ops(prof)}
    return out


def sdpa_backends(ctx: Context) -> dict:
    b, hq, hk, d, length = (2, 4, 2, 16, 128) if ctx.dry else (2, 32, 8, 64, 1024)
    dtype = torch.bfloat16
    q, k, v = qkv(b, hq, hk, length, d, ctx.device, dtype)
    mask = pair_mask(b, length, ctx.device)
    n = hq // hk
    cases = {
        "causal, no mask, enable_gqa (transformers without a mask)": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        ),
        "pair mask, K/V repeated (transformers with our mask)": lambda: F.scaled_dot_product_attention(
            q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=mask
        ),
        "pair mask, enable_gqa": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        ),
    }
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    results: dict = {}
    ctx.partial["backends"] = results
    for case, fn in cases.items():
        row: dict = {}
        for backend in BACKENDS:

            def run(backend=backend, fn=fn):
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    out, grads = fwd_bwd(fn, (q, k, v))
                ctx.sync()
                return finite(out, *grads)

            ok, why = attempt(run)
            row[backend] = why or ("ok" if ok else "ran, NOT FINITE")
        with profile(activities=activities) as prof:  # what the dispatcher picks by itself
            fwd_bwd(fn, (q, k, v))
            ctx.sync()
        row["default"] = attention_ops(prof)
        results[case] = row
    shapes = f"q ({b}, {hq}, {length}, {d}), k/v ({b}, {hk}, {length}, {d}), {dtype}, "
    shapes += f"mask ({b}, 1, {length}, {length})"
    ctx.say("sdpa: profiling a small Llama through batch_logps")
    model = _profile_model(ctx, hq, hk, d, length // 2)
    summary = [f"Inputs: {shapes}. Each backend alone, forward + backward:", ""]
    summary += ["| case | " + " | ".join(BACKENDS) + " | picked by default (aten ops) |", "|---" * 6 + "|"]
    for case, row in results.items():
        cells = [row[x] if row[x] == "ok" else f"no: {row[x][:160]}" for x in BACKENDS]
        summary.append(f"| {case} | " + " | ".join(cells) + f" | {', '.join(row['default']['aten_ops'])} |")
    for name in ("packed", "padded"):
        m = model[name]
        summary += [
            "",
            (
                f"Model ({model['model']}), {name}: first SDPA calls {m['sdpa_calls']}; aten ops "
                f"{m['aten_ops']}; kernels {list(m['kernels'])[:6]}"
            ),
        ]
    return {"inputs": shapes, "backends": results, "model_forward": model, "summary": summary}


# -- 3. cuDNN with an explicit mask -----------------------------------------------------------------
def _masked(q, k, v, mask, backend: str):
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        return fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), None)


def cudnn_mask(ctx: Context) -> dict:
    lengths = (192, 256) if ctx.dry else (192, 320, 1088, 256, 1024)
    b, h, d = (1, 2, 16) if ctx.dry else (2, 8, 64)
    # the CPU has no cuDNN: its flash kernel stands in so that the comparison itself runs
    tested = ("CUDNN_ATTENTION", "FLASH_ATTENTION") if ctx.dry else ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
    rows, errors = [], set()
    ctx.partial["rows"] = rows
    for length in lengths:
        for kind in ("bool", "additive"):
            q, k, v = qkv(b, h, h, length, d, ctx.device, torch.bfloat16, seed=length)
            implementation = "sdpa" if kind == "bool" else "eager"  # the project's two mask forms
            mask = pair_mask(b, length, ctx.device, implementation, torch.bfloat16)
            ref_out, ref_grads = _masked(q, k, v, mask, "MATH")
            for backend in tested:
                row = {"length": length, "mod_128": length % 128, "mask": kind, "backend": backend}
                got, why = attempt(lambda x=(q, k, v, mask, backend): _masked(*x))
                if got is None:
                    row["error"] = why
                    errors.add(why)
                    rows.append(row)
                    continue
                out, grads = got
                ctx.sync()
                row |= {"finite_out": finite(out), "finite_grads": finite(*grads)}
                row["max_abs_out_vs_math"] = max_diff(out, ref_out)
                for x, g, r in zip("qkv", grads, ref_grads, strict=True):
                    row[f"max_abs_d{x}_vs_math"] = max_diff(g, r)
                rows.append(row)
    cudnn_rows = [r for r in rows if r["backend"] == "CUDNN_ATTENTION"]
    unavailable = all("error" in r for r in cudnn_rows)
    summary = []
    if unavailable:
        summary.append(f"cudnn backend unavailable: {min(errors) if errors else '?'}")
    summary += [
        (
            f"q/k/v ({b}, {h}, L, {d}) bf16, the project's pair mask (bool and additive), forward + "
            "backward; max |difference| against the MATH backend on the same bf16 inputs:"
        ),
        "",
        "| L | L mod 128 | mask | backend | finite out/grads | out | dq | dk | dv |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            summary.append(
                f"| {r['length']} | {r['mod_128']} | {r['mask']} | {r['backend']} | {r['error'][:80]} ||||"
            )
            continue
        diffs = " | ".join(f"{r[f'max_abs_{x}_vs_math']:.3g}" for x in ("out", "dq", "dk", "dv"))
        fin = f"{r['finite_out']}/{r['finite_grads']}"
        summary.append(f"| {r['length']} | {r['mod_128']} | {r['mask']} | {r['backend']} | {fin} | {diffs} |")
    return {"cudnn_unavailable": unavailable, "rows": rows, "summary": summary}


# -- 4. attention for one packed pair: mask, flex, split ----------------------------------------------
def split_attention(q, k, v, p: int, c: int, gqa: bool) -> torch.Tensor:
    """The pair as causal pieces: prompt + chosen as one causal sequence, and the rejected tokens over
    [prompt, rejected] K/V, causal aligned to the bottom right (so they see the whole prompt). No L x L
    mask; both pieces can run on flash kernels."""
    from torch.nn.attention.bias import causal_lower_right

    n = q.shape[1] // k.shape[1]
    if not gqa:
        k, v = repeat_kv(k, n), repeat_kv(v, n)
    e = p + c
    first = F.scaled_dot_product_attention(
        q[:, :, :e], k[:, :, :e], v[:, :, :e], is_causal=True, enable_gqa=gqa
    )
    r = q.shape[2] - e
    kr = torch.cat([k[:, :, :p], k[:, :, e:]], dim=2)
    vr = torch.cat([v[:, :, :p], v[:, :, e:]], dim=2)
    second = F.scaled_dot_product_attention(
        q[:, :, e:], kr, vr, attn_mask=causal_lower_right(r, p + r), enable_gqa=gqa
    )
    return torch.cat([first, second], dim=2)


def ours(q, k, v, p: int, c: int) -> torch.Tensor:
    """The pair through the attention training runs (:func:`criteriapo.models.attention.piece_attention`,
    K/V heads as they are): prompt + chosen one causal piece, the rejected reply a piece after the
    prompt's keys. (B, Hq, L, D) like the others."""
    from criteriapo.models.attention import piece_attention

    length = q.shape[2]
    pieces = [[(0, p + c, 0, 0), (p + c, length, 0, p)]] * q.shape[0]
    out, _ = piece_attention(None, q, k, v, None, pieces=pieces)
    return out.transpose(1, 2)


def ours_ops(ctx: Context, q, k, v, p: int, c: int) -> dict:
    """The aten ops one forward and backward of :func:`ours` ran: the attention kernels, and whether
    any K/V were repeated on the way (``repeat_interleave``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fwd_bwd(lambda: ours(q, k, v, p, c), (q, k, v))
        ctx.sync()
    repeats = sum(e.count for e in prof.key_averages() if e.key == "aten::repeat_interleave")
    return attention_ops(prof) | {"kv_repeats": repeats}


def _pairs(p: int, c: int, r: int) -> dict[str, int]:
    """(query, key) pairs: those the mask allows (useful), and all of the L x L square."""
    useful = p * (p + 1) // 2 + c * p + c * (c + 1) // 2 + r * p + r * (r + 1) // 2
    return {
        "useful": useful,
        "square": (p + c + r) ** 2,
        "split": (p + c) * (p + c + 1) // 2 + r * p + r * (r + 1) // 2,
    }


def _time_ms(ctx: Context, fn: Callable[[], object], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    ctx.sync()
    times = []
    for _ in range(reps):
        if ctx.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _one_length(ctx: Context, length: int, dims: tuple[int, int, int, int], flex_fn, out: dict) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    b, hq, hk, d = dims
    p, c, r = layout(length)
    n = hq // hk
    dtype = torch.bfloat16
    q, k, v = qkv(b, hq, hk, length, d, ctx.device, dtype, seed=length)
    g = torch.Generator(device=ctx.device).manual_seed(7)
    dout = torch.randn(b, hq, length, d, device=ctx.device, dtype=dtype, generator=g)
    mask = pair_mask(b, length, ctx.device)

    def mask_mod(_b, _h, qi, kv):
        return (kv <= qi) & ~((qi >= p + c) & (kv >= p) & (kv < p + c))

    block = create_block_mask(mask_mod, None, None, length, length, device=ctx.device)
    blocks = int(block.kv_num_blocks.sum()) + int(
        block.full_kv_num_blocks.sum() if block.full_kv_num_blocks is not None else 0
    )
    counts = _pairs(p, c, r)
    counts["flex"] = blocks * block.BLOCK_SIZE[0] * block.BLOCK_SIZE[1]
    # the reference: the same mask in float32 (MATH or the memory-efficient kernel, both fp32 throughout)
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ref_out, ref_grads = fwd_bwd(
            lambda: F.scaled_dot_product_attention(
                ref_in[0], repeat_kv(ref_in[1], n), repeat_kv(ref_in[2], n), attn_mask=mask
            ),
            ref_in,
            dout.float(),
        )
    flex_in = [t.detach() for t in (q, k, v)] if ctx.dry else (q, k, v)  # no flex backward on the CPU
    # flex last: its compilation is the one thing here that can take long
    paths = {
        "sdpa_mask_repeat_kv": (
            lambda: F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=mask),
            "square",
        ),
        "pieces_ours": (lambda: ours(q, k, v, p, c), "split"),
        "split_causal_enable_gqa": (lambda: split_attention(q, k, v, p, c, gqa=True), "split"),
        "split_causal_repeat_kv": (lambda: split_attention(q, k, v, p, c, gqa=False), "split"),
        "sdpa_mask_enable_gqa": (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "square",
        ),
        "flex_block_mask": (lambda: flex_fn(*flex_in, block_mask=block, enable_gqa=True), "flex"),
    }
    useful_flops = 14 * d * hq * b * counts["useful"]  # forward 4d per (query, key), backward 2.5x that
    out |= {"prompt_chosen_rejected": [p, c, r], "pairs_per_head": counts, "paths": {}}
    try:
        out["ours_ops"] = ours_ops(ctx, q, k, v, p, c)
    except Exception as e:  # noqa: BLE001 -- the path's own row below says the same; the check goes on
        out["ours_ops"] = {"error": first_line(e)}
    first = None
    warmup, reps = (1, 3) if ctx.dry else (3, 10)
    for name, (fn, computed) in paths.items():
        if ctx.left() < 10:
            out["paths"][name] = {"status": "skipped: time"}
            continue
        row: dict = {
            "computed_pairs_per_head": counts[computed],
            "computed_over_useful": counts[computed] / counts["useful"],
        }
        out["paths"][name] = row
        backward = not (ctx.dry and name.startswith("flex"))  # FlexAttention has no backward on the CPU
        try:
            if backward:
                o, grads = fwd_bwd(fn, (q, k, v), dout)
            else:
                with torch.no_grad():
                    o, grads = fn(), ()
                row["note"] = "forward only: FlexAttention does not support backward on the CPU"
            ctx.sync()
            first = first or (o.detach(), [x.detach() for x in grads])
            row["rel_err_vs_fp32"] = {"out": rel_err(o, ref_out)}
            row["rel_err_vs_fp32"] |= {
                f"d{x}": rel_err(gr, rf) for x, gr, rf in zip("qkv", grads, ref_grads, strict=False)
            }
            row["max_abs_vs_sdpa_mask"] = {"out": max_diff(o, first[0])}
            row["max_abs_vs_sdpa_mask"] |= {
                f"d{x}": max_diff(gr, f) for x, gr, f in zip("qkv", grads, first[1], strict=False)
            }
            row["finite"] = finite(o, *grads)
            row["match"] = row["finite"] and max(row["rel_err_vs_fp32"].values()) <= 1e-2
            if backward:
                step = lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout)  # noqa: E731
            else:
                step = lambda fn=fn: fn()  # noqa: E731
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                ctx.sync()
                row["extra_memory_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            with torch.no_grad() if not backward else torch.enable_grad():
                row["ms"] = _time_ms(ctx, step, warmup, reps)
            flops = useful_flops if backward else useful_flops * 4 / 14
            row["useful_tflops"] = flops / (row["ms"] / 1e3) / 1e12
        except Exception as e:  # noqa: BLE001 -- a path these versions cannot run is a finding, not a failure
            row["error"] = first_line(e)
        ctx.say(f"attention L={length} {name}: {row.get('ms', row.get('error', row.get('status')))}")


def attention(ctx: Context) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    dims = (2, 4, 2, 16) if ctx.dry else (4, 32, 8, 64)
    lengths = (64, 128) if ctx.dry else (2048, 4096)
    flex_fn = torch.compile(flex_attention, dynamic=False)
    results: dict = {}
    ctx.partial["lengths"] = results
    for length in lengths:
        if ctx.left() < 15:
            results[str(length)] = {"status": "skipped: time"}
            continue
        results[str(length)] = {}  # filled as it goes, so a timeout keeps what was measured
        _one_length(ctx, length, dims, flex_fn, results[str(length)])
    b, hq, hk, d = dims
    summary = [
        (
            f"{b} pairs, one per row (prompt L/2, chosen L/4, rejected L/4), {hq} query / {hk} KV heads x "
            f"{d}, bf16, forward + backward (median). Useful FLOPs = 14 d per allowed (query, key) pair per "
            "head (forward 4d, backward 2.5x); computed/useful counts what each path computes: the whole L "
            "x L square with a mask, flex's non-empty 128 x 128 blocks, the split's two causal pieces (up "
            "to diagonal tiles); pieces_ours is the split as training runs it (`piece_attention`). Match: "
            "every output and input gradient within 1e-2 relative error of a float32 computation."
        ),
        "",
        (
            "| L | path | ms | useful TFLOP/s | computed/useful | extra MiB | match "
            "| max abs diff vs SDPA+mask (out, dq) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, res in results.items():
        for name, row in res.get("paths", {}).items():
            if "ms" not in row:
                summary.append(f"| {length} | {name} | {row.get('error') or row.get('status')} ||||||")
                continue
            diff = row["max_abs_vs_sdpa_mask"]
            summary.append(
                f"| {length} | {name} | {row['ms']:.2f} | {row['useful_tflops']:.1f} | "
                f"{row['computed_over_useful']:.2f} | {row.get('extra_memory_mib', float('nan')):.0f} | "
                f"{row['match']} | {diff['out']:.3g}, {diff.get('dq', float('nan')):.3g} |"
            )
    summary.append("")
    for length, res in results.items():
        if "ours_ops" in res:
            ops = res["ours_ops"]
            text = ops.get("error") or f"aten ops {ops['aten_ops']}; K/V repeated {ops['kv_repeats']} times"
            summary.append(f"pieces_ours at {length}, one forward and backward: {text}")
    return {
        "dims": {"batch": b, "q_heads": hq, "kv_heads": hk, "head_dim": d},
        "lengths": results,
        "summary": summary,
    }
