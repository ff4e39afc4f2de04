"""Sampling: the acceptance rule emits tokens distributed as p; end to end over real services the
first two tokens, and the first four across windows and rollbacks, follow the target's exact joint
distribution (chi-square against an independent warp), a draft-only sampler is rejected by the
same test, seeds make outputs repeatable, bad values are refused."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from chi2 import chi2_pvalue, exact_joint, reference_warp, sample_joint
from cluster import Cluster
from conftest import noisy_copy
from pearl.client import Client
from specdec.acceptance import accept_sampled
from specdec.models import tiny_loaded
from specdec.sampling import DRAFT, Sampling, WireDist, compress, uniform, warp

# -- the rule alone -----------------------------------------------------------------------------


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def dist(rng, n):
    x = rng.gamma(0.7, size=n)
    return x / x.sum()


def emitted(p: np.ndarray, q: np.ndarray, n: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the rule ``n`` times on a window of draft tokens drawn from q (same p, q at every
    position); return counts of the first emitted token and of the bonus token."""
    V = len(p)
    wq = WireDist(None, q.astype(np.float16))
    qn = wq.dense(V)
    first, bonus = np.zeros(V), np.zeros(V)
    P = np.tile(p, (window + 1, 1))
    for seed in range(n):
        draft = [wq.sample(uniform(seed, 10 + i, DRAFT)) for i in range(window)]
        k, t = accept_sampled(P, draft, [wq] * window, seed, 10, bonus=True)
        first[draft[0] if k > 0 else t] += 1
        if k == window:
            bonus[t] += 1
    assert qn.sum() == pytest.approx(1.0)
    return first, bonus


@pytest.mark.parametrize("case", range(3))
def test_rule_emits_p(case):
    rng = np.random.default_rng(case)
    V = 6
    p, q = dist(rng, V), dist(rng, V)
    far = dist(rng, V)
    small, _ = emitted(p, q, 500, 1)
    big, bonus = emitted(p, q, 20000, 2)
    e_small, e_big = small / small.sum(), big / big.sum()
    # The distance to p shrinks with samples; the distance to unrelated distributions does not.
    assert tv(e_big, p) < 0.02
    assert tv(e_big, p) < tv(e_small, p) or tv(e_small, p) < 0.02
    assert tv(e_big, q) > 5 * tv(e_big, p) and tv(e_big, far) > 5 * tv(e_big, p)
    assert chisquare(big, big.sum() * p).pvalue > 1e-4
    assert bonus.sum() > 1000 and tv(bonus / bonus.sum(), p) < 0.04  # the bonus path


