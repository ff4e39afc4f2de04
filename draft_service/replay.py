"""A benchmarking draft with a chosen acceptance rate (docs/design.md section 8).

Models with random weights (timing runs on a GPU machine that cannot hold the real pair) accept
nothing of each other. For such runs the draft may *replay* the target's own greedy tokens: it
runs its forward pass as usual (so every timing is real), then, where its sequence still follows a
reference continuation of the target, it proposes the target's next token with probability
``acceptance`` and a different token otherwise. Figures from such runs time the schedule and the
protocol; they are never real-model acceptance.

The references are token sequences (prompt + the target's greedy continuation), one JSON list per
line of a file that the bench writes before it starts the draft; the file is read again when it
changes, at the start of a session.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from specdec.sampling import uniform

REPLAY = 7  # purpose of the replay draw at a position (specdec.sampling keeps 0..3)


class Replay:
    def __init__(self, path: str | Path, acceptance: float, seed: int = 0):
        if not 0 <= acceptance <= 1:
            raise ValueError(f"replay acceptance must be in [0, 1], got {acceptance}")
        self.path, self.acceptance, self.seed = Path(path), acceptance, seed
        self.mtime = -1.0
        self.refs: list[list[int]] = []

    def _load(self) -> None:
        mtime = self.path.stat().st_mtime
        if mtime != self.mtime:
            lines = self.path.read_text().splitlines()
            self.refs = [json.loads(x) for x in lines if x.strip()]
            self.mtime = mtime

    def session(self, prompt: list[int]) -> ReplaySession:
        """The replay of one draft session: the references that start with its prompt."""
        self._load()
        refs = [r for r in self.refs if r[: len(prompt)] == prompt]
        key = self.seed ^ zlib.crc32(json.dumps(prompt).encode())  # draws differ per prompt
        return ReplaySession(refs, self.acceptance, key)


class ReplaySession:
    def __init__(self, refs: list[list[int]], acceptance: float, key: int):
        self.refs, self.acceptance, self.key = refs, acceptance, key

    def token(self, ids: list[int], own: int) -> int:
        """The token to propose after ``ids`` (the draft's own greedy token is ``own``)."""
        n = len(ids)
        ref = next((r for r in self.refs if len(r) > n and r[:n] == ids), None)
        if ref is None:  # off every reference (after a wrong token): nothing to replay
            return own
        if uniform(self.key, n, REPLAY) < self.acceptance:
            return ref[n]
        return own if own != ref[n] else (own - 1 if own > 0 else own + 1)
