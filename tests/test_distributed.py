"""FSDP2 under torchrun, on CPU with the gloo backend and 2 processes: SFT then DPO trains like one
process with the same global batch (each process takes half), exports one whole model from rank 0,
and a run killed mid-DPO resumes under 2 processes to the same weights as a run never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import write_jsonl

U = {"role": "user", "content": "Name a colour."}
# float sums in another order (two half-batches reduced over gloo instead of one accumulation): the
# losses agree to 1e-7 here; Adam's normalised steps turn rounding in near-zero gradients into weight
# differences of a small fraction of the learning rate (1e-3), measured up to 7.5e-6
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 5e-5


@pytest.fixture(scope="module")
def common(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("dist")
    sft = write_jsonl(
        root / "sft.jsonl",
        [{"messages": [U, {"role": "assistant", "content": f"Blue number {i}."}]} for i in range(12)],
    )
    pairs = write_jsonl(
        root / "pairs.jsonl",
        [{"prompt": U["content"], "chosen": f"Green {i}.", "rejected": f"No {i}!"} for i in range(8)],
    )
    return root, [
        f"model.name_or_path={tiny_llama_dir}",
        f"sft.data.train={sft}",
        f"dpo.data.train={pairs}",
        f"dpo.data.eval={pairs}",
        "sft.train.batch_size=4",
        "sft.train.micro_batch_size=2",
        "dpo.train.batch_size=4",
        "dpo.train.micro_batch_size=2",
        "sft.train.checkpoint_every=1",
        "dpo.train.checkpoint_every=1",
        "sft.optim.lr=1e-3",
        "dpo.optim.lr=1e-3",
        "tracking.progress=false",
        "tracking.plots=false",
    ]


def run(args: list[str], nproc: int, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CRITERIAPO_FAILPOINT"}
    env.update({"COLUMNS": "500", "OMP_NUM_THREADS": "1"})
    if failpoint:
        env["CRITERIAPO_FAILPOINT"] = failpoint
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "criteriapo"]
        if nproc > 1
        else ["-m", "criteriapo"]
    )
    return subprocess.run(
        [sys.executable, *launcher, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(common):
    root, args = common
    out = {}
    for nproc in (1, 2):
        r = run(["pipeline", *args, f"output_dir={root / f'p{nproc}'}"], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        out[nproc] = root / f"p{nproc}"
    return out


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_train_like_one_with_the_same_global_batch(runs, stage):
    one, two = losses(runs[1] / stage), losses(runs[2] / stage)
    assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    w1, w2 = weights(runs[1] / stage), weights(runs[2] / stage)
    assert w1.keys() == w2.keys()  # one whole model, exported by rank 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


def test_a_two_process_run_killed_in_dpo_resumes_to_the_same_weights(common, runs):
    root, args = common
    out = root / "killed"
    cmd = ["pipeline", *args, f"output_dir={out}"]
    killed = run(cmd, 2, "step:5")  # SFT takes 3 steps: killed after DPO's second
    assert killed.returncode != 0 and not (out / "dpo" / "model").exists()
    ck = json.loads((out / "dpo" / "checkpoints" / "step-00000001" / "trainer.json").read_text())
    assert ck["layout"] == "sharded" and ck["processes"] == 2
    resumed = run([*cmd, "--resume"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out / "dpo") == losses(runs[2] / "dpo")
    w, want = weights(out / "dpo"), weights(runs[2] / "dpo")
    for k in want:
        assert torch.equal(w[k], want[k]), k


def test_lora_dpo_with_the_adapters_off_reference_matches_one_process(common):
    """LoRA under FSDP2, the reference being the sharded policy with its adapters off; export merged."""
    root, args = common
    lora = ["dpo.lora.enabled=true", "dpo.precompute_ref_log_probs=false"]
    for nproc in (1, 2):
        r = run(["dpo", *args, *lora, f"output_dir={root / f'lora{nproc}'}"], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(root / "lora1" / "dpo"), losses(root / "lora2" / "dpo")
    assert len(one) == 2 and [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    w1, w2 = weights(root / "lora1" / "dpo"), weights(root / "lora2" / "dpo")
    assert w1.keys() == w2.keys() and not any("lora" in k for k in w1)  # merged into full weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_under_two_processes_train_like_one(common, method):
    """KTO's KL estimate is summed over every micro-batch and process of a step, so two processes
    (and micro-batches of 2 in a batch of 4) train as one batch does."""
    root, args = common
    for nproc in (1, 2):
        r = run([method, *args, f"output_dir={root / f'{method}{nproc}'}"], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(root / f"{method}1" / method), losses(root / f"{method}2" / method)
    assert len(one) >= 2 and [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    w1, w2 = weights(root / f"{method}1" / method), weights(root / f"{method}2" / method)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
