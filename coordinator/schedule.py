"""The decoding schedules: ar, sd, pearl and hidden-transfer (docs/design.md section 4).

Every schedule talks to the target through one Verify stream and (sd, pearl) to the draft through
one Draft stream, and commits what the target decides. The target's answer to a window of n draft
tokens at position L is (accepted k, token t): positions L..L+k-1 keep the draft tokens, and
position L+k gets t: the correction if k < n, the bonus if k == n and a bonus was asked for.
Without a bonus the target instead *holds* the distribution of position L+n, and the draft's
token there is judged with it later at no forward-pass cost ("held" verdict). Everything below
is bookkeeping of that one rule.

- ar: start (first token), then windows of zero draft tokens: one token per target forward.
- sd: the draft drafts gamma tokens, the target verifies them (with a bonus), the draft rolls
  back; strictly in turn.
- pearl: draft and target run at the same time.
    pre-verify  (at start and after a rejection): the first token of a new window goes to the
                target the moment it arrives while the draft drafts the rest of the window.
    post-verify (after an accepted window): the target verifies the rest of the current window
                while the draft drafts the next one.
  A rejection commits the accepted prefix and the correction, rolls the draft back (its windows in
  flight become stale) and switches to pre. pearl never takes a bonus: after a fully accepted
  window the draft's own next token (drafted meanwhile) is judged with the held distribution, so
  every position is decided by the same rule on the draft token at that position. The output is
  therefore independent of window lengths and of timing, for greedy and seeded sampling alike.
  gamma = ceil(t_verify / t_draft) from the services' measured forward times, clamped to
  [1, gamma_max], unless a fixed gamma is asked for.
- hidden-transfer: the target alone, drafting for itself (target_service/hidden_transfer.py):
  every window is empty and the target answers with the drafts it accepted plus its own token.
"""

import math
from dataclasses import dataclass

from coordinator.fallback import DEFAULT_DRAFT_TIMEOUT_S, next_live_event
from coordinator.links import DraftLink, Event, TargetLink
from coordinator.output import Output
from specdec.defaults import DEFAULT_GAMMA, DEFAULT_GAMMA_MAX
from specdec.stats import Recorder


class ServiceLost(RuntimeError):
    """A model service's stream ended or failed in the middle of a request."""

    def __init__(self, source: str, detail: str, code=None):
        super().__init__(f"{source} service stream ended during the request: {detail}")
        self.source = source
        self.code = code  # the grpc.StatusCode the service ended with, if any


@dataclass
class Plan:
    """One request as the schedules see it."""

    session_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    max_positions: int  # the smaller of the two models' context lengths
    gamma: int | None = None  # fixed window; None = adaptive (pearl)
    gamma_max: int = DEFAULT_GAMMA_MAX
    sampling: object = None  # SamplingParams, passed to the services as it is
    draft_timeout_s: float = DEFAULT_DRAFT_TIMEOUT_S  # a silent draft is given up (fallback.py)


class Timing:
    """Moving averages of one draft step and one target verification, in ns.

    Shared by all requests of a coordinator (they run on the same pair of services)."""

    def __init__(self, alpha: float = 0.2, gamma_init: int = DEFAULT_GAMMA):
        self.alpha = alpha
        self.gamma_init = gamma_init
        self.t_draft: float | None = None
        self.t_verify: float | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def draft(self, forward_ns: int, input_tokens: int) -> None:
        if input_tokens <= 2:  # a decode step; prefills and catch-ups are not
            self.t_draft = self._ema(self.t_draft, forward_ns)

    def verify(self, forward_ns: int) -> None:
        self.t_verify = self._ema(self.t_verify, forward_ns)

    def gamma(self, gamma_max: int) -> int:
        if self.t_draft is None or self.t_verify is None:
            return min(self.gamma_init, gamma_max)
        return max(1, min(gamma_max, math.ceil(self.t_verify / self.t_draft)))


