"""A run folder's lock: held by one process, stale when its owner is gone, cleaned up on the way out;
and the one atomic way a folder is written."""

from __future__ import annotations

import json
import logging
import os

import pytest

from criteriapo.fsutil import RUN_LOCK, FolderInUse, atomic_dir, run_lock


def test_the_lock_names_its_owner_and_goes_with_the_run(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        owner = json.loads((out / RUN_LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] and owner["command"]
        (out / "kept.txt").write_text("x")
    assert not (out / RUN_LOCK).exists() and (out / "kept.txt").exists()


def test_a_refused_run_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(RuntimeError), run_lock(out):
        raise RuntimeError("a check failed")
    assert not out.exists()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = {"pid": 999999, "host": "elsewhere", "started": "2026-01-01T00:00:00", "command": "criteriapo sft"}
    (out / RUN_LOCK).write_text(json.dumps(dead))  # no process holds it: its owner was killed
    with caplog.at_level(logging.WARNING), run_lock(out):
        assert json.loads((out / RUN_LOCK).read_text())["pid"] == os.getpid()
    assert "taking over a stale lock (pid 999999 on elsewhere" in caplog.text


def test_a_held_lock_refuses_a_second_owner(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        pid = os.fork()
        if pid == 0:  # another process: flock locks belong to open files, so it must be refused
            try:
                with run_lock(out):
                    os._exit(1)
            except FolderInUse as e:
                os._exit(0 if f"pid {os.getppid()}" in str(e) else 3)
            os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_an_atomic_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not dest.exists()  # nothing shows until the block ends
    assert (dest / "a.txt").read_text() == "first"
    with pytest.raises(OSError, match="disk full"), atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("half")
        raise OSError("disk full")
    assert (dest / "a.txt").read_text() == "first"  # the old folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
    with atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
