"""Acceptance rules: which draft tokens the target keeps, and its own next token.

Greedy (temperature 0): a draft token is accepted iff it equals the target's argmax at its
position; the correction (or bonus) is the target's argmax at the first unaccepted position.
"""

import torch


def accept_greedy(logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """Judge ``draft`` against target ``logits`` [len(draft) + 1, vocab].

    logits[i] predicts the position of draft[i]; logits[len(draft)] the position after the window.
    Returns (accepted, token): the accepted prefix length and the target's token right after it.
    """
    choice = logits.argmax(dim=-1).tolist()
    k = 0
    while k < len(draft) and draft[k] == choice[k]:
        k += 1
    return k, choice[k]


def choose_greedy(logits: torch.Tensor) -> int:
    """The argmax of one position's logits [vocab]."""
    return int(logits.argmax(dim=-1))
