"""One request's two streams: to the draft and to the target, with their answers merged into one
queue of events stamped with their arrival time.

This is the edge where protobuf ends: each answer is turned into a plain ``Proposal`` or
``Verdict`` before the schedules see it. What the schedules pass through untouched is opaque to
them: the sampling parameters and the draft's distribution ``q``, handed to the target as they
came.

Writes never block or raise (``_Outbox``): a dead or unreachable service cannot stall the
schedule; its failure arrives as an event from the reader. The channels to draft and target
reconnect by themselves with a short capped backoff (``BACKEND_OPTIONS``).
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import grpc

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.answers import Proposal, Verdict
from specdec.limits import ACCEPTED_KEY
from specdec.serving import CHANNEL_OPTIONS
from specdec.telemetry import inject_context
from specdec.wire import proposal_from_pb, verdict_from_pb

BACKEND_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 4000),
]


@dataclass
class Event:
    """An answer of one service, stamped with its arrival."""

    source: Literal["draft", "target"]
    msg: Proposal[pb.TokenDistribution] | Verdict | None  # None when the stream ended
    arrived_ns: int
    error: grpc.RpcError | None = None


class _Outbox:
    """A call whose writes are queued and sent in order by one task: ``write`` never blocks nor
    raises, and no two writes are ever in flight on the call. gRPC takes one write at a time: a
    second one fails the call locally with INTERNAL, after which its cancel never reaches the
    service, which keeps the session open until its idle expiry.

    Nothing is written until the service accepted the session: its guard sends the headers at
    once (specdec/limits.py). A write racing a refusal would likewise turn the service's own
    status (RESOURCE_EXHAUSTED at its session limit) into INTERNAL. Once a write fails the rest
    are dropped; the reader reports the failure."""

    def __init__(self, call):
        self.call = call
        self.queue: asyncio.Queue = asyncio.Queue()
        self.writer = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            await self.call.initial_metadata()  # accepted, or refused: then the call is done
            if self.call.done():
                return
            while (msg := await self.queue.get()) is not None:
                await self.call.write(msg)
            await self.call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass

    async def write(self, msg) -> None:
        self.queue.put_nowait(msg)

    async def done_writing(self, timeout_s: float = 1.0) -> None:
        if self.writer.done():  # finished, failed or cancelled
            return
        self.queue.put_nowait(None)
        await asyncio.wait({self.writer}, timeout=timeout_s)  # never raises the writer's error

    def __aiter__(self):
        return self.call.__aiter__()

    def cancel(self) -> bool:
        self.writer.cancel()
        return self.call.cancel()


class _Link:
    source = ""

    def __init__(self, call, events: asyncio.Queue):
        self.outbox = _Outbox(call)
        self.events = events
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for resp in self.outbox:
                await self.events.put(Event(self.source, self._unwrap(resp), time.monotonic_ns()))
            await self.events.put(Event(self.source, None, time.monotonic_ns()))
        except grpc.RpcError as e:
            await self.events.put(Event(self.source, None, time.monotonic_ns(), e))
        except asyncio.CancelledError:
            pass

    def _unwrap(self, resp):
        raise NotImplementedError

    async def close(self, stop_msg, grace_s: float = 2.0) -> None:
        """Send ``stop_msg`` after everything queued, half-close, and give the service up to
        ``grace_s`` to end the stream by itself (it leaves its handler by its normal path and
        frees the session); then cancel the call."""
        await self.outbox.write(stop_msg)
        await self.outbox.done_writing(grace_s)
        await asyncio.wait({self.reader}, timeout=grace_s)
        self.cancel()

    def cancel(self) -> None:
        """End the stream now, its reader and writer tasks with it (the service frees its
        session); never blocks."""
        self.reader.cancel()
        self.outbox.cancel()

    async def refusal(self, timeout_s: float) -> tuple[grpc.StatusCode, str] | None:
        """None once the service accepted the session (its guard sent the headers), else why
        not: its status, or DEADLINE_EXCEEDED when no headers came within ``timeout_s``."""
        call = self.outbox.call
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for (design.md section 11)
                md = await call.initial_metadata()
            if md is not None and any(k == ACCEPTED_KEY for k, _ in md):
                return None
            return await call.code(), await call.details()
        except TimeoutError:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to the session's start"
        except grpc.RpcError as e:
            return e.code(), e.details()


class DraftLink(_Link):
    source = "draft"

    @classmethod
    def open(cls, channel: grpc.aio.Channel, events: asyncio.Queue) -> "DraftLink":
        return cls(pearl_pb2_grpc.DraftServiceStub(channel).Draft(), events)

    def _unwrap(self, resp):
        return proposal_from_pb(resp.proposal)

    async def start(self, session_id: str, prompt_ids: list[int], window_id: int,
                    draft_until: int, sampling: pb.SamplingParams) -> None:
        await self.outbox.write(pb.DraftRequest(start=pb.DraftStart(
            session_id=session_id, prompt_ids=prompt_ids, sampling=sampling,
            window_id=window_id, draft_until=draft_until, trace_context=inject_context())))

    async def extend(self, window_id: int, draft_until: int) -> None:
        await self.outbox.write(pb.DraftRequest(
            extend=pb.DraftExtend(window_id=window_id, draft_until=draft_until)))

    async def rollback(self, keep: int, append_ids: list[int], window_id: int,
                       draft_until: int) -> None:
        await self.outbox.write(pb.DraftRequest(rollback=pb.DraftRollback(
            keep=keep, append_ids=append_ids, window_id=window_id, draft_until=draft_until)))

    async def stop(self) -> None:
        await self.close(pb.DraftRequest(stop=pb.DraftStop()))


class TargetLink(_Link):
    source = "target"

    @classmethod
    def open(cls, channel: grpc.aio.Channel, events: asyncio.Queue) -> "TargetLink":
        return cls(pearl_pb2_grpc.TargetServiceStub(channel).Verify(), events)

    def _unwrap(self, resp):
        return verdict_from_pb(resp.result)

    async def start(self, session_id: str, prompt_ids: list[int], sampling: pb.SamplingParams,
                    first_token: bool, hidden_transfer: bool = False,
                    logprobs: int | None = None) -> None:
        """``logprobs``: None, or the top alternatives to report with each token's logprob."""
        await self.outbox.write(pb.VerifyRequest(start=pb.VerifyStart(
            session_id=session_id, prompt_ids=prompt_ids, sampling=sampling,
            first_token=first_token, trace_context=inject_context(),
            hidden_transfer=hidden_transfer, logprobs=logprobs is not None,
            top_logprobs=logprobs or 0)))

    async def verify(self, position: int, draft_ids: list[int], qs: list, window_id: int,
                     kind: str, bonus: bool = False, held: bool = False) -> None:
        """``kind``: what the window asks (request.WindowKind), its label on the wire."""
        await self.outbox.write(pb.VerifyRequest(window=pb.VerifyWindow(
            position=position, draft_ids=draft_ids, q=[q for q in qs if q is not None],
            window_id=window_id, phase=kind, bonus=bonus, held=held)))

    async def stop(self) -> None:
        await self.close(pb.VerifyRequest(stop=pb.VerifyStop()))
