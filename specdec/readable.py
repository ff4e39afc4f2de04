"""INVALID_ARGUMENT for a request message that does not parse, on every method of a server.

Left to gRPC, bytes that are not a valid message are answered UNKNOWN ("Unexpected DecodeError")
on a unary request, and a stream that reads its requests in a task of its own (Draft) even ends
OK. ``ReadableRequests`` hands the handler raw bytes and parses them itself, where it can abort
the call with a clear status; an internal stream thus never ends OK on a message it could not
read.
"""

import inspect

import grpc
from google.protobuf.message import DecodeError

_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}


class ReadableRequests(grpc.aio.ServerInterceptor):
    """Parses each request message in the handler; unreadable bytes end the call with
    INVALID_ARGUMENT naming the method."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        parse = handler.request_deserializer if handler is not None else None
        if parse is None:
            return handler
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

        inner = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                 or handler.stream_stream)
        if not (inspect.isasyncgenfunction(inner) or inspect.iscoroutinefunction(inner)):
            return handler  # a synchronous servicer: left to gRPC
        if inspect.isasyncgenfunction(inner):
            async def behavior(raw_or_raws, context):
                async for resp in inner(await requests(raw_or_raws, context), context):
                    yield resp
        else:  # a coroutine: a unary answer, or a stream written with context.write
            async def behavior(raw_or_raws, context):
                return await inner(await requests(raw_or_raws, context), context)

        make = _HANDLERS[handler.request_streaming, handler.response_streaming]
        return make(behavior, request_deserializer=None,
                    response_serializer=handler.response_serializer)
