"""The target's log-probabilities of the tokens it commits (docs/design.md section 5).

They come from the logits of the forward pass that committed each token, so they are what the
target alone would report. Greedy: the log-softmax of the raw logits. Sampling: the log of the
warped distribution p the token is drawn from (temperature, top-k, top-p; -inf outside its
support); speculative sampling emits every token distributed exactly as p.
"""

import math
from dataclasses import dataclass

import torch

from specdec.sampling import Sampling, warp

MAX_TOP_LOGPROBS = 5  # alternatives a request may ask for per token


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, ids: list[int], s: Sampling, top: int
                   ) -> list[TokenLogprob]:
    """The logprob of ``ids[i]`` under row i of ``logits`` [>= len(ids), vocab], with the ``top``
    most likely tokens of that row (tokens outside the support of p are never listed)."""
    if not ids:
        return []
    rows = logits[: len(ids)]
    if s.greedy:
        lp = torch.log_softmax(rows.float(), dim=-1)
    else:
        lp = torch.from_numpy(warp(rows, s)).log()  # log 0 = -inf outside the support
    chosen = lp.gather(-1, torch.tensor(ids, device=lp.device)[:, None])[:, 0].tolist()
    alts: list[list[tuple[int, float]]] = [[] for _ in ids]
    if top:
        vals, idx = lp.topk(min(top, lp.shape[-1]), dim=-1)
        alts = [[(i, v) for i, v in zip(ri, rv) if v > -math.inf]
                for ri, rv in zip(idx.tolist(), vals.tolist())]
    return [TokenLogprob(t, c, tuple(a)) for t, c, a in zip(ids, chosen, alts)]
