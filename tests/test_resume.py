"""Exact resume across processes, with the real CLI on a tiny model. A run is killed with SIGKILL at
a step, or half way through writing, publishing or deleting a checkpoint, then resumed with
``--resume``: its final weights and every logged loss are bit-identical to those of a run never
stopped. SIGTERM stops a run cleanly with a checkpoint. A fresh start over an unfinished run, and a
resume with another config, are refused. A run folder has one owner at a time, and a finished run
is replaced only with --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from criteriapo.fsutil import RUN_LOCK
from tests.helpers import write_jsonl

U = {"role": "user", "content": "Name a colour."}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("resume")
    sft = write_jsonl(
        root / "sft.jsonl",
        [{"messages": [U, {"role": "assistant", "content": f"Blue number {i}."}]} for i in range(12)],
    )
    pairs = write_jsonl(
        root / "pairs.jsonl",
        [{"prompt": U["content"], "chosen": f"Green {i}.", "rejected": f"No {i}!"} for i in range(8)],
    )
    common = [
        f"model.name_or_path={tiny_llama_dir}",
        f"sft.data.train={sft}",
        f"dpo.data.train={pairs}",
        f"dpo.data.eval={pairs}",
        "sft.train.batch_size=2",
        "dpo.train.batch_size=2",
        "sft.train.checkpoint_every=1",
        "dpo.train.checkpoint_every=1",
        "sft.optim.lr=1e-3",
        "dpo.optim.lr=1e-3",
        "tracking.progress=false",
        "tracking.plots=false",
    ]
    return root, common


def cli(args: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CRITERIAPO_FAILPOINT"}
    env["COLUMNS"] = "500"  # messages on one line
    if failpoint:
        env["CRITERIAPO_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "criteriapo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def logged(run_dir: Path) -> list[dict]:
    """Every metrics line but the timings."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert logged(a) == logged(b)  # every step's metrics once, eval rows included, equal


@pytest.fixture(scope="module")
def sft_baseline(setup):
    root, common = setup
    r = cli(["sft", *common, f"output_dir={root / 'baseline'}"])
    assert r.returncode == 0, r.stderr
    run = root / "baseline" / "sft"
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    return run


@pytest.mark.parametrize(
    "failpoint",
    ["step:2", "step:6", "checkpoint-write:3", "checkpoint-publish:4", "checkpoint-rotate:2"],
)
def test_sft_killed_then_resumed_ends_bit_identical(setup, sft_baseline, failpoint):
    root, common = setup
    out = root / failpoint.replace(":", "-")
    args = ["sft", *common, f"output_dir={out}"]
    killed = cli(args, failpoint)
    assert killed.returncode == -9, killed.stderr
    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert_identical(sft_baseline, out / "sft")


def test_sigterm_stops_with_a_checkpoint_and_resume_goes_on(setup, sft_baseline):
    root, common = setup
    out = root / "sigterm"
    args = ["sft", *common, f"output_dir={out}", "sft.train.checkpoint_every=null"]
    stopped = cli(args, "step:3:SIGTERM")
    assert stopped.returncode == 130
    assert "stopped by SIGTERM after step 3 of 6" in stopped.stderr and "--resume" in stopped.stderr
    assert sorted(p.name for p in (out / "sft" / "checkpoints").iterdir()) == ["step-00000003"]
    fresh = cli(args)  # forgetting --resume must not bury the interrupted run
    assert fresh.returncode == 2 and "holds an unfinished run (step 3 of 6)" in fresh.stderr
    changed = cli([*args, "sft.optim.lr=2e-3", "--resume"])
    assert changed.returncode == 2
    assert "config differs from the run's: sft.optim.lr: 0.001 then, 0.002 now" in changed.stderr
    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(sft_baseline, out / "sft")


@pytest.fixture(scope="module")
def pipeline_baseline(setup):
    root, common = setup
    r = cli(["pipeline", *common, f"output_dir={root / 'pipe-baseline'}"])
    assert r.returncode == 0, r.stderr
    return root / "pipe-baseline"


# all in DPO (after SFT's 6 steps); the last dies deleting an old checkpoint after the final one was
# written, so the resumed run only evaluates and exports
@pytest.mark.parametrize("failpoint", ["step:8", "checkpoint-write:9", "checkpoint-rotate:6"])
def test_pipeline_killed_in_dpo_then_resumed_ends_bit_identical(setup, pipeline_baseline, failpoint):
    root, common = setup
    out = root / f"pipe-{failpoint.replace(':', '-')}"
    args = ["pipeline", *common, f"output_dir={out}"]
    killed = cli(args, failpoint)
    assert killed.returncode == -9, killed.stderr
    assert (out / "sft" / "model").is_dir() and not (out / "dpo" / "model").exists()
    # the finished SFT stage kept no checkpoint: its record alone makes the resumed run reuse it
    assert not (out / "sft" / "checkpoints").exists() and (out / "sft" / "finished.json").is_file()
    sft_weights = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "finished before" in resumed.stderr
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_weights  # not redone
    assert_identical(pipeline_baseline / "sft", out / "sft")
    assert_identical(pipeline_baseline / "dpo", out / "dpo")


