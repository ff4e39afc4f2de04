"""The draft is an accelerator, not a dependency (DESIGN.md section 11).

When the draft's stream fails, closes, refuses the session, or sends nothing for
``Plan.draft_timeout_s`` while the schedule waits on it alone, ``next_live_event`` raises
``DraftLost``; ``guarded`` catches it and ``finish_alone`` completes the request with the target
alone on the same Verify stream:

1. the target's answers still due (requests the schedule sent but has not consumed) are applied
   in order: each commits the draft ids it judged up to ``accepted`` plus the target's token, the
   same rule the schedules apply (``TrackedTargetLink`` remembers the ids of every request);
2. then windows of zero draft tokens ask the target for one token each: the ``ar`` schedule. When
   the target holds a distribution (pearl: after a start without a first token, or a fully
   accepted window without bonus), the first empty window is answered from it without a forward
   pass (see ``VerifyWindow.draft_ids`` in the proto).

Lossless because the schedules commit only what the target decides: greedy output is identical to
an undisturbed run; sampled output keeps the target's exact distribution (at the positions decided
after the loss the seeded draws differ from a pearl run's, as a different rule decides them).

Draft writes never block or raise (``QueuedDraftLink``): a dead or unreachable draft cannot stall
the schedule; its failure arrives as an event from the reader. The channels to draft and target
reconnect by themselves with a short capped backoff (``BACKEND_OPTIONS``); a request that starts
while the draft's channel is in TRANSIENT_FAILURE does not wait for it (``draft_down``).
"""

import asyncio

import grpc

from coordinator.links import DraftLink, Event, TargetLink
from specdec.serving import CHANNEL_OPTIONS

DEFAULT_DRAFT_TIMEOUT_S = 10.0
BACKEND_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 4000),
]


class DraftLost(RuntimeError):
    """The draft can no longer help this request."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Outbox:
    """A draft call whose writes are queued and sent in order by a task: ``write`` never blocks
    nor raises; once a write fails the rest are dropped (the reader reports the failure)."""

    def __init__(self, call):
        self.call = call
        self.queue: asyncio.Queue = asyncio.Queue()
        self.writer = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            while (msg := await self.queue.get()) is not None:
                await self.call.write(msg)
            await self.call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass

    async def write(self, msg) -> None:
        self.queue.put_nowait(msg)

    async def done_writing(self, timeout_s: float = 1.0) -> None:
        if self.writer.done():  # finished, failed or cancelled (the draft was given up)
            return
        self.queue.put_nowait(None)
        await asyncio.wait({self.writer}, timeout=timeout_s)  # never raises the writer's error

    def __aiter__(self):
        return self.call.__aiter__()

    def cancel(self) -> bool:
        self.writer.cancel()
        return self.call.cancel()


class QueuedDraftLink(DraftLink):
    """A DraftLink whose writes go through an ``_Outbox``."""

    def __init__(self, call, events: asyncio.Queue):
        super().__init__(_Outbox(call), events)


class TrackedTargetLink(TargetLink):
    """A TargetLink that remembers the draft ids of every request, in order, and counts answers,
    so that the answers still due when the draft is lost can be applied."""

    def __init__(self, call, events: asyncio.Queue):
        self.sent: list[list[int]] = []
        self.received = 0
        super().__init__(call, events)

    def _unwrap(self, resp):
        self.received += 1
        return super()._unwrap(resp)

    async def start(self, *args, **kw) -> None:
        self.sent.append([])
        await super().start(*args, **kw)

    async def verify(self, position: int, draft_ids: list[int], *args, **kw) -> None:
        self.sent.append(list(draft_ids))
        await super().verify(position, draft_ids, *args, **kw)


def draft_down(channel: grpc.aio.Channel | None) -> str | None:
    """Why a new request should not wait for the draft, or None when it may use it."""
    if channel is None:
        return None
    state = channel.get_state(try_to_connect=True)
    if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        return "draft service unreachable at the start of the request (reconnecting)"
    return None


def _target_busy(s) -> bool:
    t = s.target
    return isinstance(t, TrackedTargetLink) and len(t.sent) > t.received


async def next_live_event(s) -> Event:
    """The next event for schedule ``s``; raises DraftLost when the draft fails or stalls, and
    drops the draft's events once it is lost."""
    while True:
        timeout = None
        if (s.draft is not None and s.draft_lost is None and s.plan.draft_timeout_s
                and not _target_busy(s)):
            timeout = s.plan.draft_timeout_s  # only the draft can wake us: it must not stall
        try:
            ev: Event = await asyncio.wait_for(s.events.get(), timeout)
        except asyncio.TimeoutError:
            raise DraftLost(f"no draft proposal within {timeout:g} s") from None
        if ev.source != "draft":
            return ev
        if s.draft_lost is not None:
            continue
        if ev.msg is None:
            if ev.error is not None:
                raise DraftLost(f"draft stream failed: {ev.error.code().name}: "
                                f"{ev.error.details()}")
            raise DraftLost("draft stream closed by the service")
        return ev


def guarded(s, run):
    """``run`` (a schedule's coroutine function) finished by the target alone on DraftLost."""

    async def go() -> None:
        try:
            await run()
        except DraftLost as e:
            await finish_alone(s, e.reason)

    return go


async def finish_alone(s, reason: str) -> None:
    """Complete schedule ``s`` with the target alone, from what it has committed (see above)."""
    s.draft_lost = reason
    s.rec.fallback_reason = reason
    if s.draft is not None:
        s.draft.reader.cancel()
        s.draft.call.cancel()  # frees the draft's session if it is still there
    t: TrackedTargetLink = s.target
    if not t.sent:  # the target was not started yet
        await t.start(s.plan.session_id, s.plan.prompt_ids, s.plan.sampling, True)
    queued = []  # the target's answers not consumed yet stay; the draft's go
    while not s.events.empty():
        ev = s.events.get_nowait()
        if ev.source == "target":
            queued.append(ev)
    for ev in queued:
        s.events.put_nowait(ev)
    consumed = t.received - sum(ev.msg is not None for ev in queued)
    for judged in t.sent[consumed:]:
        r = (await s.next_event()).msg  # raises ServiceLost if the target is gone too
        if judged:
            s.rec.verified(r.window_id, 0, len(judged), r.accepted)
        if s.commit(judged[: r.accepted] + ([r.token_id] if r.has_token else [])):
            return
    while True:
        await t.verify(len(s.committed), [], [], 0, "ar", bonus=True)
        r = await s.next_from("target")
        if s.commit([r.token_id]):
            return
