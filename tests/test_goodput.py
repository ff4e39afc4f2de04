"""pearl's window under batching (coordinator/schedule.py Timing): the balanced window
ceil(t_verify / t_draft) while target steps are memory-bound, a shorter one once the step time
grows with the tokens every session feeds (docs/design.md section 12)."""

from coordinator.schedule import Timing

MS = 1_000_000


def fed(t: Timing, a_ms: float, b_ms: float, rows: int, acceptance: float) -> None:
    """Verdicts of steps whose time is a + b * tokens, at step sizes that vary."""
    t.draft(10 * MS, 1)
    for tokens in (8, 16, 24, 32, 40, 16, 24, 32, 8, 40):
        t.verify(int((a_ms + b_ms * tokens) * MS), tokens, rows)
        t.judged(10, round(10 * acceptance))


def test_memory_bound_steps_keep_the_balanced_window():
    t = Timing()
    fed(t, 200, 0.0, 8, 0.6)  # step time flat in the tokens fed
    assert t.cost_line()[1] == 0.0
    assert t.gamma(8) == 8  # ceil(200 / 10), clamped


def test_compute_bound_steps_shorten_the_window():
    t = Timing()
    fed(t, 10, 5.0, 8, 0.6)  # 5 ms per token fed: every extra window token costs 8 x 5 ms
    a, b = t.cost_line()
    assert abs(a - 10 * MS) < 1e3 and abs(b - 5 * MS) < 1e3
    balanced = min(8, -(-int(t.t_verify) // int(t.t_draft)))
    assert balanced == 8
    # (1 - 0.6^(g+1)) / 0.4 tokens per window over 10 + 40 (g + 1) ms: best at g = 1
    assert t.gamma(8) == 1
    t2 = Timing()
    fed(t2, 10, 5.0, 8, 0.98)  # a draft that is almost always right earns longer windows
    assert 1 < t2.gamma(8) <= 8


def test_without_step_sizes_the_rule_is_the_classic_one():
    t = Timing()
    t.draft(10 * MS, 1)
    for _ in range(20):
        t.verify(35 * MS)  # services that report no batch (older ones)
        t.judged(4, 1)
    assert t.gamma(8) == 4