# each method's own metric shows in its log; KTO reads the pairs file split in two
METHOD_METRIC = {"orpo": "log_odds_ratio", "kto": '"kl"'}


@pytest.fixture(scope="module")
def method_baselines(setup):
    """A never-stopped run per method, made on first use."""
    root, common = setup
    runs: dict[str, Path] = {}

    def baseline(method: str) -> Path:
        if method not in runs:
            r = cli([method, *common, f"output_dir={root / f'{method}-baseline'}"])
            assert r.returncode == 0, r.stderr
            run = root / f"{method}-baseline" / method
            assert METHOD_METRIC[method] in (run / "metrics.jsonl").read_text()
            runs[method] = run
        return runs[method]

    return baseline


@pytest.mark.parametrize(
    "method, failpoint",
    [("orpo", "step:2"), ("orpo", "checkpoint-publish:3"), ("kto", "step:5"), ("kto", "checkpoint-write:3")],
)
def test_orpo_and_kto_killed_then_resumed_end_bit_identical(setup, method_baselines, method, failpoint):
    root, common = setup
    baseline = method_baselines(method)
    out = root / f"{method}-{failpoint.replace(':', '-')}"
    args = [method, *common, f"output_dir={out}"]
    killed = cli(args, failpoint)
    assert killed.returncode == -9, killed.stderr
    resumed = cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert_identical(baseline, out / method)


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_second_run_into_a_busy_folder_stops_at_once_naming_the_first(setup, sft_baseline):
    """Two runs into one output_dir: the second is refused before it writes anything, and the first
    finishes as if alone."""
    root, common = setup
    out = root / "busy"
    args = ["sft", *common, f"output_dir={out}"]
    env = {**os.environ, "CRITERIAPO_FAILPOINT": "step:2:SIGSTOP", "COLUMNS": "500"}
    first = subprocess.Popen(
        [sys.executable, "-m", "criteriapo", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        for _ in range(3000):  # paused after its second step, holding the folder
            if first.poll() is not None or _stopped(first.pid):
                break
            time.sleep(0.1)
        assert _stopped(first.pid)
        second = cli([*args, "sft.optim.lr=2e-3"])
        assert second.returncode == 2, second.stderr
        assert f"{out} is in use by another run (pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=600)
    assert first.returncode == 0
    assert_identical(sft_baseline, out / "sft")  # the first run's weights and metrics, nothing else
    assert not (out / RUN_LOCK).exists()


def test_a_finished_run_is_replaced_only_when_asked(setup, sft_baseline):
    root, common = setup
    out = root / "finished"
    args = ["sft", *common, f"output_dir={out}"]
    assert cli(args).returncode == 0
    weights = (out / "sft" / "model" / "model.safetensors").read_bytes()
    files = sorted(p.name for p in (out / "sft").iterdir())
    assert "checkpoints" not in files and "finished.json" in files  # keep_final_checkpoint: false
    again = cli([*args, "sft.optim.lr=2e-3"])
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"{out / 'sft'} holds a finished run" in again.stderr and "--overwrite" in again.stderr
    assert (out / "sft" / "model" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (out / "sft").iterdir()) == files
    replaced = cli([*args, "sft.optim.lr=2e-3", "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "sft" / "model" / "model.safetensors").read_bytes() != weights


def test_output_dir_naming_a_file_is_a_message(setup, tmp_path):
    _, common = setup
    taken = tmp_path / "a-file"
    taken.write_text("mine\n")
    r = cli(["sft", *common, f"output_dir={taken}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"output folder {taken} is a file, not a folder" in r.stderr
    assert taken.read_text() == "mine\n"


def test_a_run_refused_by_its_checks_leaves_no_folder(setup, tmp_path):
    _, common = setup
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q?", "chosen": "same", "rejected": "same"}])
    out = tmp_path / "refused"
    r = cli(["dpo", *common, f"dpo.data.train={bad}", "dpo.data.eval=[]", f"output_dir={out}"])
    assert r.returncode == 2 and "identical to chosen" in r.stderr
    assert not out.exists()


def test_a_finished_stage_is_reused_on_resume_only_when_it_is_the_same_run(setup, tmp_path):
    _, common = setup
    out = tmp_path / "done"
    args = ["sft", *common, f"output_dir={out}"]
    assert cli(args).returncode == 0
    stamp = (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    again = cli([*args, "--resume"])
    assert again.returncode == 0 and "finished before" in again.stderr
    assert (out / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    changed = cli([*args, "sft.optim.lr=2e-3", "--resume"])
    assert changed.returncode == 2
    assert f"cannot resume from {out / 'sft' / 'finished.json'}: the config differs" in changed.stderr
    kept = tmp_path / "kept"
    assert cli(["sft", *common, f"output_dir={kept}", "sft.train.keep_final_checkpoint=true"]).returncode == 0
    assert "step-00000006" in {p.name for p in (kept / "sft" / "checkpoints").iterdir()}  # the final one
