"""One request as every schedule sees it: its plan, its committed sequence, the target's answers
still due, and the one rule by which a verdict commits (docs/design.md section 4).

The target's answer to a window of n draft tokens at position L is a ``Verdict`` (accepted k,
token t): positions L..L+k-1 keep the draft tokens, and position L+k gets t: the correction if
k < n, the bonus if k == n and a bonus was asked for. Without a bonus the target instead *holds*
the distribution of position L+n, and the draft's token there is judged with it later at no
forward-pass cost (a "held" window). That rule is ``Request.decide``; the schedules
(coordinator/schedule.py) only choose what to ask next.
"""

import asyncio
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.links import DraftLink, Event, TargetLink
from coordinator.output import Output
from coordinator.timing import Timing
from protos.v1 import pearl_pb2 as pb
from specdec.answers import Proposal, Verdict
from specdec.defaults import DEFAULT_DRAFT_TIMEOUT_S, DEFAULT_GAMMA_MAX
from specdec.logprobs import TokenLogprob
from specdec.stats import Recorder


class ServiceLost(RuntimeError):
    """The target's stream ended or failed in the middle of a request."""

    def __init__(self, source: str, detail: str, code=None):
        super().__init__(f"{source} service stream ended during the request: {detail}")
        self.source = source
        self.code = code  # the grpc.StatusCode the service ended with, if any


class DraftLost(RuntimeError):
    """The draft can no longer help this request: the target finishes it alone."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Plan:
    """One request as the schedules see it."""

    session_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    max_positions: int  # the smaller of the two models' context lengths
    gamma: int | None = None  # fixed window; None = adaptive (pearl)
    gamma_max: int = DEFAULT_GAMMA_MAX
    # passed to the services as it is
    sampling: pb.SamplingParams = field(default_factory=pb.SamplingParams)
    draft_timeout_s: float = DEFAULT_DRAFT_TIMEOUT_S  # a silent draft is given up
    logprobs: int | None = None  # None, or the top alternatives to report with each logprob

    @property
    def sampled(self) -> bool:
        return self.sampling.temperature > 0


class WindowKind(StrEnum):
    """What a window asks of the target; its label on the wire (``VerifyWindow.phase``), in the
    target's traces and metrics."""

    AR = "ar"  # no draft tokens, a bonus: the target chooses the token (ar, fallback, pearl off)
    SD = "sd"  # sd's window of gamma draft tokens, with a bonus
    TREE = "ht"  # Hidden Transfer: no draft tokens, the target drafts for itself
    PRE = "pre"  # pearl: the correction fed with the draft tokens after it
    HELD = "held"  # pearl: one draft token judged with the held distribution, no forward pass
    POST = "post"  # pearl: an accepted held token fed with the draft tokens after it


@dataclass
class Asked:
    """A request sent to the target whose verdict has not been consumed yet."""

    draft_ids: list[int]
    kind: WindowKind | None = None  # None: the start (the prefill)
    window_id: int = 0  # 0: a start or an empty (ar) window
    offset: int = 0  # position of the first draft token within its window (statistics)


