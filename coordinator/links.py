"""One request's two streams: to the draft and to the target, with their answers merged into one
queue of events stamped with their arrival time."""

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.telemetry import inject_context


@dataclass
class Event:
    source: str  # "draft" or "target"
    msg: Any  # DraftProposal or VerifyResult; None when the stream ended
    arrived_ns: int
    error: grpc.RpcError | None = None


class _Link:
    source = ""

    def __init__(self, call, events: asyncio.Queue):
        self.call = call
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

    async def close(self, stop_msg) -> None:
        try:
            await self.call.write(stop_msg)
            await self.call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        self.reader.cancel()
        self.call.cancel()


class DraftLink(_Link):
    source = "draft"

    @classmethod
    def open(cls, channel: grpc.aio.Channel, events: asyncio.Queue) -> "DraftLink":
        return cls(pearl_pb2_grpc.DraftServiceStub(channel).Draft(), events)

    def _unwrap(self, resp):
        return resp.proposal

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
        return resp.result

    async def start(self, session_id: str, prompt_ids: list[int], sampling: pb.SamplingParams,
                    first_token: bool, hidden_transfer: bool = False) -> None:
        await self.call.write(pb.VerifyRequest(start=pb.VerifyStart(
            session_id=session_id, prompt_ids=prompt_ids, sampling=sampling,
            first_token=first_token, trace_context=inject_context(),
            hidden_transfer=hidden_transfer)))

    async def verify(self, position: int, draft_ids: list[int], qs: list, window_id: int,
                     phase: str, bonus: bool = False, held: bool = False) -> None:
        await self.call.write(pb.VerifyRequest(window=pb.VerifyWindow(
            position=position, draft_ids=draft_ids, q=[q for q in qs if q is not None],
            window_id=window_id, phase=phase, bonus=bonus, held=held)))

    async def stop(self) -> None:
        await self.close(pb.VerifyRequest(stop=pb.VerifyStop()))
