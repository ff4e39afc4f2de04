"""Logprobs through the gRPC path (docs/design.md section 5): in every mode each returned token's
logprob and top alternatives equal what transformers gives for the target alone over the same
sequence (float32, 1e-4): greedy the log-softmax of its logits, sampling the log of the warped
distribution. They stay aligned with the ids through rejected windows, a stop string or
max_new_tokens cutting a window, and the fallback to the target alone; they arrive only when
asked for; bad values are refused naming the field."""

import asyncio
import math
import random

import grpc
import pytest
import torch

from cluster import Cluster
from conftest import greedy_reference
from pearl.client import Client, Delta, Result
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.models import LoadedModel, tiny_loaded
from specdec.sampling import Sampling, warp

TOL = 1e-4
rng = random.Random(99)
PROMPTS = [[rng.randrange(512) for _ in range(n)] for n in (3, 21)]
CONFIGS = [("ar", 0), ("sd", 4), ("pearl", 0), ("pearl", 3)]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def reference(loaded: LoadedModel, prompt: list[int], ids: list[int],
              s: Sampling = Sampling()) -> torch.Tensor:
    """The target alone: logprobs [len(ids), vocab] at each new token's position from one
    transformers forward pass over prompt + ids."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
    if s.greedy:
        return torch.log_softmax(logits.float(), dim=-1)
    return torch.from_numpy(warp(logits, s)).log()  # -inf outside top-k / top-p


def assert_exact(r: Result, ref: torch.Tensor, top: int) -> None:
    """One logprob per id, each with its ``top`` alternatives, equal to ``ref``."""
    assert len(r.logprobs) == len(r.token_ids) > 0
    assert [t.token_id for t in r.logprobs] == r.token_ids
    for i, t in enumerate(r.logprobs):
        assert t.logprob == pytest.approx(ref[i, t.token_id].item(), abs=TOL), f"token {i}"
        vals, idx = ref[i].topk(top)
        want = [(j, v) for j, v in zip(idx.tolist(), vals.tolist()) if v > -math.inf]
        assert [j for j, _ in t.top] == [j for j, _ in want], f"token {i}"
        assert [v for _, v in t.top] == pytest.approx([v for _, v in want], abs=TOL)


def assert_streamed_alike(parts: list) -> Result:
    """Every delta carries one logprob per id; together they are the result's."""
    deltas, result = parts[:-1], parts[-1]
    assert isinstance(result, Result) and all(isinstance(d, Delta) for d in deltas)
    for d in deltas:
        assert [t.token_id for t in d.logprobs] == d.token_ids
    assert sum((d.logprobs for d in deltas), []) == result.logprobs
    return result


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def poor_cluster(tiny_target):
    """A draft that is another random model: most windows are rejected early."""
    c = Cluster(tiny_loaded(3), tiny_target)
    yield c
    c.close()


# -- greedy: the target's own log-softmax -------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"prompt{len(p)}")
@pytest.mark.parametrize("mode,gamma", CONFIGS)
def test_greedy_logprobs_are_the_target_alone(client, tiny_target, prompt, mode, gamma):
    n = 40
    parts = list(client.generate(prompt, mode=mode, max_new_tokens=n, gamma=gamma,
                                 logprobs=True, top_logprobs=5, ignore_eos=True))
    r = assert_streamed_alike(parts)
    assert r.token_ids == greedy_reference(tiny_target, prompt, n)
    assert_exact(r, reference(tiny_target, prompt, r.token_ids), 5)
    if mode != "ar":  # the noisy draft is rejected somewhere in 40 tokens
        assert not r.stats["fell_back"] and 0 < r.stats["acceptance_rate"] < 1
    assert r.to_json()["logprobs"][0]["token_id"] == r.token_ids[0]


