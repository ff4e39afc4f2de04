"""pearl's window under batching (coordinator/schedule.py Timing): the balanced window
ceil(t_verify / t_draft) while target steps are memory-bound, a shorter one once the step time
grows with the tokens every session feeds, and none at all (speculation off, window 0) when
even one draft token per window costs the batch more than it saves; back on when the load falls
(docs/design.md sections 4 and 12)."""

import random

from coordinator.timing import Timing

MS = 1_000_000


def fed(t: Timing, a_ms: float, b_ms: float, rows: int, acceptance: float) -> None:
    """Verdicts of 10 steps whose time is a + b * tokens, at step sizes that vary; each step
    reported by every one of its ``rows`` sessions (the line counts it once)."""
    t.draft(10 * MS, 1)
    for k, tokens in enumerate((8, 16, 24, 32, 40, 16, 24, 32, 8, 40)):
        for _ in range(rows):
            t.verify(int((a_ms + b_ms * tokens) * MS) + k, tokens, rows)  # + k: its own step
            t.judged(10, round(10 * acceptance))


def test_memory_bound_steps_keep_the_balanced_window():
    t = Timing()
    fed(t, 200, 0.0, 8, 0.6)  # step time flat in the tokens fed
    assert len(t.steps) == 10  # 80 verdicts, 10 steps
    assert t.cost_line()[1] < 1  # ns per token: flat
    assert t.gamma(8) == 8  # ceil(200 / 10), clamped