class Request:
    """One request's committed sequence, its two links and their events, the target's answers
    still due, the output and the statistics; and the one rule by which a verdict commits."""

    def __init__(self, plan: Plan, target: TargetLink, draft: DraftLink | None,
                 events: asyncio.Queue, out: Output, rec: Recorder, timing: Timing):
        self.plan, self.target, self.draft = plan, target, draft
        self.events, self.out, self.rec, self.timing = events, out, rec, timing
        self.committed = list(plan.prompt_ids)
        self.due: deque[Asked] = deque()  # the target answers these in order
        self.target_started = False
        self.next_window_id = 1
        self.draft_lost: str | None = None  # why the target goes on alone

    # -- asking the target

    async def start_target(self, first_token: bool, hidden_transfer: bool = False) -> None:
        self.target_started = True
        self.due.append(Asked([]))
        await self.target.start(self.plan.session_id, self.plan.prompt_ids, self.plan.sampling,
                                first_token, hidden_transfer=hidden_transfer,
                                logprobs=self.plan.logprobs)

    async def ask(self, draft_ids: list[int], qs: list, window_id: int, kind: WindowKind,
                  offset: int = 0, bonus: bool = False, held: bool = False) -> None:
        """Verify ``draft_ids`` at the committed end."""
        self.due.append(Asked(list(draft_ids), kind, window_id, offset))
        await self.target.verify(len(self.committed), list(draft_ids), qs, window_id, kind,
                                 bonus=bonus, held=held)

    # -- the commit rule

    def decide(self, v: Verdict) -> bool:
        """Commit what the target decided for the oldest request due: the accepted prefix of
        the draft tokens, then its own token if it chose one, with the target's logprobs of
        exactly these tokens when asked for. True when generation has ended."""
        asked = self.due.popleft()
        if asked.window_id:
            self.rec.verified(asked.window_id, asked.offset, v.verified, v.accepted)
        drafts = asked.draft_ids or v.accepted_ids  # hidden transfer: it drafted them itself
        ids = drafts[: v.accepted] + ([] if v.token_id is None else [v.token_id])
        if self.plan.logprobs is not None and len(v.logprobs) != len(ids):
            raise ServiceLost("target", f"its verdict at position {v.position} has "
                              f"{len(v.logprobs)} logprobs for {len(ids)} committed tokens")
        return self.commit(ids, v.logprobs)

    def commit(self, ids: list[int], logprobs: list[TokenLogprob]) -> bool:
        self.committed.extend(ids)
        self.rec.committed()
        return self.out.commit(ids, logprobs)

    # -- events

    async def next_event(self) -> Event:
        """The next answer of either service, its forward pass recorded. Raises ServiceLost when
        the target's stream ends, DraftLost when the draft's ends or it stays silent while only
        it can wake us; once the draft is lost, its events are dropped."""
        while True:
            timeout = None
            if (self.draft is not None and self.draft_lost is None and self.plan.draft_timeout_s
                    and not self.due):
                timeout = self.plan.draft_timeout_s
            try:  # asyncio.timeout, not wait_for: 3.11's drops a cancel (design.md section 11)
                async with asyncio.timeout(timeout):
                    ev: Event = await self.events.get()
            except TimeoutError:
                raise DraftLost(f"no draft proposal within {timeout:g} s") from None
            if ev.source == "target":
                self.target_answered(ev)
                return ev
            if self.draft_lost is None:
                self.draft_answered(ev)
                return ev

    def target_answered(self, ev: Event) -> None:
        """Record the target's forward pass behind a verdict (a held verdict ran none); pearl's
        window learns from draft-verify windows (not from the prefill or a tree step)."""
        if ev.msg is None:
            detail = ev.error.details() if ev.error is not None else "closed by the service"
            raise ServiceLost("target", detail, ev.error.code() if ev.error is not None else None)
        v: Verdict = ev.msg
        kind = self.due[0].kind  # what the verdict answers: the target answers in order
        step = v.step
        if step.input_tokens:
            self.rec.target_forward(ev.arrived_ns, step.forward_ns, step.input_tokens,
                                    prefill=kind is None, queue_ns=step.queue_ns,
                                    batch_rows=step.batch_rows, cached=step.cached_tokens)
            if kind not in (None, WindowKind.TREE):
                self.timing.verify(step.forward_ns, step.batch_tokens, step.batch_rows)
                self.timing.judged(v.verified, v.accepted)

    def draft_answered(self, ev: Event) -> None:
        """Record the draft's forward pass behind a proposal; raise DraftLost when its stream
        ended."""
        if ev.msg is None:
            if ev.error is not None:
                raise DraftLost(f"draft stream failed: {ev.error.code().name}: "
                                f"{ev.error.details()}")
            raise DraftLost("draft stream closed by the service")
        step = ev.msg.step
        self.rec.draft_forward(ev.arrived_ns, step.forward_ns, step.input_tokens, step.queue_ns,
                               step.cached_tokens)
        self.timing.draft(step.forward_ns, step.input_tokens)

    async def next_verdict(self) -> Verdict:
        """The target's next verdict (sequential schedules: a draft event now is stale)."""
        while (ev := await self.next_event()).source != "target":
            self.rec.stale += 1
        return ev.msg

    async def next_proposal(self) -> Proposal[pb.TokenDistribution]:
        while (ev := await self.next_event()).source != "draft":
            self.rec.stale += 1
        return ev.msg

    def lose_draft(self, reason: str) -> None:
        self.draft_lost = reason
        self.rec.fallback_reason = reason
        if self.draft is not None:
            self.draft.cancel()  # frees the draft's session if it is still there

    # -- windows

    def window_len(self, gamma: int, start: int) -> int:
        """gamma, trimmed so the draft never drafts past the last useful position."""
        left = self.plan.max_new_tokens - (start - len(self.plan.prompt_ids))
        room = self.plan.max_positions - 1 - start
        return max(1, min(gamma, left - 1, room))

    def take_window_id(self) -> int:
        self.next_window_id += 1
        return self.next_window_id - 1
