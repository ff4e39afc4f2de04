"""The coordinator's model of the two services' speed, and the window it calls for: pearl's
adaptive gamma, 0 when speculation should be off under load (docs/design.md section 4).

Fed by every request's answers (forward times, step sizes, acceptance) and shared by all of
them, like the load it answers.
"""

import math
from collections import deque
from itertools import islice
from typing import NamedTuple

from specdec.defaults import DEFAULT_GAMMA


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
    keeps it. Between two switches at least DWELL_STEPS target steps pass. The feedback: while
    off, the measured steps are ar's (rows tokens each); the line stays identified as long as
    the load moves (a falling load gives smaller steps, and the rows measured fall with it), and
    the acceptance is not measured at all. So after PROBE_STEPS steps off, speculation comes
    back on for at least DWELL_STEPS steps whatever the line says (a probe): fresh acceptance
    and steps of the windows' size, then the rule decides again. Under a steady heavy load that
    costs about DWELL_STEPS / PROBE_STEPS of the steps at the worse choice; without it a draft
    measured bad once, or a line measured under another load, could keep speculation off for
    good.

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

