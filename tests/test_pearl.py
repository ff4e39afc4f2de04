"""The PEARL schedule: stale proposals, the mode switch, real overlap, early window ends."""

import asyncio
import copy
import time

import pytest
import torch

from cluster import Cluster
from conftest import greedy_reference, noisy_copy
from coordinator.links import Event
from coordinator.output import Output
from coordinator.request import Plan, Request
from coordinator.schedule import Pearl
from coordinator.timing import Timing
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from specdec.answers import Proposal, StepTiming, Verdict
from specdec.models import LoadedModel, tiny_loaded, tiny_tokenizer
from specdec.stats import Recorder, intersection

# -- the state machine alone, with fake links ----------------------------------------------------


class FakeLink:
    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        async def record(*args, **kw):
            self.calls.append((name, *args, *kw.values()))
        return record


SAMPLING = pb.SamplingParams(seed=1)  # greedy; passed to the services as it is


def proposal(window_id, position, token):
    return Proposal(window_id, position, token, StepTiming(forward_ns=1000, input_tokens=1))


def verdict(position, verified, accepted, token=None, phase="post"):
    """``phase``: what the verdict answers ("held": judged without a forward pass)."""
    return Verdict(position, verified, accepted, token,
                   committed=position + accepted + (token is not None),
                   step=StepTiming(forward_ns=3000,
                                   input_tokens=0 if phase == "held" else verified + 1))


def test_stale_proposals_are_dropped_and_modes_switch():
    async def scenario():
        L, events = 4, asyncio.Queue()
        draft, target = FakeLink(), FakeLink()
        plan = Plan("s", [1, 2, 3, 4], max_new_tokens=50, max_positions=1000, gamma=3,
                    sampling=SAMPLING)
        out = Output(tiny_tokenizer(), 50, [], [])
        rec = Recorder("pearl", L)
        p = Pearl(Request(plan, target, draft, events, out, rec, Timing()))
        task = asyncio.create_task(p.run())
        put = lambda src, msg: events.put_nowait(Event(src, msg, time.monotonic_ns()))
        settle = lambda: asyncio.sleep(0.01)

        await settle()
        # no first token, no logprobs
        assert target.calls[0] == ("start", "s", [1, 2, 3, 4], SAMPLING, False, False, None)
        assert draft.calls[0] == ("start", "s", [1, 2, 3, 4], 1, L + 3, SAMPLING)
        put("target", verdict(L, 0, 0, phase="start"))  # the target holds position L
        await settle()
        assert p.phase == "held" and len(target.calls) == 1  # it waits for the draft's token at L
        put("draft", proposal(1, L, 50))
        await settle()
        assert target.calls[-1] == ("verify", L, [50], [None], 1, "held", False, True)
        assert draft.calls[-1] == ("extend", 2, L + 4)  # gamma past the position judged
        put("draft", proposal(1, L + 1, 51))
        put("target", verdict(L, 1, 1, phase="held"))  # accepted without a forward pass
        await settle()
        assert p.phase == "post" and p.r.committed[-1] == 50 and rec.target_forwards == 1
        # at once, with what the draft has: 50 is fed with 51, 52 is not drafted yet
        assert target.calls[-1] == ("verify", L + 1, [51], [None], 1, "post", False, False)
        assert draft.calls[-1] == ("extend", 3, L + 5)
        put("draft", proposal(2, L + 2, 52))
        put("draft", proposal(3, L + 3, 53))
        put("target", verdict(L + 1, 1, 1))  # 51 accepted: the target holds L + 2
        await settle()
        assert p.phase == "held" and rec.target_forwards == 2
        assert target.calls[-1] == ("verify", L + 2, [52], [None], 1, "held", False, True)
        assert draft.calls[-1] == ("extend", 4, L + 6)
        put("target", verdict(L + 2, 1, 0, 99, phase="held"))  # 52 rejected, correction 99
        await settle()
        assert p.phase == "pre" and p.r.committed[L:] == [50, 51, 99]
        assert draft.calls[-1] == ("rollback", L + 2, [99], 5, L + 6)
        assert len(target.calls) == 4  # pre: it waits for the draft's first token
        put("draft", proposal(3, L + 4, 54))  # windows before 5 are stale now
        await settle()
        assert rec.stale == 1 and L + 4 not in p.drafted and len(target.calls) == 4
        put("draft", proposal(5, L + 3, 60))  # pre-verify: the correction 99 is fed with 60
        await settle()
        assert target.calls[-1] == ("verify", L + 3, [60], [None], 5, "pre", False, False)
        assert draft.calls[-1] == ("extend", 6, L + 7)
        put("draft", proposal(5, L + 4, 61))
        put("target", verdict(L + 3, 1, 1, phase="pre"))  # 60 accepted: the target holds L + 4
        await settle()
        assert p.phase == "held" and p.r.committed[L:] == [50, 51, 99, 60]
        assert target.calls[-1] == ("verify", L + 4, [61], [None], 5, "held", False, True)
        put("target", verdict(L + 4, 1, 1, phase="held"))
        await settle()  # post with nothing drafted past 61: 61 is fed alone, no waiting
        assert target.calls[-1] == ("verify", L + 5, [], [], 5, "post", False, False)
        # statistics: runs of the draft (start..rollback, rollback..) as windows, offsets within
        assert dict(rec.used_per_window) == {1: 3, 5: 2}
        task.cancel()

    asyncio.run(scenario())


