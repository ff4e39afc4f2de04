"""Sampling: the acceptance rule emits tokens distributed as p; end to end over real services the
first two tokens follow the target's exact joint distribution (chi-square), a draft-only sampler
is rejected by the same test, seeds make outputs repeatable, bad values are refused."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

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


# -- end to end: chi-square of the first two tokens ---------------------------------------------

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


def exact_joint(model, s: Sampling) -> np.ndarray:
    """P(t1, t2) [V, V] of the first two new tokens, computed from the model's logits."""
    with torch.inference_mode():
        l1 = model(torch.tensor([PROMPT])).logits[0, -1]
        batch = torch.tensor([PROMPT + [t] for t in range(V)])
        l2 = model(batch).logits[:, -1]
    p1 = warp(l1, s)
    p2 = warp(l2, s)
    return p1[:, None] * p2


def draft_only_samples(model, s: Sampling, n: int) -> list[tuple[int, int]]:
    """The negative control: two tokens sampled from the draft model alone."""
    joint = exact_joint(model, s).ravel()
    rng = np.random.default_rng(0)
    idx = rng.choice(len(joint), size=n, p=joint / joint.sum())
    return [(i // V, i % V) for i in idx]


def chi2_pvalue(samples: list[tuple[int, int]], joint: np.ndarray) -> float:
    """Goodness of fit of 2-token samples to the exact joint; cells expected < 5 are pooled."""
    counts = np.zeros(V * V)
    for a, b in samples:
        counts[a * V + b] += 1
    expected = joint.ravel() * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    if obs.sum() != len(samples):  # a sample the null hypothesis calls impossible
        return 0.0
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def spec_samples(address: str, mode: str, s: Sampling, n: int) -> list[tuple[int, int]]:
    def one(seed):
        with Client(address) as c:
            r = c.complete(PROMPT, mode=mode, max_new_tokens=2, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, seed=seed, gamma=3 if mode == "sd" else 0)
        return tuple(r.token_ids)

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(1000, 1000 + n)))


SETTINGS = [Sampling(1.0), Sampling(1.0, top_k=8, top_p=0.9)]


@pytest.mark.parametrize("s", SETTINGS, ids=["t1", "topk8-topp0.9"])
def test_chi_square_sd_and_pearl_match_target(small_cluster, pair, s):
    draft, target = pair
    joint = exact_joint(target.model, s)
    control = chi2_pvalue(draft_only_samples(draft.model, s, N), joint)
    assert control < 1e-6, f"the test has no power: draft-only p-value {control:.2e}"
    for mode in ("sd", "pearl"):
        pv = chi2_pvalue(spec_samples(small_cluster.address, mode, s, N), joint)
        print(f"{mode} {s}: p-value {pv:.4f} (draft-only control {control:.2e})")
        assert pv > 1e-3, f"{mode}: speculative samples do not follow the target ({pv:.2e})"


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
