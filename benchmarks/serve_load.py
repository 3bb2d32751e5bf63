"""Load on ``criteriapo serve``: N concurrent clients, each sending requests one after another to
/v1/chat/completions on the embedded model, against the same server generating one request at a
time (``--max-batch 1``) as the baseline. Each server is the real command in its own process
(``criteriapo serve MODEL --max-batch B``), started for each client count, the same requests;
the clients are threads of this process. Prints requests/s, completion tokens/s, p50/p95
latency and errors, and the batched server's tokens/s over the baseline's. Each server runs
``--repeats`` times in the order ABBA... (baseline, batched, batched, baseline), so that a machine
whose speed drifts during the run slows both alike; the ratio is of the totals.

    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 16

Each client sends its requests one after another, so the run ends with a tail in which fewer than
N requests are left; give each client enough requests (16) that the tail is a small part of it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

from criteriapo.criteria.maker import draw_prompts


def load(base: str, clients: int, per_client: int, prompts: list[str], max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens, errors = [0], [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for k in range(per_client):
                body = {
                    "model": "m",
                    "messages": [{"role": "user", "content": prompts[(c * per_client + k) % len(prompts)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0.7,
                    "seed": c * 1000 + k,
                }
                t = time.perf_counter()
                r = http.post(f"{base}/v1/chat/completions", json=body)
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if r.status_code == 200:
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "req/s": len(lat) / wall,
        "tok/s": tokens[0] / wall,
        "p50 s": statistics.median(lat),
        "p95 s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "errors": errors[0],
        "requests": len(lat),
        "tokens": tokens[0],
        "wall s": wall,
    }


@contextlib.contextmanager
def serving(model: str, max_batch: int, max_tokens: int) -> Iterator[tuple[str, dict]]:
    """``criteriapo serve`` in its own process; yields its URL and, at the end, its /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", model, "--port", str(port), "--name", "m", "--max-batch", str(max_batch)]
    args += ["--max-tokens", str(max_tokens), "--max-queue", "256"]
    env = {**os.environ, "CRITERIAPO_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "criteriapo", *args], stdout=subprocess.DEVNULL, env=env)
    base, health = f"http://127.0.0.1:{port}", {}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"{base}/health")
                break
            except httpx.ConnectError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start (exit status {proc.poll()})") from None
                time.sleep(0.2)
        yield base, health
        health.update(httpx.get(f"{base}/health").json())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=4, help="per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument(
        "--repeats", type=int, default=2, help="runs of each server, in the order ABBA... (cancels a drift)"
    )
    args = p.parse_args()
    prompts = [d.text for d in draw_prompts(64, 3, 0.2)]
    servers = (("one at a time", 1), (f"batched (up to {args.max_batch})", args.max_batch))
    rows = []
    for clients in args.clients:
        for k in range(args.repeats):
            for label, batch in servers if k % 2 == 0 else servers[::-1]:
                with serving(args.model, batch, args.max_tokens) as (base, health):
                    load(base, 1, 1, prompts, 4)  # warm-up
                    r = load(base, clients, args.requests, prompts, args.max_tokens)
                rows.append((clients, label, r, health))
                say = f"batching {health.get('batching')}, largest batch {health.get('largest_batch')}"
                print(f"{clients} clients, {label}: {r} ({say})", flush=True)
    _report(args.clients, rows)


def _report(client_counts: list[int], rows: list[tuple]) -> None:
    cols = ["clients", "server", "batching", "requests/s", "tokens/s", "p50 latency s", "p95 latency s"]
    print("\n| " + " | ".join([*cols, "errors", "largest batch"]) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for clients, label, r, health in rows:
        print(
            f"| {clients} | {label} | {health.get('batching')} | {r['req/s']:.2f} | {r['tok/s']:.1f} | "
            f"{r['p50 s']:.2f} | {r['p95 s']:.2f} | {r['errors']} | {health.get('largest_batch')} |"
        )
    for clients in client_counts:
        runs = [(label, r) for c, label, r, _ in rows if c == clients]
        one, many = ([r for label, r in runs if label.startswith(kind)] for kind in ("one", "batched"))
        ratios = [m["tok/s"] / o["tok/s"] for o, m in zip(one, many, strict=True)]
        total = sum(m["tokens"] for m in many) / sum(m["wall s"] for m in many)
        total /= sum(o["tokens"] for o in one) / sum(o["wall s"] for o in one)
        say = ", ".join(f"{x:.2f}x" for x in ratios)
        print(
            f"{clients} clients: batched {total:.2f}x the tokens/s of one at a time, all runs ({say} by pair)"
        )


if __name__ == "__main__":
    main()
