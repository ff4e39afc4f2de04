"""The decoding schedules: ar, sd, pearl and hidden-transfer, and the target going on alone when
the draft is lost (docs/design.md sections 4 and 11).

Every schedule talks to the target through one Verify stream and (sd, pearl) to the draft through
one Draft stream, and commits only what the target decides, by one rule (``Request.decide``,
coordinator/request.py); the schedules only choose what to ask next:

- ``Autoregressive`` (ar): windows of zero draft tokens, one token per target forward.
- ``SD``: the draft drafts gamma tokens, the target verifies them (with a bonus), the draft rolls
  back; strictly in turn.
- ``Pearl``: draft and target at the same time (the state machine is described on the class);
  under a compute-bound load its adaptive window may be 0: it then decodes as ``Autoregressive``
  does, its draft parked, until the window comes back (coordinator/timing.py).
- ``HiddenTransfer``: the target alone, drafting for itself (target_service/hidden_transfer/):
  every window is empty and the target answers with the drafts it accepted plus its own token.

The draft is an accelerator, not a dependency. When its stream fails, closes, refuses the session,
or sends nothing for ``Plan.draft_timeout_s`` while the schedule waits on it alone,
``Request.next_event`` raises ``DraftLost``; ``decode`` then hands the request to
``Autoregressive``, which first applies the target's answers still due (requests sent but not
consumed: ``Request.due``) by the same rule, then goes on with empty windows. When the target
holds a distribution (pearl), the first empty window is answered from it without a forward pass.
Lossless because every schedule commits only what the target decides: greedy output is identical
to an undisturbed run; sampled output keeps the target's exact distribution (the seeded draws at
positions decided after the loss differ from a pearl run's, as a different rule decides them).
"""

from enum import StrEnum

from coordinator.request import DraftLost, Request, WindowKind
from protos.v1 import pearl_pb2 as pb
from specdec.answers import Proposal, Verdict


class Mode(StrEnum):
    """A request's decoding schedule (``GenerateRequest.mode``)."""

    AR = "ar"
    SD = "sd"
    PEARL = "pearl"
    HIDDEN_TRANSFER = "hidden-transfer"


# -- the schedules --------------------------------------------------------------------------------

class Schedule:
    """What one request asks of the services next, until it ends."""

    def __init__(self, r: Request):
        self.r = r

    async def run(self) -> None:
        raise NotImplementedError


class Autoregressive(Schedule):
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
            await r.ask([], [], 0, WindowKind.AR, bonus=True)


class HiddenTransfer(Schedule):
    """The target alone, drafting for itself: several tokens per forward pass, no draft."""

    async def run(self) -> None:
        r = self.r
        await r.start_target(first_token=True, hidden_transfer=True)
        if r.decide(await r.next_verdict()):
            return
        while True:
            await r.ask([], [], r.take_window_id(), WindowKind.TREE)
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
            await r.ask([p.token_id for p in props], [p.q for p in props], wid, WindowKind.SD,
                        bonus=True)
            v = await r.next_verdict()
            if r.decide(v):
                return
            n, wid = r.window_len(gamma, len(r.committed)), r.take_window_id()
            r.rec.window(n)
            await r.draft.rollback(position + v.accepted, [v.token_id], wid,
                                   len(r.committed) + n)


