"""A server running in this process (uvicorn in a thread) on a free port of 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def chatty_model(smollm2_tokenizer):
    """A random Llama with the embedded tokenizer whose replies depend on the prompt and say text."""
    import torch

    from tests.zoo import zoo_model

    torch.manual_seed(0)
    return zoo_model("llama", vocab_size=len(smollm2_tokenizer), initializer_range=0.5, init_std=0.5).eval()
