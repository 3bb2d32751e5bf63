"""Chat as a person uses it, in a real process: Ctrl-C (SIGINT) stops the reply being streamed and
the session goes on with its history; slash commands; a blank line does nothing."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time


class _Output:
    """A process's stdout as it comes."""

    def __init__(self, proc: subprocess.Popen):
        self.fd, self.text = proc.stdout.fileno(), ""

    def wait_for(self, marker: str, after: int = 0, timeout: float = 300) -> int:
        """The index just past the first ``marker`` at or after ``after``, reading until it appears."""
        deadline = time.monotonic() + timeout
        while (at := self.text.find(marker, after)) < 0:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.text!r}"
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if ready:
                chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                assert chunk, f"the chat ended early: {self.text!r}"
                self.text += chunk
        return at + len(marker)


def test_ctrl_c_stops_the_reply_and_the_conversation_goes_on(smollm2_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "500"}
    # SIGINT as a terminal gives it. Tests started in a shell's background inherit SIGINT ignored, an
    # ignored signal stays ignored in a child, and Python then never raises KeyboardInterrupt; a
    # handled one is back to its default action in the child, where Python installs its own handler.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "criteriapo", "chat", "smollm2", "--max-new-tokens", "400"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        proc.stdin.write(b"Tell me a very long story about a dragon and a knight.\n")
        proc.stdin.flush()
        out = _Output(proc)
        at = out.wait_for("assistant: ")
        out.wait_for(" ", at)  # a few words of the reply are out: it is streaming
        proc.send_signal(signal.SIGINT)
        out.wait_for("you:", out.wait_for("(stopped)", at))  # the reply ends marked, back at the prompt
        proc.stdin.write(b"\n/system Answer in one word.\n/nonsense\nWhat colour is the sky?\n/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.text + rest.decode()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert text.count("assistant:") == 2  # the second question was answered after the stop
    assert "(system message set)" in text and "(unknown command /nonsense" in text
