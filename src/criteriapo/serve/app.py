"""The HTTP side of ``criteriapo serve``: OpenAI's chat and text completions on one model.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` as server-sent events),
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. Every bad request gets an
OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``) with the status
OpenAI clients expect: 400 a request that cannot be served as asked (malformed JSON, a prompt or
``max_tokens`` over the limits, unsupported options), 401 a missing or wrong API key, 404 an
unknown model or path, 405 a wrong method, 413 a body over the limit, 422 a field of the wrong type
or a missing one, 429 a full queue (retry after a moment), 500 a failure of ours."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from criteriapo.errors import ConfigError
from criteriapo.generation import Reply, Sampling
from criteriapo.serve.engine import Busy, Engine, Job
from criteriapo.serve.schema import ChatRequest, CompletionRequest, SamplingFields, error_body

INVALID = "invalid_request_error"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the most a request may ask for, and what it gets when it does not say


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        kind = kinds.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return error_body(self.message, kind, self.param, self.code)


def build_app(engine: Engine, model_id: str, limits: Limits | None = None, api_key: str | None = None):
    """The FastAPI application serving ``engine``'s model as ``model_id``."""
    from fastapi import FastAPI

    limits = limits or Limits()
    app = FastAPI(title="criteriapo serve", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(engine, model_id, limits)
    _error_handlers(app)
    _routes(app, server)
    if api_key is not None:
        _require_key(app, api_key)
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)  # outermost: before the body is read
    return app


def _error_handlers(app: Any) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            why = (errors[0].get("ctx") or {}).get("error", "malformed")
            return JSONResponse(error_body(f"the body is not valid JSON: {why}", INVALID), status_code=400)
        first = errors[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(message, INVALID, where), status_code=422)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # a bug of ours: logged by uvicorn with its traceback
        message = f"internal error: {type(e).__name__}: {e}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        kind = "not_found_error" if e.status_code == 404 else INVALID
        return JSONResponse(error_body(message, kind), status_code=e.status_code)


