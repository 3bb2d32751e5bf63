"""The OpenAI-compatible server as clients use it: the official ``openai`` package (plain and
streamed), plain HTTP with every kind of bad request, a full queue, and a client that goes away
mid-stream while the server keeps serving."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from criteriapo.serve.app import Limits, build_app
from criteriapo.serve.engine import Engine
from tests.serve.conftest import running

NAME = "tiny"
HI = [{"role": "user", "content": "Tell me about owls."}]


@pytest.fixture(scope="module")
def url(chatty_model, smollm2_tokenizer):
    engine = Engine(chatty_model, smollm2_tokenizer, max_batch=4, max_queue=8)
    limits = Limits(max_body_bytes=8192, max_prompt_tokens=64, max_tokens=3000)
    with running(build_app(engine, NAME, limits)) as base:
        yield base
    engine.close()


def _error(r: httpx.Response, status: int, words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and words in body["message"], body
    return body


def test_the_openai_client_gets_a_reply_plain_and_streamed_the_same(url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    asked = {"model": NAME, "messages": HI, "max_tokens": 12, "temperature": 0.0}
    plain = client.chat.completions.create(**asked)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and plain.usage.completion_tokens == 12
    assert plain.object == "chat.completion" and plain.model == NAME and plain.usage.prompt_tokens > 5
    chunks = list(
        client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    sampled = {**asked, "temperature": 1.0, "seed": 7}
    first, again = (client.chat.completions.create(**sampled).choices[0].message.content for _ in range(2))
    assert first == again  # a seed gives the same reply


def test_text_completions_models_and_health(url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    done = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens == 5 and done.choices[0].text
    streamed = client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed).strip() == done.choices[0].text
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["served"] >= 2


def test_a_stop_string_ends_the_reply_before_it(url):
    asked = {"model": NAME, "messages": HI, "max_tokens": 12, "temperature": 0.0}
    full = httpx.post(f"{url}/v1/chat/completions", json=asked).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = httpx.post(f"{url}/v1/chat/completions", json={**asked, "stop": [stop]}).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)].strip() and cut["finish_reason"] == "stop"


def test_criteria_steer_by_adding_their_instructions_to_the_prompt(url):
    asked = {"model": NAME, "messages": HI, "max_tokens": 2}
    plain = httpx.post(f"{url}/v1/chat/completions", json=asked).json()
    steered = httpx.post(f"{url}/v1/chat/completions", json={**asked, "criteria": ["lowercase"]}).json()
    assert steered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 3
    bad = httpx.post(f"{url}/v1/chat/completions", json={**asked, "criteria": ["shouting"]})
    _error(bad, 400, "unknown criterion")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        (b"not json at all", 400, "not valid JSON"),
        (json.dumps({"model": NAME, "messages": HI, "max_tokens": "5"}).encode(), 422, "max_tokens"),
        (json.dumps({"model": NAME}).encode(), 422, "messages"),
        (json.dumps({"model": NAME, "messages": [{"role": "bot", "content": "hi"}]}).encode(), 422, "role"),
        (json.dumps({"model": NAME, "messages": HI, "temperature": 3}).encode(), 422, "temperature"),
        (json.dumps({"model": "gpt-4o", "messages": HI}).encode(), 404, "not found"),
        (json.dumps({"model": NAME, "messages": HI, "max_tokens": 100_000}).encode(), 400, "limit of 3000"),
        (json.dumps({"model": NAME, "messages": HI, "n": 2}).encode(), 400, "one choice"),
        (
            json.dumps({"model": NAME, "messages": [{"role": "user", "content": "owl " * 200}]}).encode(),
            400,
            "limit of 64",
        ),
        (json.dumps({"model": NAME, "messages": HI, "stop": [""]}).encode(), 400, "stop"),
        (
            json.dumps(
                {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
            ).encode(),
            400,
            "only text",
        ),
        (
            b'{"model": "tiny", "messages": [], "pad": "' + b"x" * 10_000 + b'"}',
            413,
            "over this server's limit",
        ),
    ],
)
def test_every_bad_request_gets_an_openai_error_and_its_status(url, body, status, words):
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    _error(r, status, words)


def test_a_huge_body_without_a_length_is_refused_as_it_arrives(url):
    def chunks():
        yield b'{"model": "tiny", "messages": [], "pad": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(
        f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    _error(r, 413, "over this server's limit")


def test_wrong_paths_and_methods_get_openai_errors(url):
    _error(httpx.get(f"{url}/v1/nothing-here"), 404, "/v1/nothing-here")
    _error(httpx.get(f"{url}/v1/chat/completions"), 405, "GET /v1/chat/completions")
    _error(httpx.get(f"{url}/v1/models/gpt-4o"), 404, "not found")


def test_the_openai_client_raises_its_own_errors(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError, match="limit of 3000"):
        client.chat.completions.create(model=NAME, messages=HI, max_tokens=100_000)


def test_an_api_key_is_required_when_set(chatty_model, smollm2_tokenizer):
    import openai

    engine = Engine(chatty_model, smollm2_tokenizer)
    with running(build_app(engine, NAME, api_key="s3cret")) as base:
        asked = {"model": NAME, "messages": HI, "max_tokens": 2}
        _error(httpx.post(f"{base}/v1/chat/completions", json=asked), 401, "no API key")
        wrong = {"authorization": "Bearer guess"}
        _error(httpx.post(f"{base}/v1/chat/completions", json=asked, headers=wrong), 401, "wrong API key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="guess", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret").chat.completions.create(**asked)
        assert ok.usage.completion_tokens == 2
        assert httpx.get(f"{base}/health").status_code == 200  # open: for load balancers
    engine.close()


def _first_chunk_then_wait(base: str, asked: dict, started: threading.Event, done: threading.Event):
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**asked, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                started.set()
    done.set()


def test_a_full_queue_answers_429_and_the_queued_request_is_still_served(chatty_model, smollm2_tokenizer):
    engine = Engine(chatty_model, smollm2_tokenizer, max_batch=1, max_queue=1)
    long = {"model": NAME, "messages": HI, "max_tokens": 2500, "temperature": 0.0}
    with running(build_app(engine, NAME, Limits(max_tokens=3000))) as base:
        started, done = threading.Event(), threading.Event()
        threading.Thread(target=_first_chunk_then_wait, args=(base, long, started, done), daemon=True).start()
        assert started.wait(30)
        queued: dict = {}
        short = {"model": NAME, "messages": HI, "max_tokens": 3}
        waiter = threading.Thread(
            target=lambda: queued.update(r=httpx.post(f"{base}/v1/chat/completions", json=short, timeout=60))
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").json()["queued"] < 1:
            assert time.monotonic() < deadline and not done.is_set(), "the long reply ended too soon"
            time.sleep(0.01)
        refused = httpx.post(f"{base}/v1/chat/completions", json=short)
        _error(refused, 429, "busy")
        assert refused.headers["retry-after"] == "1"
        waiter.join(60)
        assert queued["r"].status_code == 200
    engine.close()


def test_a_client_gone_mid_stream_stops_its_reply_and_others_are_served(url):
    before = httpx.get(f"{url}/health").json()
    long = {"model": NAME, "messages": HI, "max_tokens": 3000, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(not line or line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 20
    while (h := httpx.get(f"{url}/health").json())["cancelled"] == before["cancelled"] or h["running"]:
        assert time.monotonic() < deadline, f"the reply went on without its client: {h}"
        time.sleep(0.05)
    ok = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_concurrent_requests_are_generated_together(url):
    before = httpx.get(f"{url}/health").json()["largest_batch"]
    asked = [
        {"model": NAME, "messages": HI, "max_tokens": 40, "seed": i, "temperature": 1.0} for i in range(4)
    ]
    replies: list = [None] * 4
    threads = [
        threading.Thread(
            target=lambda i=i: replies.__setitem__(
                i, httpx.post(f"{url}/v1/chat/completions", json=asked[i], timeout=60)
            )
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in replies)
    assert max(before, httpx.get(f"{url}/health").json()["largest_batch"]) >= 2


def test_a_model_that_cannot_batch_continuously_is_served_in_whole_batches(smollm2_tokenizer):
    """A sliding-window model: requests waiting together are generated as one batch."""
    from tests.zoo import zoo_model

    model = zoo_model(
        "mistral", vocab_size=len(smollm2_tokenizer), initializer_range=0.5, init_std=0.5
    ).eval()
    engine = Engine(model, smollm2_tokenizer, max_batch=4)
    assert not engine.continuous
    with running(build_app(engine, NAME)) as base:
        asked = {"model": NAME, "messages": HI, "max_tokens": 5, "temperature": 0.0}
        replies: list = [None] * 3
        threads = [
            threading.Thread(
                target=lambda i=i: replies.__setitem__(
                    i, httpx.post(f"{base}/v1/chat/completions", json=asked)
                )
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5 for r in replies)
        assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1  # greedy, one prompt
    engine.close()
