"""Acceptance rules: which draft tokens the target keeps, and its own next token.

Greedy (temperature 0): a draft token is accepted iff it equals the target's argmax at its
position; the correction (or bonus) is the target's argmax at the first unaccepted position.

Sampling (docs/design.md section 5): with p and q the warped target and draft distributions at a
position, a draft token x ~ q is accepted with probability min(1, p(x)/q(x)); on rejection the
target samples from norm(max(0, p - q)); after a fully accepted window the bonus comes from p.
Then every emitted token is distributed exactly as p, whatever q is.
"""

import numpy as np
import torch

from specdec.sampling import ACCEPT, RESIDUAL, TARGET, Sampling, WireDist, sample, uniform, warp


def accept_greedy(logits: torch.Tensor, draft: list[int], bonus: bool = True
                  ) -> tuple[int, int | None]:
    """Judge ``draft`` against target ``logits`` [len(draft) + 1, vocab].

    logits[i] predicts the position of draft[i]; logits[len(draft)] the position after the window.
    Returns (accepted, token): the accepted prefix length and the target's token right after it
    (None when all were accepted and no bonus is wanted).
    """
    choice = logits.argmax(dim=-1).tolist()
    k = 0
    while k < len(draft) and draft[k] == choice[k]:
        k += 1
    return k, (choice[k] if k < len(draft) or bonus else None)


def accept_sampled(p: np.ndarray, draft: list[int], qs: list[WireDist], seed: int,
                   position: int, bonus: bool = True) -> tuple[int, int | None]:
    """The speculative sampling rule over warped target probabilities ``p`` [len(draft) + 1, V].

    Draws are keyed to (seed, absolute position), so the verdict on a position does not depend on
    which window it arrived in.
    """
    vocab = p.shape[-1]
    for i, x in enumerate(draft):
        ids, qp = qs[i].support()
        hit = np.flatnonzero(ids == x)
        qx = qp[hit[0]] if len(hit) else 0.0
        if qx <= 0:  # the draft cannot have drawn it from this q
            raise ValueError(f"draft token {x} at position {position + i} is outside its q")
        if uniform(seed, position + i, ACCEPT) * qx < p[i, x]:  # u < p(x) / q(x)
            continue
        residual = np.maximum(p[i] - qs[i].dense(vocab), 0.0)
        if residual.sum() <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = p[i]
        return i, sample(residual, uniform(seed, position + i, RESIDUAL))
    if bonus:
        return len(draft), sample(p[len(draft)], uniform(seed, position + len(draft), TARGET))
    return len(draft), None


def judge(logits: torch.Tensor, draft: list[int], qs: list[WireDist], s: Sampling,
          position: int, bonus: bool) -> tuple[int, int | None]:
    """Dispatch to the greedy or the sampling rule."""
    if s.greedy:
        return accept_greedy(logits, draft, bonus)
    return accept_sampled(warp(logits, s), draft, qs, s.seed, position, bonus)


def choose(logits: torch.Tensor, s: Sampling, position: int) -> int:
    """The target's own token at ``position`` from its logits [vocab] (no draft involved)."""
    if s.greedy:
        return int(logits.argmax(dim=-1))
    return sample(warp(logits, s), uniform(s.seed, position, TARGET))
