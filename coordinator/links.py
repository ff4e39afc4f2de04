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
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.logprobs import TokenLogprob
from specdec.serving import CHANNEL_OPTIONS
from specdec.telemetry import inject_context
from specdec.wire import logprob_from_pb

BACKEND_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 4000),
]


def draft_down(channel: grpc.aio.Channel | None) -> str | None:
    """Why a new request should not wait for the draft, or None when it may use it."""
    if channel is None:
        return None
    state = channel.get_state(try_to_connect=True)
    if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        return "draft service unreachable at the start of the request (reconnecting)"
    return None


@dataclass
class Proposal:
    """A token the draft drafted."""

    window_id: int
    position: int
    token_id: int
    q: Any = None  # the distribution it was drawn from (pb.TokenDistribution; sampling only)
    forward_ns: int = 0
    input_tokens: int = 1  # tokens fed in its forward pass (more after a rollback)
    queue_ns: int = 0  # time its step waited in the draft's engine queue
    cached_tokens: int = 0  # a session's first proposal: prompt tokens its prefix cache held


@dataclass
class Verdict:
    """The target's answer to a start or a window at ``position``: the first ``accepted`` of the
    ``verified`` draft tokens stand, then ``token`` (None: the target holds the distribution of
    the next position instead of choosing a token)."""

    position: int
    verified: int
    accepted: int
    token: int | None
    committed: int  # committed length after it
    window_id: int = 0
    phase: str = ""  # the phase of the request, echoed ("start" for the prefill)
    forward_ns: int = 0
    input_tokens: int = 0  # 0: no forward pass ran (a held verdict)
    accepted_ids: list[int] = field(default_factory=list)  # hidden transfer: its own drafts kept
    queue_ns: int = 0  # time the forward pass waited in the target's engine queue
    batch_rows: int = 0  # sessions in that engine step (0: no forward pass ran)
    batch_tokens: int = 0  # tokens fed in that step, all sessions together
    # when asked for: one per token it commits (accepted drafts or accepted_ids, then token)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0  # a start: prompt tokens the target's prefix cache held


def proposal_from_pb(p: pb.DraftProposal) -> Proposal:
    return Proposal(p.window_id, p.position, p.token_id, p.q if p.HasField("q") else None,
                    p.forward_ns, p.input_tokens, p.queue_ns, p.cached_tokens)


def verdict_from_pb(r: pb.VerifyResult) -> Verdict:
    return Verdict(r.position, r.verified, r.accepted, r.token_id if r.has_token else None,
                   r.committed, r.window_id, r.phase, r.forward_ns, r.input_tokens,
                   list(r.accepted_ids), r.queue_ns, r.batch_rows, r.batch_tokens,
                   [logprob_from_pb(t) for t in r.logprobs], r.cached_tokens)


@dataclass
class Event:
    source: str  # "draft" or "target"
    msg: Proposal | Verdict | None  # None when the stream ended
    arrived_ns: int
    error: grpc.RpcError | None = None


class _Outbox:
    """A call whose writes are queued and sent in order by one task: ``write`` never blocks nor
    raises, and no two writes are ever in flight on the call. gRPC takes one write at a time: a
    second one fails the call locally with INTERNAL, after which its cancel never reaches the
    service, which keeps the session open until its idle expiry (issue 14, fault 2).

    Nothing is written until the service accepted the session: its guard sends the headers at
    once (specdec/limits.py). A write racing a refusal would likewise turn the service's own
    status (RESOURCE_EXHAUSTED at its session limit) into INTERNAL (issue 14, fault 7). Once a
    write fails the rest are dropped; the reader reports the failure."""

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
        self.call = _Outbox(call)
        self.events = events
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for resp in self.call:
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
        await self.call.write(stop_msg)
        await self.call.done_writing(grace_s)
        await asyncio.wait({self.reader}, timeout=grace_s)
        self.cancel()

    def cancel(self) -> None:
        """End the stream now, its reader and writer tasks with it (the service frees its
        session); never blocks."""
        self.reader.cancel()
        self.call.cancel()


class DraftLink(_Link):
    source = "draft"

    @classmethod
    def open(cls, channel: grpc.aio.Channel, events: asyncio.Queue) -> "DraftLink":
        return cls(pearl_pb2_grpc.DraftServiceStub(channel).Draft(), events)

    def _unwrap(self, resp):
        return proposal_from_pb(resp.proposal)

    async def start(self, session_id: str, prompt_ids: list[int], window_id: int,
                    draft_until: int, sampling: pb.SamplingParams) -> None:
        await self.call.write(pb.DraftRequest(start=pb.DraftStart(
            session_id=session_id, prompt_ids=prompt_ids, sampling=sampling,
            window_id=window_id, draft_until=draft_until, trace_context=inject_context())))

    async def extend(self, window_id: int, draft_until: int) -> None:
        await self.call.write(pb.DraftRequest(
            extend=pb.DraftExtend(window_id=window_id, draft_until=draft_until)))

    async def rollback(self, keep: int, append_ids: list[int], window_id: int,
                       draft_until: int) -> None:
        await self.call.write(pb.DraftRequest(rollback=pb.DraftRollback(
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
        await self.call.write(pb.VerifyRequest(start=pb.VerifyStart(
            session_id=session_id, prompt_ids=prompt_ids, sampling=sampling,
            first_token=first_token, trace_context=inject_context(),
            hidden_transfer=hidden_transfer, logprobs=logprobs is not None,
            top_logprobs=logprobs or 0)))

    async def verify(self, position: int, draft_ids: list[int], qs: list, window_id: int,
                     phase: str, bonus: bool = False, held: bool = False) -> None:
        await self.call.write(pb.VerifyRequest(window=pb.VerifyWindow(
            position=position, draft_ids=draft_ids, q=[q for q in qs if q is not None],
            window_id=window_id, phase=phase, bonus=bonus, held=held)))

    async def stop(self) -> None:
        await self.close(pb.VerifyRequest(stop=pb.VerifyStop()))
