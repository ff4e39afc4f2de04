"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /health. Each request becomes one Generate call on the coordinator's own gRPC server (over a
private unix socket, coordinator/openai_http/server.py), so limits, auth, deadlines and traces are
those of the gRPC API; this module only converts at the edge.

Errors carry OpenAI's body ({"error": {"message", "type", "param", "code"}}) with the gRPC status
mapped to HTTP; a body that is not JSON, or not an object, is a 400, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from coordinator.openai_http.protocol import (
    FINISH,
    ChatRequest,
    Common,
    CompletionRequest,
    Tokens,
    Unsupported,
    error_body,
    metrics,
    new_id,
    now,
    usage,
)
from protos.v1 import pearl_pb2 as pb
from specdec.security import bearer_token

log = logging.getLogger("pearl.http")

STATUS = {  # gRPC status -> (HTTP status, OpenAI error type)
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
RETRY_AFTER_S = "1"
DISCONNECT_POLL_S = 0.25
# headers that go on as gRPC metadata: the trace context and the bearer token
FORWARDED = ("traceparent", "tracestate", "authorization")


class HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: Any = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "HttpError":
        status, type_ = STATUS.get(err.code(), (500, "internal_error"))
        return cls(status, err.details() or err.code().name, type_, code=err.code().name.lower())

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_S} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class Front:
    """What the routes need: the coordinator servicer (model facts, tokenizer, limits), a stub
    on its gRPC server, the bearer token and the telemetry."""

    def __init__(self, servicer, stub, auth_token: str | None, serving: Callable[[], bool]):
        self.servicer, self.stub, self.auth_token = servicer, stub, auth_token
        self.serving = serving  # the gRPC server's health: SERVING, not warming or draining
        self.tokens = Tokens(servicer.tokenizer)
        self.created = now()
        self.unknown_logged: set[str] = set()

    @property
    def model(self) -> str:
        return self.servicer.target_info.model

    def check_auth(self, request: Request) -> None:
        if self.auth_token is None:
            return
        got = request.headers.get("authorization", "")
        token = bearer_token(got)
        if token is None or not hmac.compare_digest(token, self.auth_token.encode()):
            raise HttpError(401, f"{'invalid' if got else 'missing'} bearer token (send "
                            "'Authorization: Bearer <token>')", "authentication_error",
                            code="invalid_api_key")

    async def parse(self, request: Request, model: type[Common]) -> Common:
        self.check_auth(request)
        kind = request.headers.get("content-type", "")
        if kind.split(";")[0].strip().lower() != "application/json":
            raise HttpError(400, f"Content-Type must be application/json, not {kind or 'none'}",
                            "invalid_request_error")
        try:
            raw = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"the body is not valid JSON: {e}", "invalid_request_error") from None
        if not isinstance(raw, dict):
            raise HttpError(400, "the body must be a JSON object", "invalid_request_error")
        try:
            body = model.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise HttpError(400, f"{param}: {first['msg']}" if param else first["msg"],
                            "invalid_request_error", param=param) from None
        for name in sorted(set(body.model_extra or ()) - self.unknown_logged):
            self.unknown_logged.add(name)
            log.info("HTTP: ignoring the request field %r (logged once)", name)
        if body.model != self.model:
            raise HttpError(404, f"the model {body.model!r} does not exist; this server serves "
                            f"{self.model!r}", "not_found_error", param="model",
                            code="model_not_found")
        return body

    def request(self, body: ChatRequest | CompletionRequest) -> pb.GenerateRequest:
        """The Generate request, tokenized here once so that an absent max_tokens can be the
        context left after the prompt (the API's meaning) rather than a guess."""
        from coordinator.server import InvalidRequest

        try:
            req = body.to_pb()
            ids = self.servicer.prompt_ids(req)
        except Unsupported as e:
            raise HttpError(400, str(e), "invalid_request_error", param=e.param) from None
        except InvalidRequest as e:
            raise HttpError(400, str(e), "invalid_request_error") from None
        req.ClearField("messages")
        req.prompt = ""
        req.prompt_ids[:] = ids
        wanted = body.wanted_tokens()
        left = self.servicer.max_positions - len(ids)
        req.max_new_tokens = wanted or max(1, min(self.servicer.max_new_tokens, left))
        return req

    def call(self, request: Request, req: pb.GenerateRequest, timeout: float | None):
        md = tuple((k, request.headers[k]) for k in FORWARDED if k in request.headers)
        return self.stub.Generate(req, metadata=md, timeout=timeout)


async def until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def collect(call) -> tuple[str, list[pb.TokenLogprob], pb.GenerateStats]:
    text, lps, stats = [], [], None
    async for resp in call:
        if resp.HasField("stats"):
            stats = resp.stats
        text.append(resp.text)
        lps.extend(resp.logprobs)
    return "".join(text), lps, stats


