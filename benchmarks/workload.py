"""The open-loop serving bench's workload (`pearl bench serve`, benchmarks/serve.py): Poisson
arrival times and a mix of three kinds of request, all fixed by one seed.

- ``humaneval``: a HumanEval prompt to complete (plain text, no chat template).
- ``shared-system``: a chat whose system message is one long prompt (about ``--system-tokens``
  tokens: HumanEval function stubs, concatenated in order) shared by every request of the kind,
  and a short user question about one of those functions.
- ``two-turn``: a chat of two user turns; turn 1 asks for a HumanEval function, turn 2 (sent the
  moment turn 1 ends, with turn 1's answer as the assistant message) asks a follow-up.

The i-th arrival is the same request at every rate: the gaps between arrivals are one seeded
sequence of unit-mean exponential draws divided by the rate, and the kinds and contents come
from a second seeded generator that does not depend on the rate. The kinds keep the mix's
proportions in every prefix of the sequence (a short run has each kind), in a seeded order.

Every phase (contender x rate) opens its prompts with its own tag (:func:`tagged`), so that no
phase finds the prompts of an earlier one in the services' prefix cache (the same requests run
for every contender through the same services): each phase starts cold, and within it the
shared system prompt and a conversation's turn 1 can be reused, as in a server.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("humaneval", "shared-system", "two-turn")
DEFAULT_MIX = "humaneval=1,shared-system=1,two-turn=1"
SYSTEM_HEAD = ("You are a careful Python assistant for the project whose functions follow. "
               "Answer briefly and precisely.\n\n")
QUESTIONS = ("What does `{f}` return?", "Give one edge case for `{f}`.",
             "Which argument types does `{f}` take?", "Write one assert that tests `{f}`.",
             "In one sentence, how would you implement `{f}`?")
FOLLOW_UPS = ("Now add type hints and a docstring.", "Can you make it shorter?",
              "Add two doctest examples.", "What is its time complexity?",
              "Rewrite it without loops.")


@dataclass(frozen=True)
class Arrival:
    """One request (a conversation for ``two-turn``) and when it arrives: ``at`` seconds after
    its phase starts. ``prompt``: the HumanEval problem (``humaneval``, ``two-turn``);
    ``question``: the user's question (``shared-system``), ``follow_up``: turn 2's."""

    index: int
    at: float
    kind: str
    prompt: int | None = None
    question: str | None = None
    follow_up: str | None = None


def arrival_times(rate: float, seed: int, n: int | None = None,
                  duration: float | None = None) -> list[float]:
    """A Poisson process of ``rate`` requests/s: the first arrival at 0, then exponential gaps
    of mean 1/rate; ``n`` arrivals, or every arrival before ``duration`` seconds."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if (n is None) == (duration is None):
        raise ValueError("give exactly one of n and duration")
    rng, t, out = random.Random(seed), 0.0, []
    while (len(out) < n) if n is not None else (t < duration):
        out.append(t)
        t += rng.expovariate(1.0) / rate
    return out


def parse_mix(spec: str) -> dict[str, float]:
    """'humaneval=1,shared-system=2' -> the kinds' weights (kinds left out weigh 0)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, eq, weight = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS or not eq:
            raise ValueError(f"--mix: {part!r} is not KIND=WEIGHT with KIND one of "
                             f"{', '.join(KINDS)}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: weight of {kind} is not a number: {weight!r}") from None
        if mix[kind] < 0:
            raise ValueError(f"--mix: weight of {kind} is negative")
    if sum(mix.values()) <= 0:
        raise ValueError(f"--mix {spec!r}: no kind has a positive weight")
    return mix


def workload(times: list[float], mix: dict[str, float], seed: int, n_prompts: int,
             functions: list[str]) -> list[Arrival]:
    """One arrival per time: its kind from :func:`kind_sequence`, its HumanEval problem from
    the first ``n_prompts``, its questions about the system prompt's ``functions``."""
    rng = random.Random(f"pearl-serve-mix-{seed}")  # independent of the rate
    functions = functions or ["main"]
    out = []
    for i, (at, kind) in enumerate(zip(times, kind_sequence(mix, len(times), rng))):
        prompt = rng.randrange(n_prompts)
        question = rng.choice(QUESTIONS).format(f=rng.choice(functions))
        follow_up = rng.choice(FOLLOW_UPS)
        out.append(Arrival(i, at, kind, prompt=None if kind == "shared-system" else prompt,
                           question=question if kind == "shared-system" else None,
                           follow_up=follow_up if kind == "two-turn" else None))
    return out


def kind_sequence(mix: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """``n`` kinds in the mix's proportions at every prefix: each next kind is one that is
    furthest behind its share (ties drawn with ``rng``), so that 1:1:1 gives every kind once in
    each three, in a shuffled order."""
    total = sum(mix.values())
    share = {k: mix[k] / total for k in KINDS if mix.get(k, 0) > 0}
    count = dict.fromkeys(share, 0)
    out = []
    for i in range(n):
        behind = {k: share[k] * (i + 1) - count[k] for k in share}
        most = max(behind.values())
        kind = rng.choice([k for k, v in behind.items() if v >= most - 1e-9])
        count[kind] += 1
        out.append(kind)
    return out


def system_prompt(texts: list[str], tokens: int, count: Callable[[str], int]) -> str:
    """The shared system prompt: a head, then ``texts`` in order until ``count`` (the target
    tokenizer's token count) reaches ``tokens``."""
    out = SYSTEM_HEAD
    for text in texts:
        if count(out) >= tokens:
            break
        out += text.strip() + "\n\n"
    return out


def function_names(text: str) -> list[str]:
    """The functions ``def``-ined in ``text``, in order, without repeats."""
    return list(dict.fromkeys(re.findall(r"^def (\w+)\(", text, re.MULTILINE)))


def first_turn(arr: Arrival, system: str, prompts: list[dict],
               tag: str = "") -> str | list[dict]:
    """What the first (or only) request of ``arr`` sends: a prompt text or chat messages, each
    marked with the phase's ``tag`` at its start (:func:`tagged`)."""
    if arr.kind == "humaneval":
        return tagged(prompts[arr.prompt]["text"], tag, code=True)
    if arr.kind == "shared-system":
        return [{"role": "system", "content": tagged(system, tag)},
                {"role": "user", "content": arr.question}]
    return [{"role": "user", "content": tagged(ask(prompts[arr.prompt]["text"]), tag)}]


def second_turn(arr: Arrival, prompts: list[dict], answer: str, tag: str = "") -> list[dict]:
    """Turn 2 of a two-turn conversation: turn 1, its answer, the follow-up."""
    return [*first_turn(arr, "", prompts, tag), {"role": "assistant", "content": answer},
            {"role": "user", "content": arr.follow_up}]


def tagged(text: str, tag: str, code: bool = False) -> str:
    """``text`` opened with the phase's tag (a comment line in code): the phase's prompts share
    no prefix with another phase's, so none finds another's in a prefix cache."""
    if not tag:
        return text
    return f"# session {tag}\n{text}" if code else f"(session {tag}) {text}"


def ask(stub: str) -> str:
    return "Complete this Python function:\n\n" + stub.strip()
