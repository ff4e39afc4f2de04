"""Bounds on what one service holds: concurrent sessions, idle sessions, and the drain on shutdown.

- ``CallGuard`` is a server interceptor on the streaming RPCs of a service's own methods (Draft,
  Verify, Generate): it counts the calls in flight, answers RESOURCE_EXHAUSTED past ``limit``
  (``--max-sessions``; 0 = no limit) and UNAVAILABLE once the server drains. Health, reflection
  and unary calls (GetModelInfo) are never refused, so probes keep working while draining.
- ``idle_get`` and ``idle_limited`` close a session that receives no control message for
  ``idle_s`` seconds (``--session-idle-s``; 0 = never) with DEADLINE_EXCEEDED, which frees its KV
  cache even when a coordinator vanished without closing its stream.
- ``LoadReporter`` answers GetLoad (sessions in flight, the limit, draining) for coordinators that
  spread sessions over replicas; an accepted session gets its headers (``ACCEPTED_KEY``) at once.
"""

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable

import grpc

ACCEPTED_KEY = "pearl-session"  # initial metadata of a session that passed the guard


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as ``handler`` that fails every call with ``code``."""

    async def refuse(request_or_iterator, context):
        await context.abort(code, message)

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse, **kw)


def _with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable):
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kw)
    return grpc.unary_stream_rpc_method_handler(behavior, **kw)


class CallGuard(grpc.aio.ServerInterceptor):
    """Counts and bounds the streaming calls of ``service_names``; refuses new ones when draining."""

    def __init__(self, service_names: list[str], label: str = "service", limit: int = 0):
        self.prefixes = tuple(f"/{name}/" for name in service_names)
        self.label = label
        self.limit = limit
        self.active = 0
        self.draining = False
        self.warming = False  # compiled steps still being built: not ready yet

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or not details.method.startswith(self.prefixes)
                or not handler.response_streaming):
            return handler
        if self.draining or self.warming:
            why = ("is shutting down" if self.draining else
                   "is warming up its compiled steps (health NOT_SERVING); retry when it serves")
            return refusing_handler(handler, grpc.StatusCode.UNAVAILABLE, f"{self.label} {why}")
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        if not inspect.isasyncgenfunction(inner):  # only our async-generator servicers are counted
            return handler

        async def counted(request_or_iterator, context):
            if self.limit and self.active >= self.limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{self.label} is at its limit of {self.limit} concurrent "
                                    "sessions (--max-sessions); retry later")
            self.active += 1
            try:
                # Headers now: a coordinator knows at once that the session was accepted
                # (coordinator/replicas.py), without waiting for the first answer.
                await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))
                async for resp in inner(request_or_iterator, context):
                    yield resp
            finally:
                self.active -= 1

        return _with_behavior(handler, counted)


class LoadReporter:
    """The LoadReport service (GetLoad) answered from a ``CallGuard``'s count and limit."""

    def __init__(self, guard: CallGuard, store=None):
        self.guard = guard
        self.store = store  # a draft's or target's KV store (specdec/kv_store.py), else None

    async def GetLoad(self, request, context):
        from protos.v1 import pearl_pb2

        g = self.guard
        kv = {}
        if self.store is not None:
            kv = dict(kv_free_tokens=self.store.free_tokens,
                      kv_cached_tokens=self.store.cached_tokens)
        return pearl_pb2.LoadResponse(live_sessions=g.active, max_sessions=g.limit,
                                      draining=g.draining or g.warming, **kv)


def _idle_abort_message(label: str, idle_s: float) -> str:
    return (f"{label} session received nothing for {idle_s:g} s (--session-idle-s) and was "
            "closed")


async def idle_get(queue: asyncio.Queue, idle_s: float, context, label: str):
    """``queue.get()``, aborting the call with DEADLINE_EXCEEDED after ``idle_s`` (0: wait)."""
    try:  # asyncio.timeout (None: no limit), not wait_for (docs/design.md section 11)
        async with asyncio.timeout(idle_s or None):
            return await queue.get()
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _idle_abort_message(label, idle_s))


async def idle_limited(requests: AsyncIterator, idle_s: float, context, label: str
                       ) -> AsyncIterator:
    """The request stream, aborted with DEADLINE_EXCEEDED when a gap exceeds ``idle_s``."""
    it = requests.__aiter__()
    while True:
        try:  # asyncio.timeout (None: no limit), not wait_for (docs/design.md section 11)
            async with asyncio.timeout(idle_s or None):
                req = await it.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                _idle_abort_message(label, idle_s))
        yield req
