"""The interceptor every server runs innermost: it reads the request messages and turns what a
handler raises into a gRPC status, so that servicers raise plain exceptions and never abort.

- Request bytes that do not parse end the call with INVALID_ARGUMENT naming the method. Left to
  gRPC they are answered UNKNOWN ("Unexpected DecodeError") on a unary request, and a stream that
  reads its requests in a task of its own (Draft) even ends OK.
- An exception whose class (or a base class) is in the service's ``statuses`` table ends the call
  with that status and the exception's text; a table value may also be a function of the
  exception (a status chosen per error, e.g. the one a backend answered).
- Any other exception is a bug: it is logged with its traceback and answered INTERNAL, naming the
  method and the exception, instead of gRPC's bare UNKNOWN.
"""

import inspect
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger("pearl.errors")

Status = grpc.StatusCode | Callable[[BaseException], grpc.StatusCode]

_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}


def status_of(e: BaseException, statuses: dict[type[BaseException], Status]
              ) -> grpc.StatusCode | None:
    """The status ``statuses`` gives ``e`` (its nearest class in the table), or None."""
    for cls in type(e).__mro__:
        if cls in statuses:
            code = statuses[cls]
            return code if isinstance(code, grpc.StatusCode) else code(e)
    return None


class ErrorStatus(grpc.aio.ServerInterceptor):
    """Parses each request message in the handler and maps the handler's exceptions to
    statuses (``statuses``: exception class -> status code, or a function of the exception)."""

    def __init__(self, statuses: dict[type[BaseException], Status] | None = None):
        self.statuses = dict(statuses or {})

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        parse = handler.request_deserializer if handler is not None else None
        if parse is None:
            return handler
        inner = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                 or handler.stream_stream)
        if not (inspect.isasyncgenfunction(inner) or inspect.iscoroutinefunction(inner)):
            return handler  # a synchronous servicer: left to gRPC
        method = details.method

        async def read(raw: bytes, context):
            try:
                return parse(raw)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"{method}: unreadable request message: {e}")

        async def read_all(raws, context):
            async for raw in raws:
                yield await read(raw, context)

        async def requests(raw_or_raws, context):
            if handler.request_streaming:
                return read_all(raw_or_raws, context)
            return await read(raw_or_raws, context)

        async def fail(e: Exception, context) -> None:
            if isinstance(e, grpc.aio.AbortError):  # the handler aborted the call itself
                raise e
            code, message = status_of(e, self.statuses), str(e)
            if code is None:  # a bug
                log.exception("%s failed", method)
                code = grpc.StatusCode.INTERNAL
                message = f"{method}: internal error: {type(e).__name__}: {e}"
            await context.abort(code, message)

        if inspect.isasyncgenfunction(inner):
            async def behavior(raw_or_raws, context):
                try:
                    async for resp in inner(await requests(raw_or_raws, context), context):
                        yield resp
                except Exception as e:
                    await fail(e, context)
        else:  # a coroutine: a unary answer, or a stream written with context.write
            async def behavior(raw_or_raws, context):
                try:
                    return await inner(await requests(raw_or_raws, context), context)
                except Exception as e:
                    await fail(e, context)

        make = _HANDLERS[handler.request_streaming, handler.response_streaming]
        return make(behavior, request_deserializer=None,
                    response_serializer=handler.response_serializer)
