"""``criteriapo serve`` in a real process: it listens on 127.0.0.1, answers, and stops on Ctrl-C;
it refuses to listen beyond this machine without an API key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_on_localhost_and_stops_on_ctrl_c(tiny_llama_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "criteriapo",
            "serve",
            str(tiny_llama_dir),
            "--port",
            str(port),
            "--name",
            "t",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CRITERIAPO_API_KEY": ""},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        asked = {"model": "t", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=asked, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out


def test_serve_refuses_an_open_port_without_a_key(tiny_llama_dir):
    r = subprocess.run(
        [sys.executable, "-m", "criteriapo", "serve", str(tiny_llama_dir), "--host", "0.0.0.0"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "500", "CRITERIAPO_API_KEY": ""},  # an empty key is no key
        timeout=120,
    )
    assert r.returncode == 2
    assert "lets other machines reach the server: give it an API key" in r.stderr
