"""The soak (benchmarks/soak.py) in its short form: real service processes, 8 clients of mixed modes
and sampling, cancellations and deadlines, the draft killed and restarted, the target once.

`pytest -m soak` runs it; PEARL_SOAK_S sets the load's duration (default 75 s here; the
10-minute form: `make soak SOAK_S=600`)."""

import os

import pytest

from benchmarks.soak import soak

pytestmark = [pytest.mark.slow, pytest.mark.soak]


def test_soak(tmp_path):
    seconds = float(os.environ.get("PEARL_SOAK_S", 75))
    rep = soak(seconds, clients=8, draft_period_s=min(30.0, seconds / 3), workdir=tmp_path)
    print(rep.summary())
    assert rep.faults["draft killed and restarted"] >= 1
    assert rep.faults["target killed and restarted"] == 1
    assert rep.faults["requests cancelled"] and rep.faults["short deadlines"]
    assert not rep.problems, rep.summary()
