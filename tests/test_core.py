"""Unit tests of the shared core: KV rollback, greedy acceptance, overlap arithmetic."""

import random

import pytest
import torch

from specdec.acceptance import accept_greedy
from specdec.sequence import HFSequence
from specdec.models import tiny_model
from specdec.stats import Recorder, intersection, measure, union


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def test_rollback_matches_recompute(model):
    rng = random.Random(0)
    ids = [rng.randrange(512) for _ in range(20)]
    seq = HFSequence(model, ids[:12])
    seq.forward()
    for _ in range(6):  # grow, roll back, grow differently
        seq.extend([rng.randrange(512) for _ in range(rng.randint(1, 5))])
        seq.forward()
        seq.truncate(rng.randint(5, len(seq)))
    seq.extend([rng.randrange(512) for _ in range(3)])
    f = seq.forward(keep=3)
    expect = full_logits(model, seq.ids)[-3:]
    assert f.start == len(seq) - 2
    torch.testing.assert_close(f.logits, expect, atol=1e-4, rtol=1e-4)
    assert seq.cached == len(seq) == seq.cache.get_seq_length()


def test_truncate_bounds(model):
    seq = HFSequence(model, [1, 2, 3])
    with pytest.raises(ValueError):
        seq.truncate(4)
    seq.forward()
    seq.truncate(1)
    assert seq.cached == 1 and seq.cache.get_seq_length() == 1


def logits_choosing(choices: list[int], vocab: int = 10) -> torch.Tensor:
    out = torch.zeros(len(choices), vocab)
    for i, c in enumerate(choices):
        out[i, c] = 1.0
    return out


@pytest.mark.parametrize("draft,choices,expect", [
    ([4, 5, 6], [4, 5, 6, 7], (3, 7)),  # all accepted: bonus 7
    ([4, 5, 6], [4, 9, 6, 7], (1, 9)),  # rejected at 1: correction 9
    ([4, 5, 6], [1, 5, 6, 7], (0, 1)),  # first token wrong
    ([], [3], (0, 3)),  # no draft: the target's own token
])
def test_accept_greedy(draft, choices, expect):
    assert accept_greedy(logits_choosing(choices), draft) == expect


def test_interval_arithmetic():
    a = [(0, 10), (5, 15), (20, 30)]
    b = [(12, 22), (25, 26)]
    assert union(a) == [(0, 15), (20, 30)]
    assert measure(a) == 25
    assert intersection(a, b) == 3 + 2 + 1
    assert intersection(a, []) == 0


def test_recorder_runs_and_positions():
    rec = Recorder("pearl", 5)
    rec.verified(1, 0, 1, 1)  # pre-verify accepted
    rec.verified(1, 1, 3, 3)  # rest of the window accepted
    rec.verified(2, 0, 4, 2)  # rejected at offset 2
    rec.verified(3, 0, 1, 0)  # rejected at once
    s = rec.finish(new_tokens=10, reason="length")
    assert s["draft_tokens"] == 9 and s["accepted_tokens"] == 6
    assert s["mean_accepted_tokens"] == pytest.approx((6 + 0 + 0) / 3)  # runs 6, 0, final 0
    assert s["per_position_acceptance"] == [2 / 3, 1.0, 0.5, 0.5]
    assert s["draft_length_histogram"] == {1: 1, 4: 2}


def test_abort_leaves_the_sequence_as_it_was():
    """A forward stopped between two decoder layers (a stale draft step) drops the KV entries the
    layers that ran appended: the next forward equals recomputation."""
    import threading

    from specdec.sequence import Aborted, make_abortable

    model = tiny_model(4, num_layers=4)
    make_abortable(model)
    abort = threading.Event()
    trip = model.model.layers[1].register_forward_hook(lambda *a: abort.set())  # after layer 1
    seq = HFSequence(model, [5, 6, 7, 8])
    seq.forward()
    seq.extend([9, 10])
    with pytest.raises(Aborted):
        seq.forward(abort=abort)
    assert seq.cached == 4 and all(layer.get_seq_length() == 4 for layer in seq.cache.layers)
    trip.remove()
    abort.clear()
    f = seq.forward(keep=2, abort=abort)
    torch.testing.assert_close(f.logits, full_logits(model, seq.ids)[-2:], atol=1e-4, rtol=1e-4)
    seq.extend([11])
    abort.set()  # set before the pass: nothing runs
    with pytest.raises(Aborted):
        seq.forward(abort=abort)
    assert seq.cached == 6 and seq.cache.get_seq_length() == 6


def test_recorder_forward_times_by_tokens_fed():
    rec = Recorder("pearl", 10)
    rec.target_forward(1_000, 500, input_tokens=10, prefill=True)
    rec.target_forward(2_000, 200, input_tokens=1)
    rec.target_forward(3_000, 300, input_tokens=4)
    rec.target_forward(4_000, 100, input_tokens=1)
    rec.draft_forward(1_500, 400, input_tokens=10)  # the draft's prefill: not a step
    rec.draft_forward(2_500, 80, input_tokens=1)
    rec.draft_forward(3_500, 90, input_tokens=2)  # a catch-up after a rollback
    s = rec.finish(3, "length")
    assert s["prefill_s"] == 500e-9
    assert s["target_forward_times"] == {1: {"count": 2, "seconds": 300e-9},
                                         4: {"count": 1, "seconds": 300e-9}}
    assert s["draft_forward_times"] == {1: {"count": 1, "seconds": 80e-9},
                                        2: {"count": 1, "seconds": 90e-9}}
    assert s["target_forwards"] == 4 and s["draft_forwards"] == 3
