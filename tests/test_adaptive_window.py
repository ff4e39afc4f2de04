"""pearl's adaptive window (docs/design.md section 4): gamma = ceil(t_verify / t_draft) from the
forward times the services measure, clamped to [1, gamma_max]. First the rule on given times,
then end to end: services whose forward passes take known times (a sleep in the LM head) make
pearl open the windows that the rule gives for the times the request reports."""

import copy
import math
import time
from collections import Counter

import pytest

from cluster import Cluster
from coordinator.timing import Timing
from pearl.client import Client
from specdec.models import LoadedModel, noisy_copy

MS = 1_000_000


def test_rule_on_given_times():
    t = Timing(gamma_init=4)
    assert t.gamma(8) == 4 and t.gamma(3) == 3  # nothing measured yet: the initial window
    t.draft(10 * MS, 1)
    assert t.gamma(8) == 4  # a verification time is needed too
    t.verify(25 * MS)
    assert t.gamma(8) == 3  # ceil(25 / 10)
    t = Timing()
    t.draft(10 * MS, 1)
    t.verify(30 * MS)
    assert t.gamma(8) == 3  # exactly 3: not rounded up further
    t = Timing()
    t.draft(10 * MS, 1)
    t.verify(101 * MS)
    assert t.gamma(8) == 8 and t.gamma(20) == 11  # clamped to gamma_max
    t = Timing()
    t.draft(50 * MS, 2)
    t.verify(1)
    assert t.gamma(8) == 1  # never below 1
    t = Timing()
    t.draft(10 * MS, 1)
    t.draft(900 * MS, 5)  # a prefill or catch-up of 5 tokens is not a draft step
    t.verify(40 * MS)
    assert t.gamma(8) == 4


def test_rule_follows_the_moving_average():
    t = Timing(alpha=0.5)
    t.draft(10 * MS, 1)
    t.verify(20 * MS)
    assert t.gamma(8) == 2
    t.verify(60 * MS)  # average 40 ms
    assert t.gamma(8) == 4
    t.draft(30 * MS, 1)  # average 20 ms
    assert t.gamma(8) == 2


def slowed(loaded: LoadedModel, sleep_s: float) -> LoadedModel:
    """A copy of ``loaded`` whose every forward pass takes at least ``sleep_s`` longer."""
    model = copy.deepcopy(loaded.model)
    head = model.lm_head  # one pass per forward, whichever code path runs the layers
    forward = head.forward

    def slow_forward(*args, **kw):
        time.sleep(sleep_s)
        return forward(*args, **kw)

    head.forward = slow_forward
    return LoadedModel(loaded.name, model, loaded.tokenizer, loaded.device, loaded.dtype)


def expected_gamma(stats: dict, gamma_max: int) -> int:
    """The rule on the mean times the request reports: draft decode steps (1-2 tokens fed) and
    target verifications (every forward after the prefill)."""
    d = [v for k, v in stats["draft_forward_times"].items() if k <= 2]
    t = stats["target_forward_times"].values()
    t_draft = sum(v["seconds"] for v in d) / sum(v["count"] for v in d)
    t_verify = sum(v["seconds"] for v in t) / sum(v["count"] for v in t)
    return max(1, min(gamma_max, math.ceil(t_verify / t_draft)))


@pytest.mark.parametrize("draft_s,target_s,gamma_max,want", [
    (0.020, 0.050, 8, 3),  # ceil(~52 / ~22): 3
    (0.005, 0.080, 4, 4),  # ceil(~82 / ~7) = 12, clamped to gamma_max 4
], ids=["ratio-2.4", "clamped"])
def test_windows_follow_the_measured_times(tiny_target, draft_s, target_s, gamma_max, want):
    draft = slowed(noisy_copy(tiny_target, 7, 0.08), draft_s)
    target = slowed(tiny_target, target_s)
    c = Cluster(draft, target, gamma=4, gamma_max=8)
    try:
        with Client(c.address, timeout_s=120) as cl:
            kw = dict(mode="pearl", max_new_tokens=24, ignore_eos=True, gamma_max=gamma_max)
            cl.complete(list(range(10, 20)), **kw)  # the coordinator measures both services
            r = cl.complete(list(range(20, 30)), **kw)
    finally:
        c.close()
    s = r.stats
    assert not s["fell_back"] and s["draft_tokens"] > 0
    assert expected_gamma(s, gamma_max) == want, s
    # windows open at the rule's gamma (fewer where fewer tokens are left to draft; the moving
    # averages may drift across a boundary on a loaded machine, never across a clamp)
    windows = s["gamma_history"]
    assert Counter(windows).most_common(1)[0][0] == want, windows
    assert max(windows) <= gamma_max, windows