async def answer(request: Request, call) -> tuple[str, list[pb.TokenLogprob], pb.GenerateStats]:
    """The whole Generate stream; a client that disconnects first cancels the call (the
    coordinator then frees the request's sessions)."""
    work = asyncio.ensure_future(collect(call))
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            call.cancel()
            work.cancel()
    if not work.done() or work.cancelled():
        raise HttpError(499, "the client disconnected", "cancelled")
    try:
        return work.result()
    except grpc.RpcError as e:
        raise HttpError.from_rpc(e) from None


def build_app(front: Front) -> FastAPI:
    app = FastAPI(title="PEARL (OpenAI-compatible)", docs_url=None, redoc_url=None)

    @app.exception_handler(HttpError)
    async def _http_error(_request, err: HttpError):
        return err.response()

    @app.get("/health")
    async def health():
        if front.serving():
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/v1/models")
    async def models(request: Request):
        front.check_auth(request)
        return {"object": "list", "data": [model_card(front)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        front.check_auth(request)
        if model_id != front.model:
            raise HttpError(404, f"the model {model_id!r} does not exist", "not_found_error",
                            param="model", code="model_not_found")
        return model_card(front)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await front.parse(request, ChatRequest)
        return await respond(front, request, body, chat_choice, chat_answer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await front.parse(request, CompletionRequest)
        return await respond(front, request, body, completion_choice, completion_answer)

    return app


def model_card(front: Front) -> dict:
    return {"id": front.model, "object": "model", "created": front.created, "owned_by": "pearl",
            "max_model_len": front.servicer.max_positions}


async def respond(front: Front, request: Request, body, choice: Callable, whole: Callable):
    req = front.request(body)
    call = front.call(request, req, body.timeout)
    head = {"id": new_id("chatcmpl" if isinstance(body, ChatRequest) else "cmpl"),
            "created": now(), "model": front.model}
    want_lps = req.logprobs  # set by to_pb exactly when the body asked for logprobs
    if not body.stream:
        text, lps, stats = await answer(request, call)
        return whole(front, head, want_lps, text, lps, stats)
    try:  # the first message tells a refusal (400, 429, 503) before the stream's 200 is sent
        first = await call.read()
    except grpc.RpcError as e:
        raise HttpError.from_rpc(e) from None
    return StreamingResponse(stream(front, head, body, call, first, choice, want_lps),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream(front: Front, head: dict, body, call, first, choice: Callable,
                 want_lps: bool) -> AsyncIterator[str]:
    """One SSE event per committed delta, the finish, usage when asked, then [DONE]. A client
    that goes away cancels this generator, and the call with it."""
    obj = "chat.completion.chunk" if choice is chat_choice else "text_completion"
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def event(c: dict, **extra) -> str:
        return sse({**head, "object": obj, "choices": [c], **extra})

    try:
        if choice is chat_choice:  # the first delta carries the role
            yield event(choice(front, "", [], None, want_lps, role=True))
        resp, offset = first, 0
        while resp is not grpc.aio.EOF:
            if resp.HasField("stats"):
                stats = resp.stats
                yield event(choice(front, "", [], FINISH.get(stats.finish_reason, "stop"),
                                   want_lps), metrics=metrics(stats))
                if include_usage:
                    yield sse({**head, "object": obj, "choices": [], "usage": usage(stats),
                               "metrics": metrics(stats)})
                break
            if resp.text or resp.logprobs:
                yield event(choice(front, resp.text, list(resp.logprobs), None, want_lps,
                                   offset=offset))
                offset += len(resp.text)
            resp = await call.read()
    except grpc.RpcError as e:
        yield sse(HttpError.from_rpc(e).body(), event="error")
    finally:
        call.cancel()  # a no-op once the call has ended
    yield sse("[DONE]")


def chat_choice(front: Front, text: str, lps: list, finish: str | None, want_lps: bool,
                role: bool = False, offset: int = 0) -> dict:
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    return {"index": 0, "delta": delta,
            "logprobs": {"content": [front.tokens.chat_entry(lp) for lp in lps]}
            if want_lps and lps else None,
            "finish_reason": finish}


def completion_choice(front: Front, text: str, lps: list, finish: str | None, want_lps: bool,
                      role: bool = False, offset: int = 0) -> dict:
    return {"index": 0, "text": text,
            "logprobs": front.tokens.completion_logprobs(lps, offset) if want_lps and lps
            else None,
            "finish_reason": finish}


def chat_answer(front: Front, head: dict, want_lps: bool, text: str, lps: list, stats) -> dict:
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": [front.tokens.chat_entry(lp) for lp in lps]}
                         if want_lps else None,
                         "finish_reason": FINISH.get(stats.finish_reason, "stop")}],
            "usage": usage(stats), "metrics": metrics(stats)}


def completion_answer(front: Front, head: dict, want_lps: bool, text: str, lps: list,
                      stats) -> dict:
    return {**head, "object": "text_completion",
            "choices": [{"index": 0, "text": text,
                         "logprobs": front.tokens.completion_logprobs(lps)
                         if want_lps else None,
                         "finish_reason": FINISH.get(stats.finish_reason, "stop")}],
            "usage": usage(stats), "metrics": metrics(stats)}
