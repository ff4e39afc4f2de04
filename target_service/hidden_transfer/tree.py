"""The tree of one Hidden Transfer step: which candidates it holds and what each may attend to.

A rank path (r1, .., rd) names the node whose token at depth i is the rank-ri candidate of the
root's depth-i draft distribution (words: target_service/hidden_transfer/__init__.py).
"""

from __future__ import annotations

import torch


def tree_paths(rank_acceptance: list[list[float]], nodes: int, k: int) -> list[tuple[int, ...]]:
    """The ``nodes`` rank paths most likely to be accepted, prefix-closed, shortest first.

    A path's score is the product of the per-depth rank frequencies (the depths taken as
    independent). A path scores at most its prefix, so the best set is prefix-closed (Medusa's
    sparse-tree rule, here with measured frequencies).
    """
    scored: list[tuple[float, tuple[int, ...]]] = []
    frontier = [(1.0, ())]
    while frontier:  # expand every path whose score could still make the cut
        score, path = frontier.pop()
        d = len(path)
        if d == k or d >= len(rank_acceptance):
            continue
        for r, a in enumerate(rank_acceptance[d]):
            child = (score * a, path + (r,))
            scored.append(child)
            if len(scored) < 50_000:
                frontier.append(child)
    scored.sort(key=lambda c: (-c[0], len(c[1]), c[1]))
    chosen = [p for s, p in scored[:nodes] if s > 0]
    chosen_set = set(chosen)
    chosen = [p for p in chosen if all(p[:i] in chosen_set for i in range(1, len(p)))]
    return sorted(chosen, key=lambda p: (len(p), p))


def chain_paths(k: int) -> list[tuple[int, ...]]:
    """The top-1 chain (0,), (0, 0), ...: the tree when nothing has been measured."""
    return [(0,) * d for d in range(1, k + 1)]


def ancestors(parents: list[int]) -> torch.Tensor:
    """anc[j, m] = node m is node j or one of its ancestors; parents[j] < j, -1 for none."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for j, p in enumerate(parents):
        if p >= 0:
            if p >= j:
                raise ValueError(f"node {j} has parent {p}: parents must come first")
            anc[j] |= anc[p]
    return anc


def tree_masks(parents: list[int], prefix: int, pseudo_for: list[int], k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention masks (True = attend) for one forward.

    low  [n, prefix + n]: node j sees the prefix and its ancestors (itself included).
    high [n + g*k, prefix + n + g*k] for layers >= L, g = len(pseudo_for): pseudo i of node j
         sees what j sees, j itself, and pseudo 1..i of j.
    """
    n, g = len(parents), len(pseudo_for)
    anc = ancestors(parents)
    low = torch.cat([torch.ones(n, prefix, dtype=torch.bool), anc], dim=1)
    rows = n + g * k
    high = torch.zeros(rows, prefix + rows, dtype=torch.bool)
    high[:n, : prefix + n] = low
    causal = torch.tril(torch.ones(k, k, dtype=torch.bool))
    for gi, j in enumerate(pseudo_for):
        r0 = n + gi * k
        high[r0 : r0 + k, : prefix + n] = low[j]
        high[r0 : r0 + k, prefix + r0 : prefix + r0 + k] = causal
    return low, high