class Schedule:
    """State and helpers shared by the schedules: the committed sequence and the event queue."""

    def __init__(self, plan: Plan, target: TargetLink, draft: DraftLink | None, events,
                 out: Output, rec: Recorder, timing: Timing):
        self.plan, self.target, self.draft = plan, target, draft
        self.events, self.out, self.rec, self.timing = events, out, rec, timing
        self.committed = list(plan.prompt_ids)
        self.next_window_id = 1
        self.draft_lost: str | None = None  # why the target goes on alone (coordinator/fallback.py)

    def window_len(self, gamma: int, start: int) -> int:
        """gamma, trimmed so the draft never drafts past the last useful position."""
        left = self.plan.max_new_tokens - (start - len(self.plan.prompt_ids))
        room = self.plan.max_positions - 1 - start
        return max(1, min(gamma, left - 1, room))

    def commit(self, ids: list[int]) -> bool:
        """Commit ids (already decided by the target); True when generation has ended."""
        self.committed.extend(ids)
        self.rec.committed()
        return self.out.commit(ids)

    async def next_event(self) -> Event:
        ev: Event = await next_live_event(self)  # DraftLost when the draft fails or stalls
        if ev.msg is None:
            detail = ev.error.details() if ev.error is not None else "closed by the service"
            raise ServiceLost(ev.source, detail, ev.error.code() if ev.error is not None else None)
        if ev.source == "draft":
            self.rec.draft_forward(ev.arrived_ns, ev.msg.forward_ns, ev.msg.input_tokens)
            self.timing.draft(ev.msg.forward_ns, ev.msg.input_tokens)
        elif ev.msg.input_tokens:  # a held verdict ran no forward pass
            self.rec.target_forward(ev.arrived_ns, ev.msg.forward_ns, ev.msg.input_tokens,
                                    prefill=ev.msg.phase == "start")
            if ev.msg.phase not in ("start", "ht"):  # pearl's gamma: draft-verify windows only
                self.timing.verify(ev.msg.forward_ns)
        return ev

    async def next_from(self, source: str):
        """The next message from ``source`` (sequential schedules expect nothing else)."""
        while True:
            ev = await self.next_event()
            if ev.source == source:
                return ev.msg
            self.rec.stale += 1

    def take_window_id(self) -> int:
        self.next_window_id += 1
        return self.next_window_id - 1


async def run_ar(s: Schedule) -> None:
    """The target alone: one token per forward pass."""
    await s.target.start(s.plan.session_id, s.plan.prompt_ids, s.plan.sampling, True)
    while True:
        r = await s.next_from("target")
        if s.commit([r.token_id]):
            return
        await s.target.verify(len(s.committed), [], [], 0, "ar", bonus=True)


async def run_hidden_transfer(s: Schedule) -> None:
    """The target alone, drafting for itself: several tokens per forward pass, no draft."""
    await s.target.start(s.plan.session_id, s.plan.prompt_ids, s.plan.sampling, True,
                         hidden_transfer=True)
    r = await s.next_from("target")
    if s.commit([r.token_id]):
        return
    while True:
        wid = s.take_window_id()
        await s.target.verify(len(s.committed), [], [], wid, "ht")
        r = await s.next_from("target")
        s.rec.window(r.verified)  # future positions the tree offered
        s.rec.verified(wid, 0, r.verified, r.accepted)
        if s.commit(list(r.accepted_ids) + [r.token_id]):
            return


async def run_sd(s: Schedule, gamma: int) -> None:
    """Vanilla speculative decoding: draft a window, verify it, roll back; strictly in turn."""
    await s.target.start(s.plan.session_id, s.plan.prompt_ids, s.plan.sampling, True)
    r = await s.next_from("target")
    if s.commit([r.token_id]):
        return
    n = s.window_len(gamma, len(s.committed))
    wid = s.take_window_id()
    s.rec.window(n)
    await s.draft.start(s.plan.session_id, s.committed, wid, len(s.committed) + n,
                        s.plan.sampling)
    while True:
        position = len(s.committed)
        props = [await s.next_from("draft") for _ in range(n)]
        window = [p.token_id for p in props]
        qs = [p.q if p.HasField("q") else None for p in props]
        await s.target.verify(position, window, qs, wid, "sd", bonus=True)
        r = await s.next_from("target")
        s.rec.verified(wid, 0, len(window), r.accepted)
        if s.commit(window[: r.accepted] + [r.token_id]):
            return
        n = s.window_len(gamma, len(s.committed))
        wid = s.take_window_id()
        s.rec.window(n)
        await s.draft.rollback(position + r.accepted, [r.token_id], wid, len(s.committed) + n)


@dataclass
class Window:
    id: int
    start: int  # first position
    end: int  # one past the last position