@pytest.mark.parametrize("mode,gamma", [("sd", 4), ("sd", 1), ("pearl", 0), ("pearl", 5)])
def test_rejected_windows_keep_them_aligned(poor_cluster, tiny_target, mode, gamma):
    prompt = PROMPTS[1]
    with Client(poor_cluster.address, timeout_s=120) as cl:
        r = cl.complete(prompt, mode=mode, max_new_tokens=32, gamma=gamma, logprobs=True,
                        top_logprobs=3, ignore_eos=True)
    assert r.token_ids == greedy_reference(tiny_target, prompt, 32)
    assert r.stats["draft_tokens"] > 0 and r.stats["acceptance_rate"] < 1
    assert_exact(r, reference(tiny_target, prompt, r.token_ids), 3)


@pytest.mark.parametrize("mode,gamma", [("ar", 0), ("sd", 6), ("pearl", 0), ("pearl", 6)])
def test_stop_string_cutting_a_window_drops_their_logprobs(client, tiny_target, mode, gamma):
    prompt = PROMPTS[1]
    ref = greedy_reference(tiny_target, prompt, 40)
    tok = tiny_target.tokenizer
    stop = tok.decode(ref[17:19])
    n = next(i for i in range(1, 41) if stop in tok.decode(ref[:i]))  # first id completing it
    r = assert_streamed_alike(list(client.generate(
        prompt, mode=mode, max_new_tokens=40, gamma=gamma, stop=[stop], logprobs=True,
        top_logprobs=2)))
    assert r.stats["finish_reason"] == "stop" and r.token_ids == ref[:n]
    assert_exact(r, reference(tiny_target, prompt, r.token_ids), 2)


@pytest.mark.parametrize("mode,gamma", [("sd", 8), ("pearl", 8)])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens_ends_them_too(client, tiny_target, mode, gamma, n):
    prompt = PROMPTS[0]
    r = client.complete(prompt, mode=mode, max_new_tokens=n, gamma=gamma, logprobs=True,
                        ignore_eos=True)
    assert r.token_ids == greedy_reference(tiny_target, prompt, n)
    assert all(t.top == [] for t in r.logprobs)  # top_logprobs 0: the token's own only
    assert_exact(r, reference(tiny_target, prompt, r.token_ids), 0)


@pytest.mark.parametrize("mode", ["pearl", "sd"])
def test_draft_lost_mid_request_still_one_logprob_per_token(tiny_draft, tiny_target, mode):
    """The draft goes silent after five forward passes: the target finishes alone, applying the
    answers still due (pearl: from a held distribution) with their logprobs."""
    prompt = PROMPTS[1]
    c = Cluster(tiny_draft, tiny_target, coordinator_kw=dict(draft_timeout_s=0.3))
    runner, count = c.draft.runner, [0]
    original = runner.run

    async def stalling(fn, *args):
        count[0] += 1
        if count[0] > 5:
            await asyncio.sleep(30)
        return await original(fn, *args)

    runner.run = stalling
    try:
        with Client(c.address, timeout_s=60) as cl:
            r = cl.complete(prompt, mode=mode, max_new_tokens=30, logprobs=True,
                            top_logprobs=4, ignore_eos=True)
    finally:
        runner.run = original
        c.close()
    assert r.stats["fell_back"] and r.token_ids == greedy_reference(tiny_target, prompt, 30)
    assert_exact(r, reference(tiny_target, prompt, r.token_ids), 4)


# -- sampling: the log of the warped distribution the token is drawn from -------------------------


