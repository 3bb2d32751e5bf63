"""One command that checks the project on a GPU machine, cheap and most important first:

1. the environment, and the measured bf16 matmul rate against the datasheet peak;
2. which SDPA kernel runs our packed-pair attention (each backend alone, and a profiled forward);
3. cuDNN attention with an explicit mask at lengths 64 mod 128 (finite? same gradients as MATH?);
4. attention for one packed pair at 2048 and 4096 tokens: SDPA with our mask, FlexAttention with a
   block mask, the pair split into causal pieces, and that split as training runs it (with the
   aten ops it ran: flash for a lower-right piece, no K/V repeated); same outputs and gradients,
   time, TFLOP/s;
5. our log-probs (packed pairs, chunked output layer) against each zoo model's own forward, fp32
   and bf16, with the tests' tolerances; DPO gradients packed against padded; updates that survive;
6. full-parameter DPO of the Llama 3.2 3B architecture: peak memory, tokens/s, MFU;
7. ours against TRL on the Llama 3.2 1B architecture (last; skipped when time runs out).

Each section runs under its own time budget and a global deadline (counted from the start of the
process), records its error (type, message, traceback's end) instead of stopping the others, and the
JSON is rewritten after every section, so a killed run still leaves what it measured. Sections 2 to
4 run in processes of their own, so that a kernel that breaks the CUDA context takes only them.
Results: benchmarks/results/gpu_check-<device>.{json,md}, copied into $OUT when that is set.

    python3 benchmarks/gpu_check.py --deadline 480        # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --dry        # here: tiny shapes on the CPU, no CUDA
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

T0 = time.perf_counter()  # the deadline counts from here, before torch is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src"), str(ROOT)]  # no install needed; tests.zoo
# processes started from here (contenders, isolated sections, import checks) find the package too
os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (os.environ.get("PYTHONPATH"), str(ROOT / "src")) if x)

import torch  # noqa: E402

MARGIN_S = 15  # the deadline less this: time to write the results and exit
CHILD_RESULT = "SECTION_RESULT "
# dense bf16 FLOP/s without sparsity, from the datasheets, by a substring of the device's name
PEAKS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
PACKAGES = (
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "accelerate",
    "peft",
    "triton",
    "trl",
    "datasets",
    "pyarrow",
    "torchao",
    "liger-kernel",
    "gguf",
)
IMPORTS = ("trl", "datasets", "torchao.optim", "liger_kernel.transformers")
OPTIONAL_WHEELS = ROOT / ".whl" / "optional"  # torchao: see torchao_setup
TORCHAO_SITE = Path("/tmp/gpu_check_torchao")
TORCHAO_PROBE = (
    "import torchao; from torchao.optim import _AdamW; import transformers.quantizers.auto; "
    "from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict"
)


class SectionTimeout(Exception):
    """A section ran past its budget."""


_SAY_TO = [sys.stdout]  # a section's own process says things on stderr: its stdout carries the result


def say(*parts: object) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}]", *parts, file=_SAY_TO[0], flush=True)


@dataclass
class Context:
    dry: bool
    device: torch.device
    deadline: float  # time.perf_counter() by which everything must be written
    peak_flops: float = float("nan")
    peak_source: str = ""
    imports: dict[str, dict] = field(default_factory=dict)
    torchao: dict = field(default_factory=dict)  # how torchao was made available (torchao_setup)
    section_end: float = float("inf")
    partial: dict = field(default_factory=dict)  # what a section has so far, kept if it then fails

    def left(self) -> float:
        """Seconds left to the current section (its budget or the deadline, whichever is first)."""
        return min(self.deadline, self.section_end) - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def say(self, *parts: object) -> None:
        say(*parts)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    run: Callable[[Context], dict]
    budget_s: float  # on the GPU; the dry run has its own (DRY_BUDGETS)
    min_s: float  # not started with less than this left
    isolated: bool = False  # in a process of its own


# -- 1. environment ------------------------------------------------------------------------------
def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _import_checks(timeout: float) -> dict[str, dict]:
    """Each module imported in a process of its own (all at once), so that a half-working package
    (torchao built for another torch) is recorded without touching this process."""
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", f"import {m}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in IMPORTS
    }
    out = {}
    for m, p in procs.items():
        try:
            _, err = p.communicate(timeout=max(1.0, timeout))
            lines = [x for x in err.splitlines() if x.strip()]
            notes = [x[:300] for x in lines if re.search(r"fail|error|warn", x, re.IGNORECASE)][:4]
            last = lines[-1][:300] if lines else None
            out[m] = {"ok": p.returncode == 0, "stderr": last, "notes": notes}
        except subprocess.TimeoutExpired:
            p.kill()
            out[m] = {"ok": False, "stderr": f"import took over {timeout:.0f} s"}
    return out


def torchao_setup() -> dict:
    """torchao travels apart from the other wheels (.whl/optional): transformers imports it whenever it
    is installed (its torchao quantizer, at model creation), so a build for another torch that fails
    to import would break every model here. It is installed into a folder of its own, tried in a
    process of its own, and put on the path (this process's and its children's) only if it imports."""
    if importlib.util.find_spec("torchao") is not None:
        return {
            "status": "already installed",
            "path": str(Path(importlib.util.find_spec("torchao").origin).parent),
        }
    wheels = sorted(OPTIONAL_WHEELS.glob("torchao-*.whl"))
    if not wheels:
        return {"status": "not installed, no wheel in .whl/optional"}
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade", "--target", str(TORCHAO_SITE), *map(str, wheels)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TORCHAO_SITE), os.environ["PYTHONPATH"]])}
    try:
        installed = subprocess.run(pip, capture_output=True, text=True, timeout=120, check=False)
        if installed.returncode:
            return {"status": "install failed", "stderr": installed.stderr[-1000:]}
        probe = [sys.executable, "-c", TORCHAO_PROBE]
        tried = subprocess.run(probe, capture_output=True, text=True, timeout=180, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        return {"status": f"timed out: {e}"}
    wheel = wheels[-1].name
    if tried.returncode:
        lines = [x for x in tried.stderr.splitlines() if x.strip()]
        return {"status": "unusable: not on the path", "wheel": wheel, "stderr": lines[-6:]}
    sys.path.append(str(TORCHAO_SITE))
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    return {"status": "usable: on the path", "wheel": wheel, "path": str(TORCHAO_SITE)}


def matmul_rate(ctx: Context) -> tuple[float, str]:
    """FLOP/s of a dense matmul on random data: bf16 8192^3 on a GPU (CUDA events), fp32 1024^3 on
    the CPU; three warm-ups, then ten timed."""
    n, dtype = (1024, torch.float32) if ctx.dry else (8192, torch.bfloat16)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    ctx.sync()
    k = 10
    if ctx.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(k):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(k):
            a @ b
        seconds = time.perf_counter() - t
    return 2 * n**3 * k / seconds, f"{str(dtype).removeprefix('torch.')} {n}^3 x {k}"


def set_peak(ctx: Context, name: str, rate: float, how: str) -> None:
    """The datasheet's dense bf16 rate for a device the table knows, else the measured rate."""
    table = next((v for k, v in PEAKS.items() if k in name), None)
    if table:
        ctx.peak_flops, ctx.peak_source = table, f"bf16 dense datasheet figure for {name}"
    else:
        ctx.peak_flops, ctx.peak_source = rate, f"measured {how} matmul (no datasheet figure for this device)"