def _require_key(app: Any, api_key: str) -> None:
    """Every ``/v1/`` request must carry ``Authorization: Bearer API_KEY``; /health stays open."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                what = "a wrong API key" if token else "no API key (Authorization: Bearer KEY)"
                body = error_body(
                    f"this server needs an API key; the request has {what}", "authentication_error"
                )
                return JSONResponse(body, status_code=401)
        return await call_next(request)


def _routes(app: Any, server: _Server) -> None:
    from fastapi.responses import StreamingResponse

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        server.check_model(name)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        sampling, ids = server.sampling(body), server.chat_prompt(body)  # the model first: a 404 before all
        if body.stream:
            events = server.stream(ids, sampling, body, chat=True)
            return StreamingResponse(events, media_type="text/event-stream")
        return await server.complete(ids, sampling, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        sampling, ids = server.sampling(body), server.text_prompt(body)
        if body.stream:
            events = server.stream(ids, sampling, body, chat=False)
            return StreamingResponse(events, media_type="text/event-stream")
        return await server.complete(ids, sampling, chat=False)


class _Server:
    """Turns requests into jobs for the engine and replies into OpenAI's response objects."""

    def __init__(self, engine: Engine, model_id: str, limits: Limits):
        self.engine, self.model_id, self.limits = engine, model_id, limits
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {
            "status": "ok",
            "model": self.model_id,
            "queued": e.queued,
            "running": e.running,
            "batching": "fused" if e.fused else "continuous" if e.continuous else "whole",
            **asdict(e.counts),
        }

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "criteriapo"}

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(
                404,
                f"model {name!r} not found; this server serves {self.model_id!r}",
                "model",
                "model_not_found",
            )

    # -- requests ---------------------------------------------------------------------------------
    def sampling(self, body: SamplingFields) -> Sampling:
        self.check_model(body.model)
        if body.n != 1:
            raise ApiError(400, f"n: this server makes one choice per request, not {body.n}", "n")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        limit = self.limits.max_tokens
        if asked is not None and asked > limit:
            raise ApiError(
                400, f"max_tokens {asked} is over this server's limit of {limit} (--max-tokens)", "max_tokens"
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        return Sampling(asked or limit, body.temperature, body.top_p, seed=seed, stop=tuple(stop))

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = [
            {"role": _role(m.role), "content": _content(m.content, f"messages[{i}].content")}
            for i, m in enumerate(body.messages)
        ]
        if body.criteria:
            messages = self._steered(messages, body.criteria)
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as e:  # noqa: BLE001 - the template refuses this conversation (jinja's errors)
            raise ApiError(
                400, f"messages: the model's chat template refuses them: {e}", "messages"
            ) from None
        return self._checked(list(ids))

    def text_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request, not {len(prompt)}", "prompt")
            prompt = prompt[0]
        if body.criteria:
            raise ApiError(
                400, "criteria: steering is for chat completions (/v1/chat/completions)", "criteria"
            )
        return self._checked(self.tokenizer(prompt)["input_ids"])

    def _steered(self, messages: list[dict], criteria: list[str]) -> list[dict]:
        from criteriapo.criteria import parse_criterion
        from criteriapo.criteria.pairs import condition_prompt

        if not any(m["role"] == "user" for m in messages):
            raise ApiError(400, "criteria: steering needs a user message to add them to", "criteria")
        try:
            parsed = [parse_criterion(c) for c in criteria]
        except ConfigError as e:
            raise ApiError(400, f"criteria: {e}", "criteria") from None
        return condition_prompt(messages, [c.description for c in parsed])

    def _checked(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, over this server's limit of "
                f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)",
                "messages",
                "context_length_exceeded",
            )
        return ids

    # -- replies ----------------------------------------------------------------------------------
    async def complete(self, ids: list[int], sampling: Sampling, chat: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        job = Job(ids, sampling, lambda reply, error: loop.call_soon_threadsafe(_settle, done, reply, error))
        self._submit(job)
        try:
            reply = await done
        except asyncio.CancelledError:  # the client went away
            job.cancel.set()
            raise
        except Exception as e:  # noqa: BLE001 - generation failed: a 500 with the reason
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": reply.text}}
            if chat
            else {"index": 0, "text": reply.text, "logprobs": None}
        )
        choice["finish_reason"] = _finish(reply)
        return self._envelope(chat, False) | {"choices": [choice], "usage": _usage(ids, reply)}

    def stream(
        self, ids: list[int], sampling: Sampling, body: SamplingFields, chat: bool
    ) -> AsyncIterator[str]:
        """The reply's server-sent events; the job is queued now, so a full queue is still a 429."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job = Job(
            ids,
            sampling,
            lambda reply, error: loop.call_soon_threadsafe(pieces.put_nowait, (reply, error)),
            lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece),
        )
        self._submit(job)
        return self._events(job, pieces, ids, body, chat)

    async def _events(
        self, job: Job, pieces: asyncio.Queue, ids: list[int], body: SamplingFields, chat: bool
    ):
        head = self._envelope(chat, True)
        try:
            if chat:
                yield _sse(
                    head
                    | {
                        "choices": [
                            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ]
                    }
                )
            while not isinstance(item := await pieces.get(), tuple):
                delta = {"delta": {"content": item}} if chat else {"text": item, "logprobs": None}
                yield _sse(head | {"choices": [{"index": 0, **delta, "finish_reason": None}]})
            reply, error = item
            if error is not None or reply is None:
                yield _sse(error_body(f"generation failed: {type(error).__name__}: {error}", "server_error"))
                return
            last = {"delta": {}} if chat else {"text": "", "logprobs": None}
            yield _sse(head | {"choices": [{"index": 0, **last, "finish_reason": _finish(reply)}]})
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse(head | {"choices": [], "usage": _usage(ids, reply)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client went away mid-stream: its row stops at the next token

    def _submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except Busy as e:
            raise ApiError(429, f"the server is busy: {e}; retry in a moment", None, "server_busy") from None

    def _envelope(self, chat: bool, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        prefix = "chatcmpl" if chat else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_id,
        }


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for the system message


def _content(parts: Any, param: str) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    texts = []
    for i, part in enumerate(parts):
        if part.type != "text" or part.text is None:
            raise ApiError(
                400, f"{param}[{i}]: only text parts are supported, not {part.type!r}", f"{param}[{i}]"
            )
        texts.append(part.text)
    return "".join(texts)


def _settle(done: asyncio.Future, reply: Reply | None, error: BaseException | None) -> None:
    if done.done():
        return
    if error is not None or reply is None:
        done.set_exception(error or RuntimeError("the request was cancelled"))
    else:
        done.set_result(reply)


def _finish(reply: Reply) -> str:
    return "length" if reply.cut_off else "stop"


def _usage(ids: list[int], reply: Reply) -> dict[str, int]:
    return {
        "prompt_tokens": len(ids),
        "completion_tokens": reply.tokens,
        "total_tokens": len(ids) + reply.tokens,
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _BodyLimit:
    """A body over ``limit`` bytes is refused with 413 before it is read whole: by its
    Content-Length when it says one, else as its chunks arrive."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge as e:
            await self._refuse(send, e.args[0])
        except BaseExceptionGroup as group:  # raised through a middleware's task group
            match, rest = group.split(_TooLarge)
            if match is None:
                raise
            if rest is not None:
                raise rest from None
            await self._refuse(send, _first(match).args[0])

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(
            error_body(
                f"the body is {size:,} bytes or more, over this server's limit of {self.limit:,} "
                "(--max-body-bytes)",
                "invalid_request_error",
                None,
                "body_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):
    """Raised from the body reader; a BaseException so that FastAPI's body parsing, which turns
    any Exception into a 400, lets it through to :class:`_BodyLimit`."""


def _first(group: BaseExceptionGroup) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e
