"""Start the server: load the model once, batch requests on it, listen on 127.0.0.1 by default."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from criteriapo.errors import ConfigError
from criteriapo.serve.app import Limits, build_app
from criteriapo.serve.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    limits: Limits = field(default_factory=Limits)
    name: str | None = None  # the model's id in the API; default: the name it was loaded by


def check_options(opts: ServeOptions) -> None:
    """Refuse what would serve badly: numbers out of range, or a port others can reach without a key."""
    if not 0 < opts.port < 65536:
        raise ConfigError(f"--port {opts.port}: choose a port from 1 to 65535")
    for name, value in (
        ("--max-batch", opts.max_batch),
        ("--max-queue", opts.max_queue),
        ("--max-tokens", opts.limits.max_tokens),
        ("--max-prompt-tokens", opts.limits.max_prompt_tokens),
        ("--max-body-bytes", opts.limits.max_body_bytes),
    ):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    if opts.api_key is None and not _loopback(opts.host):
        raise ConfigError(
            f"--host {opts.host} lets other machines reach the server: give it an API key "
            "(--api-key, or the CRITERIAPO_API_KEY environment variable), or serve on 127.0.0.1"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_spec: str, opts: ServeOptions, dtype: str = "auto", device: str = "auto") -> None:
    """Load ``model_spec`` and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    from criteriapo.models import load_model, load_tokenizer, resolve_model

    check_options(opts)
    _check_port_free(opts.host, opts.port)
    source = resolve_model(model_spec)
    model = load_model(source, dtype=dtype, device=device)
    tokenizer = load_tokenizer(source)
    engine = Engine(model, tokenizer, max_batch=opts.max_batch, max_queue=opts.max_queue)
    app = build_app(engine, opts.name or model_spec, opts.limits, opts.api_key)
    try:
        uvicorn.run(app, host=opts.host, port=opts.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {e.strerror}; choose another --port"
            ) from None
