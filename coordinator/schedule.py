"""The decoding schedules: ar, sd, pearl and hidden-transfer, and the target going on alone when
the draft is lost (docs/design.md sections 4 and 11).

Every schedule talks to the target through one Verify stream and (sd, pearl) to the draft through
one Draft stream, and commits only what the target decides. The target's answer to a window of n
draft tokens at position L is a ``Verdict`` (accepted k, token t): positions L..L+k-1 keep the
draft tokens, and position L+k gets t: the correction if k < n, the bonus if k == n and a bonus
was asked for. Without a bonus the target instead *holds* the distribution of position L+n, and
the draft's token there is judged with it later at no forward-pass cost (a "held" window). That
rule is ``Request.decide``; the schedules only choose what to ask next:

- ``Alone`` (ar): windows of zero draft tokens, one token per target forward.
- ``SD``: the draft drafts gamma tokens, the target verifies them (with a bonus), the draft rolls
  back; strictly in turn.
- ``Pearl``: draft and target at the same time (the state machine is described on the class);
  under a compute-bound load its adaptive window may be 0: it then decodes as ``Alone`` does,
  its draft parked, until the window comes back (``Timing``).
- ``HiddenTransfer``: the target alone, drafting for itself (target_service/hidden_transfer/):
  every window is empty and the target answers with the drafts it accepted plus its own token.

The draft is an accelerator, not a dependency. When its stream fails, closes, refuses the session,
or sends nothing for ``Plan.draft_timeout_s`` while the schedule waits on it alone,
``Request.next_event`` raises ``DraftLost``; ``decode`` then hands the request to ``Alone``, which
first applies the target's answers still due (requests sent but not consumed: ``Request.due``) by
the same rule, then goes on with empty windows. When the target holds a distribution (pearl),
the first empty window is answered from it without a forward pass. Lossless because every
schedule commits only what the target decides: greedy output is identical to an undisturbed run;
sampled output keeps the target's exact distribution (the seeded draws at positions decided after
the loss differ from a pearl run's, as a different rule decides them).
"""

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Literal, NamedTuple

from coordinator.links import DraftLink, Event, Proposal, TargetLink, Verdict
from coordinator.output import Output
from specdec.defaults import DEFAULT_DRAFT_TIMEOUT_S, DEFAULT_GAMMA, DEFAULT_GAMMA_MAX
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
    sampling: object = None  # pb.SamplingParams, passed to the services as it is
    draft_timeout_s: float = DEFAULT_DRAFT_TIMEOUT_S  # a silent draft is given up
    logprobs: int | None = None  # None, or the top alternatives to report with each logprob


class Line(NamedTuple):
    """A least-squares line of the target's step time (ns) on the tokens the step fed."""

    mx: float  # mean tokens
    my: float  # mean time
    b: float  # slope, ns per token
    se: float  # standard error of the slope


