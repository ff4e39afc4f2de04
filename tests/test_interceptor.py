"""The error interceptor (specdec/interceptor.py): what a handler raises becomes the status its
service's table names; anything else is INTERNAL naming the method; a handler's own abort and
the answers sent before an error reach the client unchanged. A real aio server on loopback with
a servicer that raises on command."""

import asyncio

import grpc
import pytest

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.serving import Server


class Refused(ValueError):
    pass


class Busy(RuntimeError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(f"busy ({code.name})")
        self.code = code


class SubRefused(Refused):
    pass


STATUSES = {Refused: grpc.StatusCode.INVALID_ARGUMENT, Busy: lambda e: e.code}


class Raising(pearl_pb2_grpc.DraftServiceServicer):
    """GetModelInfo raises what the request's model name says; Draft answers one proposal per
    request and raises on a rollback."""

    async def GetModelInfo(self, request, context):
        raise {"refused": Refused("no such model"), "sub": SubRefused("sub refused"),
               "busy": Busy(grpc.StatusCode.RESOURCE_EXHAUSTED),
               "bug": KeyError("oops")}[dict(context.invocation_metadata())["what"]]

    async def Draft(self, request_iterator, context):
        async for req in request_iterator:
            if req.WhichOneof("kind") == "rollback":
                raise Refused("rollback refused")
            if req.WhichOneof("kind") == "stop":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "own abort")
            yield pb.DraftResponse(proposal=pb.DraftProposal(position=7))


@pytest.fixture()
def stub():
    loop = asyncio.new_event_loop()

    async def start() -> tuple[Server, int]:
        server = Server.serving(Raising(), "DraftService", label="draft service",
                                max_sessions=0, statuses=STATUSES)
        return server, await server.start(0, "127.0.0.1")

    server, port = loop.run_until_complete(start())

    def call(coro):
        return loop.run_until_complete(coro)

    async def info(what: str):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            return await pearl_pb2_grpc.DraftServiceStub(ch).GetModelInfo(
                pb.ModelInfoRequest(), metadata=(("what", what),))

    async def draft(kinds: list[str]):
        got = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reqs = [pb.DraftRequest(**{k: {"start": pb.DraftStart(), "extend": pb.DraftExtend(),
                                           "rollback": pb.DraftRollback(),
                                           "stop": pb.DraftStop()}[k]}) for k in kinds]
            try:
                async for resp in pearl_pb2_grpc.DraftServiceStub(ch).Draft(iter(reqs)):
                    got.append(resp.proposal.position)
            except grpc.aio.AioRpcError as e:
                return got, e
        return got, None

    yield call, info, draft
    loop.run_until_complete(server.stop(0))
    loop.close()


def error(call, coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        call(coro)
    return e.value


def test_a_mapped_exception_answers_its_status_and_text(stub):
    call, info, _ = stub
    e = error(call, info("refused"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == "no such model"
    e = error(call, info("sub"))  # a subclass takes its nearest base's status
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == "sub refused"


def test_a_status_chosen_per_exception(stub):
    call, info, _ = stub
    e = error(call, info("busy"))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.details() == "busy (RESOURCE_EXHAUSTED)"


def test_an_unmapped_exception_is_internal_and_names_the_method(stub):
    call, info, _ = stub
    e = error(call, info("bug"))
    assert e.code() == grpc.StatusCode.INTERNAL
    assert e.details() == "/pearl.v1.DraftService/GetModelInfo: internal error: KeyError: 'oops'"


def test_a_stream_keeps_what_it_sent_before_the_error(stub):
    call, _, draft = stub
    got, e = call(draft(["start", "extend", "rollback", "extend"]))
    assert got == [7, 7]
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == "rollback refused"


def test_a_handlers_own_abort_passes_through(stub):
    call, _, draft = stub
    got, e = call(draft(["start", "stop"]))
    assert got == [7]
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and e.details() == "own abort"
