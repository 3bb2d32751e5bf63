"""Checkpoints in one process: exact round trip, rotation, broken and partial checkpoints passed
over, refusal to resume with other data or config, real write failures, SIGTERM, skipped NaN steps."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import subprocess

import pytest
import torch

from criteriapo.config import TrainConfig
from criteriapo.errors import Interrupted
from criteriapo.export import ExportError, ModelCard, export_model
from criteriapo.tracking.loggers import Loggers
from criteriapo.train.checkpoint import Checkpointer, CheckpointError, fingerprint
from criteriapo.train.loop import NonFiniteError
from tests.train.test_loop import dpo_trainer, tiny_model, toy_pairs

RUN = {"config": {"dpo": {"beta": 0.1, "optim": {"lr": 1e-3}}}, "data": "abc", "examples": 16}


def trainer_with(folder, every=1, keep=2, run=RUN, **kw):
    t = dpo_trainer(tiny_model(), toy_pairs(16), micro=4, epochs=2, **kw)
    t.checkpointer = Checkpointer(folder, run, every=every, keep=keep)
    t.extra_state = {"ref.chosen.logps": torch.arange(4.0)}
    return t


def assert_same_weights(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def steps(t, n):
    for _ in range(n):
        t.train_step(t.order.next_batch(8))
        t.save_checkpoint()


def test_restored_trainer_continues_bit_identically_and_old_checkpoints_rotate(tmp_path):
    straight = trainer_with(tmp_path / "a")
    steps(straight, 3)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-00000002", "step-00000003"]
    resumed = trainer_with(tmp_path / "a")
    latest = resumed.checkpointer.latest()
    assert latest.step == 3
    extra = resumed.checkpointer.restore(resumed, latest)
    assert torch.equal(extra["ref.chosen.logps"], torch.arange(4.0))
    assert resumed.state == straight.state and resumed.last_metrics == straight.last_metrics
    assert resumed.order.state_dict() == straight.order.state_dict()
    for _ in range(2):  # into the second epoch
        m1 = straight.train_step(straight.order.next_batch(8))
        m2 = resumed.train_step(resumed.order.next_batch(8))
        assert m1["loss"] == m2["loss"]
    assert_same_weights(straight.model, resumed.model)


def test_broken_and_partial_checkpoints_are_passed_over(tmp_path, caplog):
    t = trainer_with(tmp_path, keep=3)
    steps(t, 3)
    model_file = tmp_path / "step-00000003" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit-pattern in the weights: same size, wrong checksum
    model_file.write_bytes(bytes(data))
    (tmp_path / "step-00000002" / "optimizer.safetensors").unlink()
    (tmp_path / ".tmp-step-00000004-999").mkdir()  # a write killed half way
    (tmp_path / "step-00000005").mkdir()  # renamed in place by hand, no manifest
    with caplog.at_level(logging.WARNING):
        latest = t.checkpointer.latest()
    assert latest.step == 1
    text = caplog.text
    assert "step-00000003: model.safetensors does not match its checksum" in text
    assert "step-00000002: optimizer.safetensors is missing" in text
    assert "step-00000005: no manifest.json" in text
    assert not (tmp_path / ".tmp-step-00000004-999").exists()


def test_resuming_with_other_data_or_config_is_refused_with_what_differs(tmp_path):
    t = trainer_with(tmp_path)
    steps(t, 1)
    ck = t.checkpointer.latest()
    other = {**RUN, "config": {"dpo": {"beta": 0.2, "optim": {"lr": 1e-3}}}}
    with pytest.raises(CheckpointError, match=r"config differs.*dpo.beta: 0.1 then, 0.2 now"):
        Checkpointer(tmp_path, other).check_compatible(ck)
    Checkpointer(tmp_path, other).check_compatible(ck, free_keys=("dpo.beta",))  # a free key may change
    with pytest.raises(CheckpointError, match=r"training data differ.*16 examples then, 15 now"):
        Checkpointer(tmp_path, {**RUN, "data": "abd", "examples": 15}).check_compatible(ck)
    # a setting added to the config since the checkpoint was written is not a difference
    newer = {**RUN, "config": {"dpo": {"beta": 0.1, "optim": {"lr": 1e-3}, "train": {"packing": True}}}}
    Checkpointer(tmp_path, newer).check_compatible(ck)
    # a setting the checkpoint has and this version does not (renamed, as mixed_precision was)
    older = {**RUN, "config": {"dpo": {"optim": {"lr": 1e-3}}}}
    with pytest.raises(CheckpointError, match=r"dpo.beta: 0.1 then, a setting this version no longer has"):
        Checkpointer(tmp_path, older).check_compatible(ck)


def test_fingerprint_sees_tokens_and_weights_not_file_names():
    pairs = toy_pairs(4)
    moved = [dataclasses.replace(p, source=None) for p in pairs]
    assert fingerprint(pairs) == fingerprint(moved)
    assert fingerprint(pairs) != fingerprint([dataclasses.replace(pairs[0], weight=2.0), *pairs[1:]])
    assert fingerprint(pairs) != fingerprint(pairs[::-1])


def _limit_file_size(limit):
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    return old


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    t = trainer_with(tmp_path)
    steps(t, 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-00000001").iterdir()}
    t.train_step(t.order.next_batch(8))
    old = _limit_file_size(4096)  # writes past 4 KiB fail with EFBIG, as on a full disk
    try:
        with pytest.raises(
            CheckpointError, match=r"step-00000002: .*File too large.*step-00000001 is intact"
        ):
            t.save_checkpoint()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # nothing half-written left
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-00000001").iterdir()} == before
    assert t.checkpointer.latest().step == 1


def test_permission_denied_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    t = trainer_with(tmp_path)
    steps(t, 1)
    t.train_step(t.order.next_batch(8))
    if subprocess.run(["chattr", "+i", str(tmp_path)], check=False, capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(CheckpointError, match=r"Operation not permitted.*step-00000001 is intact"):
            t.save_checkpoint()
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
    assert t.checkpointer.latest().step == 1


def test_disk_full_while_exporting_keeps_the_previous_model_folder(tmp_path, tiny_llama_dir):
    from criteriapo.models import load_model, load_tokenizer

    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    card = ModelCard("m", "tiny", "SFT", [], {})
    out = export_model(model, tok, tmp_path / "model", card)
    before = (out / "model.safetensors").read_bytes()
    old = _limit_file_size(64 * 1024)
    try:
        with pytest.raises(ExportError, match=r"could not write the model folder .*too large.*untouched"):
            export_model(model, tok, tmp_path / "model", card)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


class _SignalAt:
    """A metric logger that sends this process a signal when a given step is logged."""

    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def log(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), self.sig)

    def close(self):
        pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_to_resume_from(tmp_path, sig):
    straight = trainer_with(tmp_path / "straight", every=None)
    straight.train()
    stopped = trainer_with(tmp_path / "stopped", every=None)
    stopped.loggers = Loggers([_SignalAt(2, sig)])
    handler = signal.getsignal(sig)
    with pytest.raises(Interrupted, match=rf"stopped by {sig.name} after step 2 of 4.*--resume"):
        stopped.train()
    assert signal.getsignal(sig) is handler  # the user's handlers are back
    resumed = trainer_with(tmp_path / "stopped", every=None)
    resumed.checkpointer.restore(resumed, resumed.checkpointer.latest())
    assert resumed.state.step == 2
    resumed.train()
    assert_same_weights(straight.model, resumed.model)


def _poison(model, pairs):
    with torch.no_grad():
        model.model.embed_tokens.weight[pairs[0].prompt_ids[0]] = float("nan")


def test_non_finite_steps_are_skipped_when_asked_and_training_goes_on(caplog):
    pairs = toy_pairs(16)
    t = dpo_trainer(tiny_model(), pairs, micro=4, epochs=2)
    t.cfg = TrainConfig(batch_size=8, micro_batch_size=4, epochs=2, on_nonfinite="skip")
    clean = {k: v.clone() for k, v in t.model.state_dict().items()}
    _poison(t.model, pairs)
    poisoned = {k: v.clone() for k, v in t.model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        m = t.train_step(list(range(8)))
    assert "step 1: loss nan" in caplog.text and "toy, row 1" in caplog.text and "Skipped" in caplog.text
    assert m["skipped_steps"] == 1.0 and t.state.step == 1 and t.state.skipped == 1
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, poisoned[k], equal_nan=True)  # no update at all
    t.model.load_state_dict(clean)  # the bad row fixed: the next steps train normally
    m = t.train_step(list(range(8, 16)))
    assert torch.isfinite(torch.tensor(m["loss"])) and t.state.step == 2 and t.state.skipped == 1
    assert any(not torch.equal(v, clean[k]) for k, v in t.model.state_dict().items())


def test_non_finite_stop_names_the_last_checkpoint(tmp_path):
    pairs = toy_pairs(16)
    t = trainer_with(tmp_path)
    steps(t, 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-00000001").iterdir()}
    _poison(t.model, pairs)
    with pytest.raises(NonFiniteError, match=r"step 2: .*The last checkpoint is .*step-00000001"):
        t.train_step(list(range(8)))
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-00000001").iterdir()} == before


def test_optimizer_settings_come_back_exactly(tmp_path):
    t = trainer_with(tmp_path)
    steps(t, 2)
    r = trainer_with(tmp_path)
    r.checkpointer.restore(r, r.checkpointer.latest())
    a, b = t.optimizer.state_dict(), r.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_a_checkpoint_keeps_the_tasks_reference_and_the_evaluation_returns_its_scores(tmp_path):
    """The precomputed reference is the task's state, saved by the loop with every checkpoint and
    read back by the stage on resume; the final evaluation returns the trained model's scores of
    every eval pair, in pair order (the "after" figures)."""
    from criteriapo.stages.preference import saved_scores
    from criteriapo.train.scores import score_pairs
    from tests.train.test_loop import PAD

    pairs = toy_pairs(16)
    t = dpo_trainer(tiny_model(), pairs, micro=4, epochs=1)
    t.checkpointer = Checkpointer(tmp_path / "ck", RUN, every=1, keep=1)
    t.train()
    saved = saved_scores(t.checkpointer.latest())
    assert set(saved) == {"train"}  # one task trains and evaluates: its reference is saved once
    for side in ("chosen", "rejected"):
        want = getattr(t.task.reference, side)
        assert torch.equal(getattr(saved["train"], side).logps, want.logps)
        assert torch.equal(getattr(saved["train"], side).tokens, want.tokens)
    after = score_pairs(t.model, pairs, PAD)
    torch.testing.assert_close(t.eval_scores.chosen.logps, after.chosen.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.eval_scores.rejected.logps, after.rejected.logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(t.eval_scores.chosen.tokens, after.chosen.tokens)
    assert not torch.allclose(t.eval_scores.margins, t.task.reference.margins)  # trained, not the start