class Timing:
    """Moving averages of one draft step and one target verification, in ns, and the window
    they call for: pearl's window, 0 when speculation should be off.

    gamma = ceil(t_verify / t_draft), clamped to [1, gamma_max]: the draft drafts a window in
    the time the target verifies one (docs/design.md section 4). Under batching the target's step
    can become compute-bound: its time then grows with the tokens all sessions feed, and a longer
    window costs every batch-mate more than it saves. So the rule is also capped by goodput
    (SmartSpec's idea): from the target's steps (each counted once, however many of our sessions
    it carried), a least-squares line t_step = a + b * tokens, and from the verdicts the
    acceptance rate alpha; among windows up to the balanced one, take the g that maximises the
    tokens a window commits, (1 - alpha^(g+1)) / (1 - alpha), per step time
    a + b * rows * (g + 1). When steps are memory-bound (b ~ 0) that is the balanced window
    itself; the cap only bites when extra tokens cost real time.

    **Speculation off** (window 0): g = 0 is ar, one token per step of a + b * rows. When its
    goodput beats the best g >= 1 by OFF_MARGIN, every adaptive pearl session decodes as ar and
    its draft stops (``Pearl``); it comes back when the best g >= 1 beats g = 0 by ON_MARGIN.
    Both tests allow for the slope's uncertainty: off is judged with the slope Z standard errors
    below its estimate, on with it Z above, so a noisy line (a loaded CPU, few distinct step
    sizes) widens the band instead of flipping the state, and a line that cannot be identified
    (step sizes that vary by less than a token, as when every session is off at a steady load)
    keeps it. Between
    two switches at least DWELL_STEPS target steps pass. The feedback: while off, the measured
    steps are ar's (rows tokens each); the line stays identified as long as the load moves (a
    falling load gives smaller steps, and the rows measured fall with it), and the acceptance
    is not measured at all. So after PROBE_STEPS steps off, speculation comes back on for at
    least DWELL_STEPS steps whatever the line says (a probe): fresh acceptance and steps of
    the windows' size, then the rule decides again. Under a steady heavy load that costs about
    DWELL_STEPS / PROBE_STEPS of the steps at the worse choice; without it a draft measured bad
    once, or a line measured under another load, could keep speculation off for good.

    Shared by all requests of a coordinator (they run on the same services), and so is the
    switch: the load it answers is the services'."""

    SAMPLES = 64  # recent distinct target steps (tokens, time) for the line
    OFF_MARGIN = 0.10  # g = 0 must beat the best window by 10% to turn speculation off
    ON_MARGIN = 0.10  # the best window must beat g = 0 by 10% to turn it back on
    Z = 2.0  # standard errors of the slope the switch allows for
    DWELL_STEPS = 32  # target steps at least between two switches
    PROBE_STEPS = 512  # target steps off after which speculation is tried again

    def __init__(self, alpha: float = 0.2, gamma_init: int = DEFAULT_GAMMA):
        self.alpha = alpha
        self.gamma_init = gamma_init
        self.t_draft: float | None = None
        self.t_verify: float | None = None
        self.steps: deque[tuple[int, int]] = deque(maxlen=self.SAMPLES)
        self.rows: float | None = None  # sessions per target step
        self.acceptance: float | None = None
        self.off = False  # speculation off: adaptive windows are 0
        self.since_switch = self.DWELL_STEPS  # target steps since the last switch
        self.switches = 0
        self._fit: Line | None = None
        self._fitted = True  # _fit is up to date with steps

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def draft(self, forward_ns: int, input_tokens: int) -> None:
        if input_tokens <= 2:  # a decode step; prefills and catch-ups are not
            self.t_draft = self._ema(self.t_draft, forward_ns)

    def verify(self, forward_ns: int, batch_tokens: int = 0, batch_rows: int = 0) -> None:
        self.t_verify = self._ema(self.t_verify, forward_ns)
        if batch_tokens and batch_rows:
            self.rows = self._ema(self.rows, batch_rows)
            step = (batch_tokens, forward_ns)
            # every session in a step reports the same step: it is one sample, and one step
            if step not in islice(reversed(self.steps), batch_rows):
                self.steps.append(step)
                self.since_switch += 1
                self._fitted = False

    def judged(self, verified: int, accepted: int) -> None:
        if verified:
            self.acceptance = self._ema(self.acceptance, accepted / verified)

    def fit(self) -> Line | None:
        """The least-squares line of step time on step tokens over the recent steps; None while
        there are fewer than 8 or their sizes have not varied enough to tell the slope (by less
        than a token, as a root mean square)."""
        if not self._fitted:
            self._fitted, self._fit = True, None
            n = len(self.steps)
            if n >= 8:
                mx = sum(x for x, _ in self.steps) / n
                my = sum(y for _, y in self.steps) / n
                sxx = sum((x - mx) ** 2 for x, _ in self.steps)
                if sxx >= n:
                    b = sum((x - mx) * (y - my) for x, y in self.steps) / sxx
                    ssr = sum((y - my - b * (x - mx)) ** 2 for x, y in self.steps)
                    self._fit = Line(mx, my, b, math.sqrt(ssr / (n - 2) / sxx))
        return self._fit

    def cost_line(self) -> tuple[float, float] | None:
        """(a, b) of t_step = a + b * tokens over the recent steps; None while the step sizes
        have not varied enough to tell (by less than a token, as a root mean square)."""
        f = self.fit()
        if f is None:
            return None
        b = max(0.0, f.b)
        return max(0.0, f.my - b * f.mx), b

    def _goodput(self, f: Line, b: float, p: float, g: int) -> float:
        """Tokens a window of ``g`` commits per ns of step, on the line of slope ``b`` through
        the centre of the steps ``f`` fits."""
        b = max(0.0, b)
        a = max(0.0, f.my - b * f.mx)
        return (1 - p ** (g + 1)) / (1 - p) / max(1.0, a + b * self.rows * (g + 1))

    def gamma(self, gamma_max: int, may_stop: bool = True) -> int:
        """The window for a session now; 0 when speculation is off and ``may_stop``."""
        if self.t_draft is None or self.t_verify is None:
            return min(self.gamma_init, gamma_max)
        balanced = max(1, min(gamma_max, math.ceil(self.t_verify / self.t_draft)))
        f, p, g = self.fit(), self.acceptance, balanced
        known = f is not None and p is not None and self.rows is not None
        if known:
            p = min(p, 0.999)
            windows = range(1, balanced + 1)
            g = max(windows, key=lambda g: (self._goodput(f, f.b, p, g), g))

            def ratio(b: float) -> float:  # goodput of g = 0 over the best g >= 1
                return self._goodput(f, b, p, 0) / max(self._goodput(f, b, p, g) for g in windows)
        if self.since_switch >= self.DWELL_STEPS:
            if self.off:
                if (self.since_switch >= self.PROBE_STEPS
                        or known and ratio(f.b + self.Z * f.se) * (1 + self.ON_MARGIN) < 1):
                    self._switch(False)
            elif known and ratio(f.b - self.Z * f.se) > 1 + self.OFF_MARGIN:
                self._switch(True)
        return 0 if self.off and may_stop else g

    def _switch(self, off: bool) -> None:
        self.off, self.since_switch = off, 0
        self.switches += 1


