"""Sampling: warping logits (temperature, top-k, top-p), random draws keyed to positions, and the
draft distribution q as it crosses the wire.

Random draws are ``uniform(seed, position, purpose)``: a pure function, so a session's output does
not depend on the order in which messages happen to arrive, only on what is at each position.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

# Purposes of a random draw at one position (each gets an independent uniform).
DRAFT, ACCEPT, RESIDUAL, TARGET = range(4)

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> "Sampling":
        """Raise ValueError naming the offending field."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def uniform(seed: int, position: int, purpose: int) -> float:
    """A uniform in [0, 1) determined by (seed, position, purpose) alone."""
    z = _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ position) ^ purpose)
    return (z >> 11) / float(1 << 53)


def warp(logits: torch.Tensor, s: Sampling) -> np.ndarray:
    """Warped probabilities (float64) from logits [..., vocab]: temperature, then top-k, then
    top-p (the smallest set of most likely tokens whose mass reaches top_p)."""
    x = logits.double() / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    p = torch.softmax(x, dim=-1)
    if s.top_p < 1:
        sp, idx = torch.sort(p, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sp, dim=-1) - sp  # mass of the tokens ranked above each one
        sp = sp.masked_fill(before >= s.top_p, 0.0)
        p = torch.zeros_like(p).scatter(-1, idx, sp)
        p = p / p.sum(dim=-1, keepdim=True)
    return p.cpu().numpy()  # float64 on the host, whatever device the logits came from


def sample(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from non-negative weights ``probs`` (any scale) with uniform ``u``."""
    c = np.cumsum(probs, dtype=np.float64)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return min(i, len(probs) - 1)


@dataclass
class WireDist:
    """A distribution as it crosses the wire: float16 weights over ``ids`` (None = every id).

    The draft samples from exactly these weights (renormalised), and the target judges with
    exactly them, so rounding cannot break the acceptance rule.
    """

    ids: np.ndarray | None  # int64 [n], ascending; None when dense
    weights: np.ndarray  # float16 [n] (or [vocab] when dense)

    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities in float64 summing to 1)."""
        w = self.weights.astype(np.float64)
        ids = np.arange(len(w)) if self.ids is None else self.ids
        return ids, w / w.sum()

    def dense(self, vocab: int) -> np.ndarray:
        ids, p = self.support()
        out = np.zeros(vocab, dtype=np.float64)
        out[ids] = p
        return out

    def sample(self, u: float) -> int:
        ids, p = self.support()
        return int(ids[sample(p, u)])

    def nbytes(self) -> int:
        return self.weights.nbytes + (0 if self.ids is None else 4 * len(self.ids))


def compress(probs: np.ndarray, tail: float = 1e-4) -> WireDist:
    """The wire form of ``probs``: drop the least likely tokens holding at most ``tail`` of the
    mass, round to float16, and go sparse when that is smaller. The result *is* the draft's q."""
    order = np.argsort(-probs, kind="stable")
    mass = np.cumsum(probs[order])
    keep = int(np.searchsorted(mass, 1.0 - tail, side="left")) + 1
    ids = np.sort(order[:keep])
    w = probs[ids].astype(np.float16)
    nz = w > 0
    ids, w = ids[nz], w[nz]
    if len(ids) == 0:  # everything underflowed: keep the most likely token
        ids, w = order[:1], np.array([1.0], dtype=np.float16)
    if 3 * len(ids) >= len(probs):  # 2 bytes per weight dense vs ~6 sparse
        dense = np.zeros(len(probs), dtype=np.float16)
        dense[ids] = w
        return WireDist(None, dense)
    return WireDist(ids.astype(np.int64), w)
