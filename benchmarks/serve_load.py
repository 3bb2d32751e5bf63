"""Load on ``criteriapo serve``: N concurrent clients, each sending requests one after another to
/v1/chat/completions on the embedded model, against the same server generating one request at a
time (``--max-batch 1``) as the baseline. The two servers run in this process (uvicorn in a
thread, the same loaded model), one after the other for each client count, the same requests.
Prints requests/s, completion tokens/s, p50/p95 latency and errors, and the batched server's
requests/s over the baseline's.

    .venv/bin/python benchmarks/serve_load.py --clients 1 4 8 --requests 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from criteriapo.criteria.maker import draw_prompts  # noqa: E402
from criteriapo.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from criteriapo.serve.app import Limits, build_app  # noqa: E402
from criteriapo.serve.engine import Engine  # noqa: E402
from tests.serve.conftest import running  # noqa: E402


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
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=4, help="per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    args = p.parse_args()
    source = resolve_model(args.model)
    model, tok = load_model(source.path), load_tokenizer(source.path)
    prompts = [d.text for d in draw_prompts(64, 3, 0.2)]
    rows = []
    for clients in args.clients:
        for label, batch in (("one at a time", 1), (f"batched (up to {args.max_batch})", args.max_batch)):
            engine = Engine(model, tok, max_batch=batch, max_queue=256)
            with running(build_app(engine, "m", Limits(max_tokens=args.max_tokens))) as base:
                load(base, 1, 1, prompts, 4)  # warm-up
                r = load(base, clients, args.requests, prompts, args.max_tokens)
            engine.close()
            rows.append((clients, label, r, engine.counts.largest_batch))
            print(
                f"{clients} clients, {label}: {r} (largest batch {engine.counts.largest_batch})", flush=True
            )
    print(
        "\n| clients | server | requests/s | tokens/s | p50 latency s | p95 latency s | errors | largest batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for clients, label, r, largest in rows:
        print(
            f"| {clients} | {label} | {r['req/s']:.2f} | {r['tok/s']:.1f} | {r['p50 s']:.2f} | "
            f"{r['p95 s']:.2f} | {r['errors']} | {largest} |"
        )
    for clients in args.clients:
        one, many = (r for c, _, r, _ in rows if c == clients)
        print(
            f"{clients} clients: batched {many['req/s'] / one['req/s']:.2f}x the requests/s of one at a time"
        )


if __name__ == "__main__":
    main()
