"""A replaying draft for the benches (draft_service/replay.py): the target's own greedy
continuations it proposes, the flags that start it, and what every report of such a run says.

With random-weight models (e.g. ``random:qwen2.5-7b`` on a GPU) a real draft agrees with nothing;
a draft that proposes the target's next token with a chosen probability times the schedule and
the protocol at a known acceptance instead.
"""

from __future__ import annotations

import json
from pathlib import Path


def replay_note(acceptance: float) -> str:
    """What every report of a run with a replaying draft says about its acceptance."""
    return (f"the draft replays the target's greedy tokens with probability {acceptance} "
            "(draft_service/replay.py): acceptance is CHOSEN, not a real pair's; the figures time "
            "the schedule and the protocol")


def replay_args(path: Path, acceptance: float) -> list[str]:
    """The draft service's flags that make it replay the references in ``path``."""
    return ["--replay", str(path), "--replay-acceptance", str(acceptance)]


def write_references(greedy, prompts: list[dict], new_tokens: int, path: Path,
                     workers: int = 1) -> Path:
    """The target's own greedy continuation of every prompt, one JSON list of prompt +
    continuation per line: what a replaying draft proposes. ``greedy(prompt_ids, n)`` gives the
    target's first ``n`` greedy tokens (the latency bench: the model in this process; the load
    bench: the target service, ``workers`` prompts at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        rows = list(ex.map(lambda p: p["ids"] + greedy(p["ids"], new_tokens + 16), prompts))
    tmp = path.with_suffix(".tmp")  # whole, at once: a replaying draft may read it any time
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