def rate_text(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _gpu(ctx: Context) -> dict:
    props = torch.cuda.get_device_properties(ctx.device)
    gpu = {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
    }
    query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
    try:
        smi = subprocess.run(query, capture_output=True, text=True, timeout=20, check=False)
        gpu["driver_clock_power"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        gpu["driver_clock_power"] = f"nvidia-smi unavailable: {e}"
    return gpu


def environment(ctx: Context) -> dict:
    import transformers

    out: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers_imported": f"{transformers.__version__} from {Path(transformers.__file__).parent}",
        "criteriapo_from": str(Path(__import__("criteriapo").__file__).parent),
        "packages": {p: _version(p) for p in PACKAGES},
        "cpu_count": os.cpu_count(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torchao_setup": ctx.torchao,
    }
    say("import checks:", ", ".join(IMPORTS))
    ctx.imports = out["imports"] = _import_checks(min(90.0, ctx.left() - 20))
    gpu = out["gpu"] = _gpu(ctx) if ctx.device.type == "cuda" else None
    rate, how = matmul_rate(ctx)
    out["matmul"] = {"flops": rate, "how": how}
    set_peak(ctx, gpu["name"] if gpu else "", rate, how)
    out["peak_flops"], out["peak_source"] = ctx.peak_flops, ctx.peak_source
    missing = [f"{m} ({r['stderr']})" for m, r in out["imports"].items() if not r["ok"]]
    where = (
        f"{gpu['name']}: {gpu['memory_gib']:.0f} GiB, {gpu['sm_count']} SMs, capability {gpu['capability']}, "
        f"driver/max SM clock/power limit {gpu['driver_clock_power']}"
        if gpu
        else f"CPU, {os.cpu_count()} cores (dry run)"
    )
    out["summary"] = [
        (
            f"python {out['python']}, torch {out['torch']} (CUDA {out['cuda']}, cuDNN {out['cudnn']}), "
            f"transformers {out['transformers_imported']}"
        ),
        "",
        where,
        "",
        f"matmul {how}: {rate_text(rate)}; peak used: {rate_text(ctx.peak_flops)} ({ctx.peak_source})",
        "",
        "versions: " + ", ".join(f"{k} {v}" for k, v in out["packages"].items()),
        "",
        "not importable: " + (", ".join(missing) if missing else "none"),
        "",
        f"torchao: {ctx.torchao.get('status')} ({ctx.torchao.get('wheel') or ctx.torchao.get('path') or ''})",
    ]
    return out


# -- the runner ----------------------------------------------------------------------------------
def _sections() -> list[Section]:
    import gpu_attention as att
    import gpu_precision as pr
    import gpu_training as tr

    return [
        Section("environment", "Environment", environment, 60, 10),
        Section("sdpa_backend", "SDPA backend for our mask", att.sdpa_backends, 45, 15, True),
        Section("cudnn_mask_nan", "cuDNN attention with an explicit mask", att.cudnn_mask, 40, 15, True),
        Section("attention", "Attention for a packed pair: mask, flex, split", att.attention, 110, 30, True),
        Section("precision", "Our log-probs against the models' own", pr.precision, 90, 20),
        Section("dpo_3b", "3B full-parameter DPO: memory and speed", tr.dpo_3b, 150, 45),
        Section("ours_vs_trl", "Ours against TRL, Llama 3.2 1B, 2048 tokens", tr.ours_vs_trl, 300, 45),
    ]


DRY_BUDGETS = {"attention": 150, "precision": 240, "dpo_3b": 240, "ours_vs_trl": 300}


def _alarm(_signum, _frame):
    raise SectionTimeout("the section ran past its time budget")


def _error(e: BaseException) -> dict:
    lines = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines()
    return {"type": type(e).__name__, "message": str(e)[:2000], "traceback": lines[-25:]}


def _run_here(section: Section, ctx: Context, seconds: float) -> dict:
    ctx.section_end = time.perf_counter() + seconds
    ctx.partial = {}
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        out = section.run(ctx)
        return {"status": out.pop("status", "ok"), **out}
    except Exception as e:  # noqa: BLE001 -- a section's failure, its timeout included, is recorded, not raised
        say(f"{section.key}: {type(e).__name__}: {str(e)[:300]}")
        status = "error: time" if isinstance(e, SectionTimeout) else "error"
        return {"status": status, "error": _error(e), **({"partial": ctx.partial} if ctx.partial else {})}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        ctx.section_end = float("inf")


def _run_isolated(section: Section, ctx: Context, seconds: float) -> dict:
    """The section in a process of its own: a kernel that breaks the CUDA context (an illegal memory
    access is sticky) or a crash takes only this section with it."""
    cmd = [sys.executable, __file__, "--child", section.key, "--budget", f"{seconds - 5:.0f}"]
    cmd += ["--dry"] if ctx.dry else []
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=seconds, check=False)
    except subprocess.TimeoutExpired:
        message = f"its process ran past {seconds:.0f} s"
        return {
            "status": "error: time",
            "error": {"type": "TimeoutExpired", "message": message, "traceback": []},
        }
    line = next((x for x in r.stdout.splitlines() if x.startswith(CHILD_RESULT)), None)
    if line is None:
        message = f"the section's process ended with code {r.returncode} and no result (stderr above)"
        tail = r.stdout.splitlines()[-20:]
        return {"status": "error", "error": {"type": "ChildFailed", "message": message, "traceback": tail}}
    return json.loads(line.removeprefix(CHILD_RESULT))


def run_section(section: Section, ctx: Context) -> dict:
    budget = DRY_BUDGETS.get(section.key, 120) if ctx.dry else section.budget_s
    left = ctx.deadline - time.perf_counter()
    if left < section.min_s:
        return {
            "status": "skipped: time",
            "reason": f"{left:.0f} s left of the deadline, needs {section.min_s}",
        }
    seconds = min(budget, left)
    say(f"{section.key}: start (budget {seconds:.0f} s{', own process' if section.isolated else ''})")
    t0 = time.perf_counter()
    result = _run_isolated(section, ctx, seconds) if section.isolated else _run_here(section, ctx, seconds)
    result["seconds"] = time.perf_counter() - t0
    if result["status"] == "ok" and '"skipped: time"' in json.dumps(result, default=str):
        result["status"] = "ok, partly skipped for time"
    if ctx.device.type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 -- a broken context: the next sections record their own errors
            result["cleanup_error"] = repr(e)[:300]
    say(f"{section.key}: {result['status']} in {result['seconds']:.1f} s")
    return result


def slug(ctx: Context) -> str:
    if ctx.dry:
        return "cpu-dry"
    name = torch.cuda.get_device_name(ctx.device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def markdown(report: dict, titles: dict[str, str]) -> str:
    meta = report["meta"]
    dry = " (dry run on the CPU)" if meta["dry"] else ""
    lines = [
        f"# GPU check: {meta['device_name']}{dry}",
        "",
        (
            f"Started {meta['started']}, deadline {meta['deadline_s']:.0f} s, {meta.get('elapsed_s', 0):.0f} "
            f"s so far. Command: `{meta['command']}`"
        ),
        "",
    ]
    for i, (key, r) in enumerate(report["sections"].items(), 1):
        lines += [f"## {i}. {titles.get(key, key)}: {r['status']} ({r.get('seconds', 0):.1f} s)", ""]
        if "error" in r:
            err = r["error"]
            lines += [
                f"**{err['type']}**: {err['message'][:500]}",
                "",
                "```",
                *err["traceback"][-8:],
                "```",
                "",
            ]
        if "partial" in r:
            lines += ["What it had measured before that is in the JSON (`partial`).", ""]
        if r.get("reason"):
            lines += [r["reason"], ""]
        lines += [*r.get("summary", []), ""]
    return "\n".join(lines).rstrip() + "\n"


def write(report: dict, titles: dict[str, str], stem: Path) -> None:
    """The JSON and markdown reports, each replaced whole; copied into $OUT when that is set."""
    report["meta"]["elapsed_s"] = time.perf_counter() - T0
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    texts = [json.dumps(report, indent=2, default=str) + "\n", markdown(report, titles)]
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, Path(out) / path.name)


def _child(key: str, budget: float, dry: bool) -> None:
    """Run one section (``_run_isolated``'s process) and print its result as one line."""
    _SAY_TO[0] = sys.stderr
    ctx = Context(dry, torch.device("cpu" if dry else "cuda"), time.perf_counter() + budget)
    section = next(s for s in _sections() if s.key == key)
    result = _run_here(section, ctx, budget)
    print(CHILD_RESULT + json.dumps(result, default=str), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: everything but CUDA")
    p.add_argument("--deadline", type=float, default=None, help="seconds for everything (480; dry 900)")
    p.add_argument("--only", default=None, help="comma-separated section keys (the others are not run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)  # one section, in its own process
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --dry for the CPU")
    if args.child:
        return _child(args.child, args.budget, args.dry)
    deadline = args.deadline or (900.0 if args.dry else 480.0)
    ctx = Context(args.dry, torch.device("cpu" if args.dry else "cuda"), T0 + deadline - MARGIN_S)
    sections = _sections()
    wanted = set(args.only.split(",")) if args.only else {s.key for s in sections}
    titles = {s.key: s.title for s in sections}
    report = {
        "meta": {
            "dry": args.dry,
            "device_name": "cpu" if args.dry else torch.cuda.get_device_name(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "deadline_s": deadline,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "sections": {},
    }
    stem = Path(args.out) / f"gpu_check-{slug(ctx)}"
    say(f"writing {stem}.{{json,md}}; deadline {deadline:.0f} s")
    ctx.torchao = torchao_setup()  # before anything imports transformers
    say(f"torchao: {ctx.torchao['status']}")
    if "environment" not in wanted:  # the later sections read the peak and what imports
        ctx.imports = _import_checks(60)
        set_peak(ctx, "" if args.dry else torch.cuda.get_device_name(), *matmul_rate(ctx))
    for s in sections:
        if s.key in wanted:
            report["sections"][s.key] = run_section(s, ctx)
            write(report, titles, stem)
    ok = sum(r["status"] == "ok" for r in report["sections"].values())
    say(f"done: {ok}/{len(report['sections'])} sections ok in {time.perf_counter() - T0:.0f} s")
    print(markdown(report, titles), flush=True)


if __name__ == "__main__":
    main()