@dataclass
class Asked:
    """A request sent to the target whose verdict has not been consumed yet."""

    draft_ids: list[int]
    window_id: int = 0  # 0: a start or an empty (ar) window
    offset: int = 0  # position of the first draft token within its window (statistics)


# -- the request: state and rules shared by every schedule ---------------------------------------

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

    async def ask(self, draft_ids: list[int], qs: list, window_id: int, phase: str,
                  offset: int = 0, bonus: bool = False, held: bool = False) -> None:
        """Verify ``draft_ids`` at the committed end."""
        self.due.append(Asked(list(draft_ids), window_id, offset))
        await self.target.verify(len(self.committed), list(draft_ids), qs, window_id, phase,
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
        ids = drafts[: v.accepted] + ([] if v.token is None else [v.token])
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
                if ev.msg is None:
                    detail = ev.error.details() if ev.error is not None else "closed by the service"
                    raise ServiceLost("target", detail,
                                      ev.error.code() if ev.error is not None else None)
                v: Verdict = ev.msg
                if v.input_tokens:  # a held verdict ran no forward pass
                    self.rec.target_forward(ev.arrived_ns, v.forward_ns, v.input_tokens,
                                            prefill=v.phase == "start", queue_ns=v.queue_ns,
                                            batch_rows=v.batch_rows, cached=v.cached_tokens)
                    if v.phase not in ("start", "ht"):  # pearl's gamma: draft-verify windows
                        self.timing.verify(v.forward_ns, v.batch_tokens, v.batch_rows)
                        self.timing.judged(v.verified, v.accepted)
                return ev
            if self.draft_lost is not None:
                continue
            if ev.msg is None:
                if ev.error is not None:
                    raise DraftLost(f"draft stream failed: {ev.error.code().name}: "
                                    f"{ev.error.details()}")
                raise DraftLost("draft stream closed by the service")
            p: Proposal = ev.msg
            self.rec.draft_forward(ev.arrived_ns, p.forward_ns, p.input_tokens, p.queue_ns,
                                   p.cached_tokens)
            self.timing.draft(p.forward_ns, p.input_tokens)
            return ev

    async def next_verdict(self) -> Verdict:
        """The target's next verdict (sequential schedules: a draft event now is stale)."""
        while (ev := await self.next_event()).source != "target":
            self.rec.stale += 1
        return ev.msg

    async def next_proposal(self) -> Proposal:
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


# -- the schedules --------------------------------------------------------------------------------

class Schedule:
    def __init__(self, r: Request):
        self.r = r

    async def run(self) -> None:
        raise NotImplementedError


class Alone(Schedule):
    """The target alone, one token per forward pass: the ar mode, and the fallback of every
    schedule from where it stands (the target's answers still due are applied first)."""

    async def run(self) -> None:
        r = self.r
        if not r.target_started:
            await r.start_target(first_token=True)
        while True:
            while r.due:
                if r.decide(await r.next_verdict()):
                    return
            await r.ask([], [], 0, "ar", bonus=True)


class HiddenTransfer(Schedule):
    """The target alone, drafting for itself: several tokens per forward pass, no draft."""

    async def run(self) -> None:
        r = self.r
        await r.start_target(first_token=True, hidden_transfer=True)
        if r.decide(await r.next_verdict()):
            return
        while True:
            await r.ask([], [], r.take_window_id(), "ht")
            v = await r.next_verdict()
            r.rec.window(v.verified)  # future positions the tree offered
            if r.decide(v):
                return


class SD(Schedule):
    """Vanilla speculative decoding: draft a window, verify it, roll back; strictly in turn."""

    async def run(self) -> None:
        r, gamma = self.r, self.r.plan.gamma
        await r.start_target(first_token=True)
        if r.decide(await r.next_verdict()):
            return
        n, wid = r.window_len(gamma, len(r.committed)), r.take_window_id()
        r.rec.window(n)
        await r.draft.start(r.plan.session_id, r.committed, wid, len(r.committed) + n,
                            r.plan.sampling)
        while True:
            position = len(r.committed)
            props = [await r.next_proposal() for _ in range(n)]
            await r.ask([p.token_id for p in props], [p.q for p in props], wid, "sd", bonus=True)
            v = await r.next_verdict()
            if r.decide(v):
                return
            n, wid = r.window_len(gamma, len(r.committed)), r.take_window_id()
            r.rec.window(n)
            await r.draft.rollback(position + v.accepted, [v.token], wid, len(r.committed) + n)


Phase = Literal["pre", "held", "post", "off"]


class Pearl(Schedule):
    """PEARL: draft and target at the same time, one verification in flight at a time.

    The draft drafts without pausing up to its horizon: ``gamma`` tokens past the end of what the
    target was last sent, pushed on with every verification. The target does not wait for a
    window to fill: the moment it may, it gets the draft tokens that exist (at most gamma), so
    under load a session is back in the target's next engine step instead of drifting to a later
    one. The phase says what the target does next at the committed end L:

    - ``pre``: a rejection committed the target's correction (which the target has not fed yet).
      The draft's first token after it goes to the target the moment it exists, with any that
      follow it by then (a forward pass), while the draft drafts on (pre-verify).
    - ``held``: the target holds the distribution of L (after its prefill, or after accepting
      every token it verified: pearl never takes a bonus). The draft's token at L is judged with
      it, with no forward pass, the moment that token exists.
    - ``post``: a held token was accepted. It is fed at once with the draft tokens after it that
      exist (a forward pass) while the draft drafts on (post-verify).

    held -> post -> held -> post ... while every token is accepted; the start is a prefill that
    leaves a held distribution. A rejection commits the accepted prefix and the correction, rolls
    the draft back (its proposals in flight become stale) and goes to pre. Every position is
    decided by the same rule on the draft token at that position, so the output is independent of
    window lengths and timing, for greedy and seeded sampling alike. gamma = ceil(t_verify /
    t_draft) from the services' measured forward times, capped by goodput under batching
    (``Timing``), unless a fixed gamma is asked for.

    ``off``: speculation is off (the adaptive window is 0 under load, ``Timing``). The session
    decodes as ar: empty windows, the target chooses each token itself by ar's rule (the first
    from the distribution it holds, if it holds one, without a forward pass). The draft is
    *parked*: a rollback to the committed end with nothing left to draft, so it stops at once and
    its proposals in flight are stale; no horizon is pushed while off. When the window is >= 1
    again, a rollback appends the tokens committed meanwhile and opens a new run, and the session
    goes on in pre (or held, if the target still holds the distribution of its prefill). Every
    position is then decided either by pearl's rule on the draft's token there or, while off, by
    ar's: greedy output stays the target's own. A sampled request never goes off (``gamma``),
    nor does a fixed gamma.

    Statistics: the draft protocol opens a window per push of the horizon; the statistics count a
    *run*, the draft tokens from one start or rollback to the next (PEARL's adaptive draft
    length), as one window: its id is the run's first window's, offsets count from its start.
    ``gamma_history`` has a 0 for every window decoded with speculation off (``off_windows``;
    each commits one token).
    """

    def __init__(self, r: Request):
        super().__init__(r)
        self.phase: Phase = "pre"  # the prefill, like a pre, leaves a held distribution
        self.drafted: dict[int, tuple[int, object]] = {}  # position -> (token, q)
        self.oldest_live = 1  # proposals of older windows are stale
        self.until = 0  # the draft's horizon: it drafts up to here
        self.run_id, self.run_start = 0, 0  # the current run (statistics)
        self.parked = 0  # off: the draft holds committed[:parked] and drafts nothing
        self.holds = False  # off: the target holds the distribution of the committed end
        self.off_windows = 0  # windows decoded with speculation off (each commits one token)

    async def run(self) -> None:
        r = self.r
        # Both prefill at once; the target holds the first position's distribution.
        await r.start_target(first_token=False)
        L = len(r.committed)
        wid = self.new_run(L)
        if g := self.gamma():
            self.until = self.horizon(L, g)
        else:  # speculation is off already: the draft takes the prompt and drafts nothing
            self.phase, self.parked, self.until = "off", L, L
        await r.draft.start(r.plan.session_id, r.committed, wid, self.until, r.plan.sampling)
        while True:
            ev = await r.next_event()
            if ev.source == "draft":
                self.on_proposal(ev.msg)
            elif await self.on_verdict(ev.msg):
                return
            await self.send_verify()

    # -- events

    def on_proposal(self, p: Proposal) -> None:
        if p.window_id < self.oldest_live:
            self.r.rec.stale += 1
        elif p.position >= len(self.r.committed):
            self.drafted[p.position] = (p.token_id, p.q)

    async def on_verdict(self, v: Verdict) -> bool:
        for q in range(v.position, v.position + v.verified):
            self.drafted.pop(q, None)
        if self.r.decide(v):
            return True
        if self.phase == "off":  # the prefill (it holds a distribution) or an empty window
            self.holds = v.token is None
        elif v.token is not None:  # a rejection: the correction replaced the draft token
            await self.rollback(v.position + v.accepted, v.token)
        elif self.phase == "held":  # accepted with the held distribution: feed it next
            self.phase = "post"
        else:  # all accepted (or the prefill): the target holds the next position's distribution
            self.phase = "held"
        return False

    # -- the target's next job

    async def send_verify(self) -> None:
        if self.r.due:  # one verification in flight at a time
            return
        g = self.gamma()
        if g and self.phase == "off":
            await self.resume(g)
        elif not g and self.phase != "off":
            await self.park()
        L = len(self.r.committed)
        if self.phase == "off":  # as ar: the target chooses the token at L itself
            self.r.rec.window(0)
            self.off_windows += 1
            await self.r.ask([], [], 0, "ar", bonus=True)
            return
        if self.phase != "post" and L not in self.drafted:
            return  # held, pre: the draft's token at L first
        if self.phase == "held":  # judged with the held distribution: one token, no forward
            positions = [L]
        else:  # pre, post: a forward with the draft tokens that exist now, at most gamma
            n = 0
            while n < g and L + n in self.drafted:
                n += 1
            positions = list(range(L, L + n))
        tokens = [self.drafted[q][0] for q in positions]
        qs = [self.drafted[q][1] for q in positions]
        await self.r.ask(tokens, qs, self.run_id, self.phase, offset=L - self.run_start,
                         held=self.phase == "held")
        await self.push(self.horizon(L + len(positions), g))

    # -- the draft's horizon

    def gamma(self) -> int:
        """The window now: fixed, or adaptive (``Timing``). A sampled request never goes to 0:
        positions decided while off are drawn by ar's rule, so its tokens would depend on the
        load, and a seed must give the same text alone and under load."""
        plan = self.r.plan
        sampled = getattr(plan.sampling, "temperature", 0) > 0
        return plan.gamma or self.r.timing.gamma(plan.gamma_max, may_stop=not sampled)

    def horizon(self, end: int, g: int) -> int:
        """``g`` (gamma) tokens past ``end``, the first position the target has not been sent:
        what the draft can draft while the target verifies. Never past the last position to
        decide."""
        self.r.rec.window(g)
        plan = self.r.plan
        return min(end + g, len(plan.prompt_ids) + plan.max_new_tokens, plan.max_positions)

    def new_run(self, start: int) -> int:
        self.run_id, self.run_start = self.r.take_window_id(), start
        return self.run_id

    async def push(self, goal: int) -> None:
        """Move the draft's horizon on to ``goal`` (a new window), if it is not there yet."""
        if goal > self.until:
            self.until = goal
            await self.r.draft.extend(self.r.take_window_id(), goal)

    async def rollback(self, keep: int, token: int) -> None:
        """The draft keeps ``keep`` tokens, appends the target's token, starts a new run; or,
        when the window is 0 now, takes the token and drafts nothing (speculation off)."""
        self.drafted.clear()
        if g := self.gamma():
            wid = self.new_run(keep + 1)
            self.phase = "pre"
            self.until = self.horizon(keep + 1, g)
        else:
            wid = self.r.take_window_id()
            self.phase, self.holds, self.parked, self.until = "off", False, keep + 1, keep + 1
        self.oldest_live = wid
        await self.r.draft.rollback(keep, [token], wid, self.until)

    # -- speculation off and on

    async def park(self) -> None:
        """Speculation off: the draft drops what it drafted past the committed end and drafts
        nothing more (its step in flight is aborted, its proposals in flight are stale). Its
        sequence starts with every committed token (pearl commits the draft's own tokens and
        sends it each correction), so it keeps them all."""
        L = len(self.r.committed)
        wid = self.r.take_window_id()
        self.drafted.clear()
        self.oldest_live = wid
        self.holds = self.phase == "held"
        self.phase, self.parked, self.until = "off", L, L
        await self.r.draft.rollback(L, [], wid, L)

    async def resume(self, g: int) -> None:
        """Speculation on again: the draft takes the tokens committed while it was parked and
        drafts a new run; the target's token at the committed end is next, as after a
        rejection (pre), or the distribution it holds judges the draft's first token (held)."""
        L = len(self.r.committed)
        wid = self.new_run(L)
        self.drafted.clear()
        self.oldest_live = wid
        self.phase = "held" if self.holds else "pre"
        self.until = self.horizon(L, g)
        await self.r.draft.rollback(self.parked, self.r.committed[self.parked:], wid, self.until)


SCHEDULES: dict[str, type[Schedule]] = {
    "ar": Alone, "sd": SD, "pearl": Pearl, "hidden-transfer": HiddenTransfer}


async def decode(schedule: Schedule, draft_down: str | None = None) -> None:
    """Run ``schedule``; when the draft is lost (or was down from the start: ``draft_down``), the
    target finishes the request alone from where the schedule stands."""
    try:
        if draft_down is not None:
            raise DraftLost(draft_down)
        await schedule.run()
    except DraftLost as e:
        schedule.r.lose_draft(e.reason)
        await Alone(schedule.r).run()
