"""The draft closing its stream cleanly (status OK) in the middle of a request: the coordinator
finishes with the target alone, the same greedy tokens, and says so in the statistics (README:
"if it dies, closes its stream or stalls"). A proxy in front of the real draft service relays a
few proposals, then ends the call without an error."""

import asyncio

import grpc
import pytest

from cluster import Cluster
from conftest import greedy_reference
from coordinator.server import serve as serve_coordinator
from pearl.client import Client
from protos.v1 import pearl_pb2_grpc
from specdec.serving import Server

PROMPT = [5, 17, 33, 2, 9, 41]
N = 40


class ClosingDraft(pearl_pb2_grpc.DraftServiceServicer):
    """Relays to the draft at ``upstream``; each Draft call ends with OK after ``after``
    proposals."""

    def __init__(self, upstream: str, after: int):
        self.channel = grpc.aio.insecure_channel(upstream)
        self.stub = pearl_pb2_grpc.DraftServiceStub(self.channel)
        self.after = after
        self.closed = 0

    async def GetModelInfo(self, request, context):
        return await self.stub.GetModelInfo(request)

    async def Draft(self, request_iterator, context):
        call = self.stub.Draft()

        async def pump():
            async for msg in request_iterator:
                await call.write(msg)

        task = asyncio.create_task(pump())
        sent = 0
        try:
            async for proposal in call:
                yield proposal
                sent += 1
                if sent == self.after:
                    self.closed += 1
                    return  # the stream ends cleanly, in the middle of the request
        finally:
            task.cancel()
            call.cancel()


@pytest.fixture
def closing(tiny_draft, tiny_target):
    c = Cluster(tiny_draft, tiny_target)

    async def start():
        proxy = ClosingDraft(c.draft_address, after=6)  # its channel lives on the cluster's loop
        server = Server(["pearl.v1.DraftService"])
        pearl_pb2_grpc.add_DraftServiceServicer_to_server(proxy, server.grpc)
        await server.start(0, "127.0.0.1")
        coord, servicer = await serve_coordinator(c.target_address,
                                                  f"127.0.0.1:{server.port}", 0, "127.0.0.1")
        return proxy, server, coord, servicer

    proxy, server, coord, servicer = c.call(start())
    yield c, proxy, f"127.0.0.1:{coord.port}"
    c.call(coord.stop(1))
    c.call(servicer.close())
    c.call(server.stop(1))
    c.close()


@pytest.mark.parametrize("mode", ["pearl", "sd"])
def test_draft_closing_its_stream_mid_request(closing, tiny_target, mode):
    c, proxy, address = closing
    ref = greedy_reference(tiny_target, PROMPT, N)
    with Client(address, timeout_s=60) as cl:
        r = cl.complete(PROMPT, mode=mode, max_new_tokens=N, ignore_eos=True)
    assert proxy.closed == 1, "the proxy never closed a stream"
    assert r.token_ids == ref
    s = r.stats
    assert s["fell_back"] and "draft" in s["fallback_reason"], s["fallback_reason"]
    assert 0 < s["draft_tokens"] <= 6 and s["new_tokens"] == N