class Pearl(Schedule):
    """PEARL: pre-verify and post-verify with the mode switch, over the two streams."""

    async def run(self) -> None:
        self.mode = "pre"
        self.drafted: dict[int, tuple[int, int, object]] = {}  # position -> (token, window, q)
        self.windows: list[Window] = []  # the draft's live windows, in order
        self.starts: dict[int, int] = {}  # window id -> start position (for statistics)
        self.oldest_live = 1  # proposals of older windows are stale
        self.inflight: tuple[int, list[int], int] | None = (len(self.committed), [], 0)
        self.held = False  # the target holds the distribution of the next position

        prompt = self.plan.prompt_ids
        # Both prefill at once; the target holds the first position's distribution.
        await self.target.start(self.plan.session_id, prompt, self.plan.sampling, False)
        w = self.open_window(len(prompt))
        await self.draft.start(self.plan.session_id, prompt, w.id, w.end, self.plan.sampling)
        while True:
            ev = await self.next_event()
            done = (self.on_proposal(ev.msg) if ev.source == "draft"
                    else await self.on_verdict(ev.msg))
            if done:
                return
            await self.send_verify()

    # -- windows -----------------------------------------------------------------------------

    def gamma(self) -> int:
        return self.plan.gamma or self.timing.gamma(self.plan.gamma_max)

    def open_window(self, start: int) -> Window:
        n = self.window_len(self.gamma(), start)
        w = Window(self.take_window_id(), start, start + n)
        self.windows.append(w)
        self.until = w.end  # the draft drafts up to here
        self.starts[w.id] = start
        self.rec.window(n)
        return w

    async def extend(self) -> None:
        """Ask the draft for the next window right after the last one."""
        w = self.open_window(self.until)
        await self.draft.extend(w.id, w.end)

    async def rollback(self, keep: int, token: int) -> None:
        """The draft keeps ``keep`` tokens, appends the target's token, starts a fresh window."""
        self.windows.clear()
        self.drafted.clear()
        w = self.open_window(keep + 1)
        self.oldest_live = w.id
        self.mode = "pre"
        await self.draft.rollback(keep, [token], w.id, w.end)

    # -- events ------------------------------------------------------------------------------

    def on_proposal(self, p) -> bool:
        if p.window_id < self.oldest_live:
            self.rec.stale += 1
        elif p.position >= len(self.committed):
            self.drafted[p.position] = (p.token_id, p.window_id, p.q if p.HasField("q") else None)
        return False

    async def on_verdict(self, r) -> bool:
        position, sent, wid = self.inflight
        self.inflight = None
        if sent:
            self.rec.verified(wid, position - self.starts[wid], len(sent), r.accepted)
        for q in range(position, position + len(sent)):
            self.drafted.pop(q, None)
        if self.commit(sent[: r.accepted] + ([r.token_id] if r.has_token else [])):
            return True
        if r.has_token:  # a rejection: the correction replaces the draft token
            await self.rollback(position + r.accepted, r.token_id)
        elif sent:  # all accepted: go on verifying behind them
            self.mode = "post"
        self.held = not r.has_token and r.phase != "held"  # a held verdict used it up
        return False

    # -- the target's next job ---------------------------------------------------------------

    async def send_verify(self) -> None:
        if self.inflight is not None:
            return
        L = len(self.committed)
        self.windows = [w for w in self.windows if w.end > L]
        if not self.windows:  # the draft has drafted all it was asked for (until == L)
            await self.extend()
            self.mode = "pre"
            return
        if L not in self.drafted:
            return
        if self.held:  # judge the draft's token with the held distribution: no forward pass
            await self.verify([L], "held")
        elif self.mode == "pre":  # the window's first token, the moment it exists
            await self.verify([L], "pre")
        else:  # the rest of the current window, once drafted
            w = self.windows[0]
            if all(q in self.drafted for q in range(L, w.end)):
                await self.verify(range(L, w.end), "post")
                if len(self.windows) == 1:  # draft the next window while the target verifies
                    await self.extend()

    async def verify(self, positions, phase: str) -> None:
        tokens, wids, qs = zip(*(self.drafted[q] for q in positions))
        self.inflight = (positions[0], list(tokens), wids[0])
        await self.target.verify(positions[0], list(tokens), list(qs), wids[0], phase,
                                 held=phase == "held")