class Phase(StrEnum):
    """Where pearl stands at the committed end: what the target does next (``Pearl``)."""

    PRE = "pre"
    HELD = "held"
    POST = "post"
    OFF = "off"


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
        self.phase = Phase.PRE  # the prefill, like a pre, leaves a held distribution
        # position -> (token, q): the draft's live tokens past the committed end
        self.drafted: dict[int, tuple[int, pb.TokenDistribution | None]] = {}
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
            self.set_horizon(L, g)
        else:  # speculation is off already: the draft takes the prompt and drafts nothing
            self.phase, self.parked, self.until = Phase.OFF, L, L
        await r.draft.start(r.plan.session_id, r.committed, wid, self.until, r.plan.sampling)
        while True:
            ev = await r.next_event()
            if ev.source == "draft":
                self.on_proposal(ev.msg)
            elif await self.on_verdict(ev.msg):
                return
            await self.send_verify()

    # -- events

    def on_proposal(self, p: Proposal[pb.TokenDistribution]) -> None:
        if p.window_id < self.oldest_live:
            self.r.rec.stale += 1
        elif p.position >= len(self.r.committed):
            self.drafted[p.position] = (p.token_id, p.q)

    async def on_verdict(self, v: Verdict) -> bool:
        for q in range(v.position, v.position + v.verified):
            self.drafted.pop(q, None)
        if self.r.decide(v):
            return True
        if self.phase == Phase.OFF:  # the prefill (it holds a distribution) or an empty window
            self.holds = v.token_id is None
        elif v.token_id is not None:  # a rejection: the correction replaced the draft token
            await self.rollback(v.position + v.accepted, v.token_id)
        elif self.phase == Phase.HELD:  # accepted with the held distribution: feed it next
            self.phase = Phase.POST
        else:  # all accepted (or the prefill): the target holds the next position's distribution
            self.phase = Phase.HELD
        return False

    # -- the target's next job

    async def send_verify(self) -> None:
        if self.r.due:  # one verification in flight at a time
            return
        g = self.gamma()
        if g and self.phase == Phase.OFF:
            await self.resume(g)
        elif not g and self.phase != Phase.OFF:
            await self.park()
        L = len(self.r.committed)
        if self.phase == Phase.OFF:  # as ar: the target chooses the token at L itself
            self.r.rec.window(0)
            self.off_windows += 1
            await self.r.ask([], [], 0, WindowKind.AR, bonus=True)
            return
        if self.phase != Phase.POST and L not in self.drafted:
            return  # held, pre: the draft's token at L first
        if self.phase == Phase.HELD:  # judged with the held distribution: one token, no forward
            positions = [L]
        else:  # pre, post: a forward with the draft tokens that exist now, at most gamma
            n = 0
            while n < g and L + n in self.drafted:
                n += 1
            positions = list(range(L, L + n))
        tokens = [self.drafted[q][0] for q in positions]
        qs = [self.drafted[q][1] for q in positions]
        await self.r.ask(tokens, qs, self.run_id, WindowKind(self.phase),
                         offset=L - self.run_start, held=self.phase == Phase.HELD)
        self.r.rec.window(g)
        await self.push(self.horizon(L + len(positions), g))

    # -- the draft's horizon

    def gamma(self) -> int:
        """The window now: fixed, or adaptive (``Timing``). A sampled request never goes to 0:
        positions decided while off are drawn by ar's rule, so its tokens would depend on the
        load, and a seed must give the same text alone and under load."""
        plan = self.r.plan
        return plan.gamma or self.r.timing.gamma(plan.gamma_max, may_stop=not plan.sampled)

    def horizon(self, end: int, g: int) -> int:
        """``g`` (gamma) tokens past ``end``, the first position the target has not been sent:
        what the draft can draft while the target verifies. Never past the last position to
        decide. The caller records ``g`` as the window's gamma (``Recorder.window``)."""
        plan = self.r.plan
        return min(end + g, len(plan.prompt_ids) + plan.max_new_tokens, plan.max_positions)

    def set_horizon(self, end: int, g: int) -> None:
        """A new run's horizon, ``g`` past ``end``, recorded as a window of gamma ``g``."""
        self.r.rec.window(g)
        self.until = self.horizon(end, g)

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
            self.phase = Phase.PRE
            self.set_horizon(keep + 1, g)
        else:
            wid = self.r.take_window_id()
            self.phase, self.holds, self.parked, self.until = Phase.OFF, False, keep + 1, keep + 1
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
        self.holds = self.phase == Phase.HELD
        self.phase, self.parked, self.until = Phase.OFF, L, L
        await self.r.draft.rollback(L, [], wid, L)

    async def resume(self, g: int) -> None:
        """Speculation on again: the draft takes the tokens committed while it was parked and
        drafts a new run; the target's token at the committed end is next, as after a
        rejection (pre), or the distribution it holds judges the draft's first token (held)."""
        L = len(self.r.committed)
        wid = self.new_run(L)
        self.drafted.clear()
        self.oldest_live = wid
        self.phase = Phase.HELD if self.holds else Phase.PRE
        self.set_horizon(L, g)
        await self.r.draft.rollback(self.parked, self.r.committed[self.parked:], wid, self.until)


SCHEDULES: dict[Mode, type[Schedule]] = {
    Mode.AR: Autoregressive, Mode.SD: SD, Mode.PEARL: Pearl,
    Mode.HIDDEN_TRANSFER: HiddenTransfer}


async def decode(schedule: Schedule, no_draft: str | None = None) -> None:
    """Run ``schedule``; when the draft is lost (or was missing from the start: ``no_draft``
    says why), the target finishes the request alone from where the schedule stands."""
    try:
        if no_draft is not None:
            raise DraftLost(no_draft)
        await schedule.run()
    except DraftLost as e:
        schedule.r.lose_draft(e.reason)
        await Autoregressive(schedule.r).run()