def test_rule_rejects_impossible_draft_token():
    wq = compress(np.array([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="outside its q"):
        accept_sampled(np.full((2, 4), 0.25), [3], [wq], 0, 0)


def test_warp_top_k_top_p_and_compress():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    p = warp(logits, Sampling(1.0))
    assert p.sum() == pytest.approx(1) and np.all(np.diff(p) < 0)
    assert np.count_nonzero(warp(logits, Sampling(1.0, top_k=2))) == 2
    pp = warp(logits, Sampling(1.0, top_p=0.9))
    kept = np.count_nonzero(pp)
    assert p[: kept - 1].sum() < 0.9 <= p[:kept].sum()  # the smallest set reaching top_p
    assert warp(logits, Sampling(0.01)).max() == pytest.approx(1.0)
    big = torch.linspace(5, -5, 100)
    w = compress(warp(big, Sampling(1.0, top_k=2)))
    assert w.ids is not None and list(w.ids) == [0, 1]  # truncated: sparse
    ids, probs = w.support()
    assert probs.sum() == pytest.approx(1.0)
    dense = compress(p)
    assert dense.ids is None and len(dense.weights) == 6


def test_uniform_is_keyed_and_uniform():
    assert uniform(1, 2, 3) == uniform(1, 2, 3)
    assert len({uniform(1, i, 0) for i in range(1000)}) == 1000
    u = np.array([uniform(7, i, DRAFT) for i in range(20000)])
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1


# -- end to end: chi-square against the target's exact distribution ----------------------------
# The expected distributions come from tests/chi2.py, which warps logits with its own code.

V = 24
PROMPT = [3, 17, 5, 9]
N = 1500


@pytest.fixture(scope="module")
def pair():
    target = tiny_loaded(11, vocab_size=V)
    with torch.no_grad():  # a random tiny model is nearly uniform; sharpen it like a real one
        target.model.lm_head.weight.mul_(6)
    draft = noisy_copy(target, 5, 0.3)
    return draft, target


@pytest.fixture(scope="module")
def small_cluster(pair):
    c = Cluster(*pair)
    yield c
    c.close()


def spec_samples(address: str, mode: str, s: Sampling, n: int, tokens: int = 2,
                 gamma: int = 0) -> tuple[list[tuple[int, ...]], list[dict]]:
    """``n`` requests with seeds 1000.. : their new tokens and their statistics."""
    def one(seed):
        with Client(address) as c:
            r = c.complete(PROMPT, mode=mode, max_new_tokens=tokens, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, seed=seed, gamma=gamma)
        return tuple(r.token_ids), r.stats

    with ThreadPoolExecutor(6) as pool:
        done = list(pool.map(one, range(1000, 1000 + n)))
    return [t for t, _ in done], [st for _, st in done]


def assert_speculated(mode: str, stats: list[dict]) -> float:
    """The samples came from speculation, not from the target alone: every request judged draft
    tokens without falling back, and the draft was sometimes rejected. The acceptance."""
    assert not any(st["fell_back"] for st in stats), f"{mode}: a request fell back"
    assert all(st["draft_tokens"] > 0 for st in stats), f"{mode}: a request judged no draft token"
    drafted = sum(st["draft_tokens"] for st in stats)
    acceptance = sum(st["accepted_tokens"] for st in stats) / drafted
    assert 0.05 < acceptance < 0.95, f"{mode}: acceptance {acceptance:.3f}"
    return acceptance


SETTINGS = [Sampling(1.0), Sampling(1.0, top_k=8, top_p=0.9)]


@pytest.mark.parametrize("s", SETTINGS, ids=["t1", "topk8-topp0.9"])
def test_chi_square_sd_and_pearl_match_target(small_cluster, pair, s):
    draft, target = pair
    warp_args = (s.temperature, s.top_k, s.top_p)
    joint = exact_joint(target.model, PROMPT, 2, *warp_args)
    control = chi2_pvalue(sample_joint(exact_joint(draft.model, PROMPT, 2, *warp_args), N), joint)
    assert control < 1e-6, f"the test has no power: draft-only p-value {control:.2e}"
    for mode in ("sd", "pearl"):
        samples, stats = spec_samples(small_cluster.address, mode, s, N,
                                      gamma=3 if mode == "sd" else 0)
        acceptance = assert_speculated(mode, stats)
        pv = chi2_pvalue(samples, joint)
        print(f"{mode} {s}: p-value {pv:.4f} (draft-only control {control:.2e}), "
              f"acceptance {acceptance:.3f}")
        assert pv > 1e-3, f"{mode}: speculative samples do not follow the target ({pv:.2e})"


@pytest.mark.slow  # 2 x 1500 requests: ~1 min on two loaded cores
def test_chi_square_four_tokens_across_windows_and_rollbacks(small_cluster, pair):
    """The joint of the first four tokens, with windows of two: tokens 3 and 4 lie beyond the
    first window, and in most requests after a rejection and the rollback it causes. top-k 3
    keeps the joint to 81 cells, so 1500 samples measure every one."""
    draft, target = pair
    s = Sampling(1.0, top_k=3)
    joint = exact_joint(target.model, PROMPT, 4, 1.0, 3)
    control = chi2_pvalue(sample_joint(exact_joint(draft.model, PROMPT, 4, 1.0, 3), N), joint)
    assert control < 1e-6, f"the test has no power: draft-only p-value {control:.2e}"
    for mode in ("sd", "pearl"):
        samples, stats = spec_samples(small_cluster.address, mode, s, N, tokens=4, gamma=2)
        acceptance = assert_speculated(mode, stats)
        rejected = sum(st["accepted_tokens"] < st["draft_tokens"] for st in stats)
        assert rejected > N / 3, f"{mode}: only {rejected} requests saw a rejection"
        assert all(len(t) == 4 for t in samples)
        pv = chi2_pvalue(samples, joint)
        print(f"{mode} 4 tokens: p-value {pv:.4f} (draft-only control {control:.2e}), "
              f"acceptance {acceptance:.3f}, {rejected} of {N} requests rejected a draft token")
        assert pv > 1e-3, f"{mode}: speculative samples do not follow the target ({pv:.2e})"


def test_reference_warp_is_what_the_readme_says():
    """The test's own warp against hand-computed cases (it must not be checked against warp)."""
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert np.allclose(reference_warp(logits, 1.0), [0.5, 0.2, 0.15, 0.1, 0.05])
    assert np.allclose(reference_warp(logits, 1.0, top_k=2), [5 / 7, 2 / 7, 0, 0, 0])
    assert np.allclose(reference_warp(logits, 1.0, top_p=0.69), [5 / 7, 2 / 7, 0, 0, 0])
    assert np.allclose(reference_warp(logits, 1.0, top_p=0.71), [0.5 / 0.85, 0.2 / 0.85,
                                                                0.15 / 0.85, 0, 0])
    assert np.allclose(reference_warp(logits, 1.0, top_k=3, top_p=0.9),
                       [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    sq = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    assert np.allclose(reference_warp(logits, 0.5), sq / sq.sum())


# -- seeds --------------------------------------------------------------------------------------


def test_seeded_determinism(small_cluster):
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=42)
    with Client(small_cluster.address) as c:
        runs = {}
        for mode, gammas in (("ar", [0]), ("sd", [2, 5]), ("pearl", [0, 1, 3, 6])):
            for g in gammas:
                a = c.complete(PROMPT, mode=mode, gamma=g, **kw).token_ids
                b = c.complete(PROMPT, mode=mode, gamma=g, **kw).token_ids
                assert a == b, f"{mode} gamma={g}: same seed, different tokens"
                runs[(mode, g)] = a
        # pearl decides every position by the same rule: window lengths cannot change the output
        assert len({tuple(runs[("pearl", g)]) for g in (0, 1, 3, 6)}) == 1
        other = c.complete(PROMPT, mode="pearl", **{**kw, "seed": 43}).token_ids
        assert other != runs[("pearl", 0)]


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"),
])
def test_invalid_sampling_values(small_cluster, kw, field):
    with Client(small_cluster.address) as c, pytest.raises(grpc.RpcError) as e:
        c.complete(PROMPT, mode="pearl", max_new_tokens=4, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