# -- real services: overlap measured from the models' own forward timestamps ---------------------


def timed(loaded: LoadedModel) -> tuple[LoadedModel, list]:
    """A copy of ``loaded`` whose forward passes record their [start, end) monotonic times."""
    model = copy.deepcopy(loaded.model)
    spans: list[tuple[int, int]] = []
    # a pass starts at the embeddings and ends at the LM head, in transformers' forward and in
    # the engine's batched one alike
    model.model.embed_tokens.register_forward_pre_hook(
        lambda m, a: spans.append((time.monotonic_ns(), None)))

    def done(m, a, out):
        spans[-1] = (spans[-1][0], time.monotonic_ns())
    model.lm_head.register_forward_hook(done)
    return LoadedModel(loaded.name, model, loaded.tokenizer, loaded.device, loaded.dtype), spans


@pytest.fixture(scope="module")
def slow_pair():
    """Tiny models big enough that a forward pass is mostly compute, not Python."""
    target = tiny_loaded(5, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
                         intermediate_size=1024)
    draft = noisy_copy(tiny_loaded(5, hidden_size=384, num_layers=6, num_heads=6,
                                   num_kv_heads=2, intermediate_size=1024), 3, 0.08)
    # The draft drops to 2 layers: cheaper than the target, as a draft is.
    draft.model.model.layers = draft.model.model.layers[:2]
    draft.model.config.num_hidden_layers = 2
    return timed(draft), timed(target)


def test_pearl_overlaps_and_sd_does_not(slow_pair):
    (draft, dspans), (target, tspans) = slow_pair
    c = Cluster(draft, target)
    prompt = list(range(30, 60))
    ref = greedy_reference(target, prompt, 48)
    try:
        with Client(c.address) as cl:
            cl.complete(prompt, mode="pearl", max_new_tokens=8)  # calibrate gamma
            results = {}
            for mode in ("sd", "pearl"):
                dspans.clear()
                tspans.clear()
                r = cl.complete(prompt, mode=mode, max_new_tokens=48, gamma=3 if mode == "sd" else 0)
                assert r.token_ids == ref
                done = [sp for sp in dspans if sp[1] is not None]  # a stale step stopped early
                results[mode] = (r.stats, intersection(done, list(tspans)) / 1e9)
    finally:
        c.close()
    s, measured = results["pearl"]
    assert measured > 0.1 * s["wall_s"], "draft and target forwards must overlap in time"
    assert s["both_busy_s"] > 0
    assert s["both_busy_s"] == pytest.approx(measured, abs=0.15 * s["wall_s"])
    assert s["overlap_ratio"] == pytest.approx(s["both_busy_s"] / s["wall_s"])
    s, measured = results["sd"]
    assert measured < 0.02 * s["wall_s"]
    assert s["overlap_ratio"] < 0.05


def test_wrong_first_token_ends_window_early(tiny_target):
    """A draft that is always wrong: pearl abandons each window after its first token."""
    draft = copy.copy(tiny_target)
    draft.model = copy.deepcopy(tiny_target.model)
    with torch.no_grad():
        draft.model.lm_head.weight.zero_()  # all logits 0: the draft always proposes token 0
    prompt = [9, 8, 7, 6, 5]
    ref = greedy_reference(tiny_target, prompt, 40)
    assert 0 not in ref, "the test needs a target that never picks token 0"
    c = Cluster(LoadedModel(**vars(draft)), tiny_target)
    try:
        with Client(c.address) as cl:
            sd = cl.complete(prompt, mode="sd", max_new_tokens=40, gamma=8)
            pearl = cl.complete(prompt, mode="pearl", max_new_tokens=40, gamma=8)
    finally:
        c.close()
    assert sd.token_ids == pearl.token_ids == ref
    assert sd.stats["accepted_tokens"] == pearl.stats["accepted_tokens"] == 0
    assert not sd.stats["fell_back"] and not pearl.stats["fell_back"]
    # pearl judges one draft token per position, each in a window cut after that token
    assert pearl.stats["draft_length_histogram"] == {1: 40}
    assert pearl.stats["draft_tokens"] == 40
    # sd verifies whole windows of 8, one committed token each, trimmed to what is left at the
    # end: after new token g the window is max(1, min(8, 40 - g - 1)) tokens, g = 1..39
    windows = [max(1, min(8, 40 - g - 1)) for g in range(1, 40)]
    assert sd.stats["draft_length_histogram"] == {n: windows.count(n) for n in set(windows)}
    assert sd.stats["draft_tokens"] == sum(windows)
    assert pearl.stats["draft_forwards"] < sd.stats["draft_forwards"]