@pytest.mark.parametrize("top_k", [20, 3])
@pytest.mark.parametrize("mode,gamma", CONFIGS)
def test_sampled_logprobs_are_the_warped_distribution(client, tiny_target, mode, gamma, top_k):
    prompt = PROMPTS[1]
    s = Sampling(temperature=0.8, top_k=top_k, seed=11)
    r = client.complete(prompt, mode=mode, max_new_tokens=24, gamma=gamma, logprobs=True,
                        top_logprobs=5, temperature=s.temperature, top_k=s.top_k, seed=s.seed,
                        ignore_eos=True)
    ref = reference(tiny_target, prompt, r.token_ids, s)
    assert_exact(r, ref, 5)
    with torch.no_grad():
        logits = tiny_target.model(torch.tensor([prompt + r.token_ids])).logits[0]
    for i, t in enumerate(r.logprobs):
        support = set(logits[len(prompt) - 1 + i].topk(top_k).indices.tolist())
        assert len(t.top) == min(5, top_k)  # alternatives outside the top-k are never listed
        assert {j for j, _ in t.top} <= support and t.token_id in support
        assert all(math.isfinite(v) for _, v in t.top) and math.isfinite(t.logprob)


# -- Hidden Transfer: the logits of the tree node that chose the token ---------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_hidden_transfer_logprobs_are_the_target_alone(transfer_cluster, ht_target, temperature):
    prompt = [7, 3, 22, 41, 9, 13, 2, 30]
    s = Sampling(temperature=temperature, top_k=20 if temperature else 0, seed=5)
    with Client(transfer_cluster.address, timeout_s=120) as cl:
        r = assert_streamed_alike(list(cl.generate(
            prompt, mode="hidden-transfer", max_new_tokens=40, logprobs=True, top_logprobs=5,
            temperature=s.temperature, top_k=s.top_k, seed=s.seed, ignore_eos=True)))
    if s.greedy:
        assert r.token_ids == greedy_reference(ht_target, prompt, 40)
    assert r.stats["accepted_tokens"] > 0  # steps committed several tokens with their logprobs
    assert_exact(r, reference(ht_target, prompt, r.token_ids, s), 5)


# -- only when asked, and only sane values --------------------------------------------------------


def test_no_logprobs_unless_asked(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        msgs = list(pearl_pb2_grpc.CoordinatorStub(ch).Generate(pb.GenerateRequest(
            prompt_ids=PROMPTS[0], mode=pb.MODE_PEARL, max_new_tokens=12), timeout=60))
    assert sum(len(m.token_ids) for m in msgs) == 12
    assert all(len(m.logprobs) == 0 for m in msgs)
    with Client(cluster.address, timeout_s=60) as cl:
        parts = list(cl.generate(PROMPTS[0], mode="sd", max_new_tokens=12))
    assert all(p.logprobs == [] for p in parts) and "logprobs" not in parts[-1].to_json()


@pytest.mark.parametrize("fields,message", [
    (dict(logprobs=True, top_logprobs=6), "top_logprobs=6"),
    (dict(logprobs=True, top_logprobs=1 << 31), "top_logprobs="),
    (dict(top_logprobs=2), "top_logprobs needs logprobs"),
])
def test_bad_values_are_refused(cluster, fields, message):
    with grpc.insecure_channel(cluster.address) as ch, pytest.raises(grpc.RpcError) as e:
        list(pearl_pb2_grpc.CoordinatorStub(ch).Generate(pb.GenerateRequest(
            prompt_ids=PROMPTS[0], max_new_tokens=4, **fields), timeout=30))
    assert e.value.code() == INVALID and message in e.value.details()


@pytest.mark.parametrize("fields,message", [
    (dict(logprobs=True, top_logprobs=6), "start.top_logprobs=6"),
    (dict(top_logprobs=1), "start.top_logprobs needs start.logprobs"),
])
def test_target_refuses_bad_values(cluster, fields, message):
    start = pb.VerifyRequest(start=pb.VerifyStart(prompt_ids=PROMPTS[0], first_token=True,
                                                  **fields))
    with grpc.insecure_channel(cluster.target_address) as ch, pytest.raises(grpc.RpcError) as e:
        list(pearl_pb2_grpc.TargetServiceStub(ch).Verify(iter([start]), timeout=30))
    assert e.value.code() == INVALID and message in e.value.details()