def test_compute_bound_steps_shorten_the_window():
    t = Timing()
    fed(t, 10, 5.0, 8, 0.7)  # 5 ms per token fed: every extra window token costs 8 x 5 ms
    a, b = t.cost_line()
    assert abs(a - 10 * MS) < 1e3 and abs(b - 5 * MS) < 1e3
    balanced = min(8, -(-int(t.t_verify) // int(t.t_draft)))
    assert balanced == 8
    # (1 - 0.7^(g+1)) / 0.3 tokens per window over 10 + 40 (g + 1) ms: best at g = 1, and g = 1
    # (1.7 / 90 ms) is within 10% of ar (1 / 50 ms): speculation stays on
    assert t.gamma(8) == 1 and not t.off
    t2 = Timing()
    fed(t2, 10, 5.0, 8, 0.98)  # a draft that is almost always right earns longer windows
    assert 1 < t2.gamma(8) <= 8


def test_steeper_still_turns_speculation_off():
    t = Timing()
    fed(t, 10, 5.0, 8, 0.6)  # g = 1: 1.6 / 90 ms; ar: 1 / 50 ms, 12.5% more
    assert t.gamma(8) == 0 and t.off
    assert t.gamma(8) == 0  # and it stays


def test_without_step_sizes_the_rule_is_the_classic_one():
    t = Timing()
    t.draft(10 * MS, 1)
    for _ in range(20):
        t.verify(35 * MS)  # services that report no batch (older ones)
        t.judged(4, 1)
    assert t.gamma(8) == 4


# -- speculation off and back on: the rule in its own feedback loop -------------------------------


class Load:
    """``rows`` sessions sharing target steps of a + b * tokens ms. Before each step every
    session asks the window; with 0 it feeds one token (ar), with g >= 1 a window of 1..g+1
    tokens (pearl's vary: held judgments, pre and post verifications), whose drafts are judged
    at ``acceptance``. Each session's verdict reports the step. Returns the windows asked."""

    def __init__(self, t: Timing, a_ms: float = 10, b_ms: float = 5, acceptance: float = 0.6,
                 noise_ms: float = 0.0):
        self.t, self.a, self.b, self.acceptance = t, a_ms, b_ms, acceptance
        self.noise, self.rng, self.n = noise_ms, random.Random(5), 0
        t.draft(10 * MS, 1)

    def steps(self, rows: int, n: int) -> list[int]:
        windows = []
        for _ in range(n):
            self.n += 1
            gs = [self.t.gamma(8) for _ in range(rows)]
            fed = [1 if g == 0 else 1 + (i + self.n) % (g + 1) for i, g in enumerate(gs)]
            tokens = sum(fed)
            ms = self.a + self.b * tokens + self.rng.gauss(0, self.noise)
            ns = int(max(ms, 0.1) * MS) + self.n  # + n: no two steps alike
            for g, f in zip(gs, fed):
                self.t.verify(ns, tokens, rows)
                if g and f > 1:
                    self.t.judged(10, round(10 * self.acceptance))
            windows += gs
        return windows


def test_compute_bound_load_turns_speculation_off_and_its_end_turns_it_back_on():
    t = Timing()
    load = Load(t)
    # 16 sessions, 5 ms per token fed: one draft token per window (the best) costs 80 ms a
    # step for 0.6 more tokens a window; ar commits a token per 10 + 80 ms, g = 1 1.6 per 170
    windows = load.steps(16, 200)
    assert windows[0] >= 1, "speculation starts on"
    first_off = windows.index(0) // 16
    assert first_off < 40, first_off  # as soon as the line is known
    assert set(windows[(first_off + 1) * 16:]) == {0}, "and stays off while the load lasts"
    assert t.off and t.switches == 1
    # once every session is off, steps are all 16 tokens: the line is no longer identified
    # (nothing to decide by), and that keeps the state rather than flipping it
    assert t.fit() is None
    # the load ends: one session, steps of one token; they differ from the loaded ones, the
    # line is measured again, the rows measured fall, and g >= 1 wins (1.6 / 20 ms against
    # 1 / 15 ms) by more than the margin
    after = load.steps(1, 100)
    back = next(i for i, g in enumerate(after) if g)
    assert back < 20, after
    assert all(g >= 1 for g in after[back:]), after
    assert t.switches == 2 and not t.off


def test_no_flapping_across_the_boundary():
    """With a = 10 ms, b = 5 ms and acceptance 0.6, ar beats g = 1 by 10% from about 7 rows on,
    and g = 1 beats ar by 10% only below about 2: in between, the state is what it was."""
    t = Timing()
    load = Load(t)
    windows = load.steps(4, 60)  # 4 rows: ar ahead by ~4%, inside the band: stays on
    assert 0 not in windows and t.switches == 0
    for _ in range(4):  # the load wanders 3 <-> 8 rows: it crosses the off boundary only
        windows = load.steps(8, 30) + load.steps(3, 30)
    assert t.switches == 1 and t.off and set(windows) == {0}
    windows = load.steps(2, 80)  # 2 rows: g = 1 ahead of ar by ~6%, still inside: stays off
    assert set(windows) == {0} and t.switches == 1
    # 1 row: ahead by 20%. Steps of 1 token after steps of 2 do not identify the slope (sizes
    # that vary by less than a token); after steps of 8 they do: back on
    load.steps(8, 10)
    assert t.switches == 1
    load.steps(1, 60)
    assert t.switches == 2 and not t.off


def test_switches_are_at_least_the_dwell_apart():
    t = Timing()
    load = Load(t)
    at = []  # the step at which each switch came
    for _ in range(8):  # a load that jumps across the whole band every 20 steps
        for rows in (16, 1):
            for _ in range(20):
                before = t.switches
                load.steps(rows, 1)
                at += [load.n] * (t.switches - before)
    gaps = [b - a for a, b in zip(at, at[1:])]
    assert len(at) >= 4, at
    # not at every jump (every 20 steps), and never closer than the dwell
    assert min(gaps) > 20 and min(gaps) >= Timing.DWELL_STEPS, at


def test_a_probe_measures_again_under_a_lasting_load():
    """Off for PROBE_STEPS steps, speculation is tried again for DWELL_STEPS (fresh acceptance
    and steps of the windows' size), then the rule decides: here, off again."""
    t = Timing()
    load = Load(t)
    while not t.off:
        load.steps(16, 1)
    windows = load.steps(16, Timing.PROBE_STEPS - 1)
    assert set(windows) == {0} and t.switches == 1
    windows = load.steps(16, Timing.DWELL_STEPS + 20)
    assert 0 not in windows[:16 * Timing.DWELL_STEPS]
    assert t.switches == 3 and t.off and windows[-16:] == [0] * 16


def test_a_probe_finds_a_draft_that_became_good():
    """Off because the draft was poor; the acceptance is not measured while off. The probe
    measures it again and speculation stays on."""
    t = Timing()
    load = Load(t, a_ms=10, b_ms=1, acceptance=0.1)  # 8 rows: ar 1 / 18 ms, g = 1 1.1 / 26 ms
    load.steps(8, 100)
    assert t.off
    load.acceptance = 0.9  # the text got easy for the draft: g >= 1 wins by far now
    load.steps(8, Timing.PROBE_STEPS + Timing.DWELL_STEPS + 40)
    assert not t.off and t.switches == 2


def test_an_uncertain_slope_does_not_turn_speculation_off():
    """Steps of 16 and 24 tokens on the line 10 + 5 * tokens ms, which turns speculation off
    (the tests above), but scattered by +-60 ms: the slope's estimate is still 5 ms, its
    standard error ~2.7 ms. Off is judged Z standard errors below the estimate: the state
    stays. Without that allowance the same steps would turn it off."""

    class Reckless(Timing):
        Z = 0.0

    for t, off in ((Timing(), False), (Reckless(), True)):
        t.draft(10 * MS, 1)
        for k in range(32):
            tokens = (16, 24)[k % 2]
            noise = 60 if k % 4 < 2 else -60
            for _ in range(16):
                t.verify(int((10 + 5 * tokens + noise) * MS) + k, tokens, 16)
                t.judged(10, 6)
        f = t.fit()
        assert abs(f.b - 5 * MS) < 1e3 and 2 * MS < f.se < 3 * MS
        assert (t.gamma(8) == 0) == off


def test_a_fixed_window_is_never_0():
    from coordinator.request import Plan
    from coordinator.schedule import Pearl

    class R:  # what Pearl.gamma reads
        plan = Plan("s", [1], 8, 64, gamma=3)
        timing = Timing()
    fed(R.timing, 10, 5.0, 8, 0.6)
    assert R.timing.gamma(8) == 0
    p = Pearl.__new__(Pearl)
    p.r = R
    assert p.gamma() == 3
