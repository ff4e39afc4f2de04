"""The exact distribution of a model's first new tokens and a chi-square test of samples against
it, for the sampling tests (test_sampling.py, test_hidden_transfer.py).

The warping (temperature, top-k, top-p) is written here again from its definition, in numpy and
Python, on purpose: the services use specdec.sampling.warp, and a test that computed its expected
distribution with the same function would share any bug in it."""

import numpy as np
import torch
from scipy.stats import chisquare


def reference_warp(logits: np.ndarray, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> np.ndarray:
    """Probabilities of one row of logits: softmax(logits / temperature) restricted to the top_k
    most likely tokens (0: all), then to the smallest set of most likely tokens whose
    probability reaches top_p, renormalised."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = order[:top_k] if top_k else order
    e = np.exp(x[keep] - x[keep].max())
    probs = dict(zip(keep, e / e.sum()))
    chosen, mass = [], 0.0
    for i in keep:
        chosen.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    out = np.zeros(len(x))
    out[chosen] = [probs[i] for i in chosen]
    return out / out.sum()


def exact_joint(model, prompt: list[int], n: int, temperature: float, top_k: int = 0,
                top_p: float = 1.0) -> dict[tuple[int, ...], float]:
    """P(t1..tn) of the first ``n`` new tokens after ``prompt``, over its support."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        prefixes = list(dist)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        nxt = {}
        for p, row in zip(prefixes, logits.double().numpy()):
            probs = reference_warp(row, temperature, top_k, top_p)
            for t in np.flatnonzero(probs):
                nxt[p + (int(t),)] = dist[p] * probs[t]
        dist = nxt
    return dist


def sample_joint(joint: dict[tuple[int, ...], float], n: int, seed: int = 0) -> list[tuple]:
    """``n`` draws from ``joint`` (a negative control: samples of some other model)."""
    cells = list(joint)
    p = np.array([joint[c] for c in cells])
    idx = np.random.default_rng(seed).choice(len(cells), size=n, p=p / p.sum())
    return [cells[i] for i in idx]


def chi2_pvalue(samples: list[tuple], joint: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit of samples to ``joint``; cells expected fewer than 5 times are pooled;
    0 when a sample is one the joint calls impossible."""
    if any(s not in joint for s in samples):
        return 0.0
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    n = len(samples)
    big = [c for c in joint if joint[c] * n >= 5]
    small = [c for c in joint if joint[c] * n < 5]
    obs = [counts.get(c, 0) for c in big]
    exp = [joint[c] * n for c in big]
    if small:
        obs.append(sum(counts.get(c, 0) for c in small))
        exp.append(sum(joint[c] for c in small) * n)
    exp_arr = np.array(exp)
    return float(chisquare(obs, exp_arr * n / exp_arr.sum()).pvalue)
