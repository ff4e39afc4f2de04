"""Per-request statistics with the fixed names of docs/design.md section 6.

Busy intervals come from the services' reported forward times: a result that arrives at time t
after a forward of d ns marks [t - d, t] busy (clock-independent across nodes; the error is one
network hop). Overlap is the measure of the intersection of the draft's and the target's busy sets.
"""

import math
import time
from collections import Counter, defaultdict


def union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping [start, end) intervals."""
    out: list[list[int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def measure(intervals: list[tuple[int, int]]) -> int:
    return sum(e - s for s, e in union(intervals))


def intersection(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Total length of (union of a) ∩ (union of b)."""
    a, b = union(a), union(b)
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class Recorder:
    """Collects what happens in one request and turns it into the section-6 statistics."""

    def __init__(self, mode: str, prompt_tokens: int):
        self.mode = mode
        self.prompt_tokens = prompt_tokens
        self.t0 = time.monotonic_ns()
        self.first_token_ns: int | None = None
        self.draft_busy: list[tuple[int, int]] = []
        self.target_busy: list[tuple[int, int]] = []
        self.draft_forwards = 0
        self.target_forwards = 0
        self.stale = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.runs: list[int] = []
        self.run = 0
        self.by_offset: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # offset -> [acc, n]
        self.used_per_window: Counter[int] = Counter()
        self.gammas: list[int] = []
        self.fallback_reason = ""  # set when the target finished without the draft
        self.prefill_ns = 0
        # forward passes after the prefills, by tokens fed: [count, total ns]
        self.target_times: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self.draft_times: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self.queue_ns = 0  # the services' engine queue waits of this request's forward passes
        self.target_batch: list[int] = []  # engine step size of each target forward
        self.cached = {"target": 0, "draft": 0}  # prompt tokens each prefix cache held

    @staticmethod
    def now() -> int:
        return time.monotonic_ns()

    def draft_forward(self, arrived_ns: int, forward_ns: int, input_tokens: int = 1,
                      queue_ns: int = 0, cached: int = 0) -> None:
        self.queue_ns += queue_ns
        if self.draft_forwards:  # the first one prefilled the prompt
            _tally(self.draft_times, input_tokens, forward_ns)
        else:
            self.cached["draft"] = cached
        self.draft_forwards += 1
        self.draft_busy.append((arrived_ns - forward_ns, arrived_ns))

    def target_forward(self, arrived_ns: int, forward_ns: int, input_tokens: int = 1,
                       prefill: bool = False, queue_ns: int = 0, batch_rows: int = 0,
                       cached: int = 0) -> None:
        self.queue_ns += queue_ns
        if batch_rows:
            self.target_batch.append(batch_rows)
        if prefill:
            self.prefill_ns += forward_ns
            self.cached["target"] = cached
        else:
            _tally(self.target_times, input_tokens, forward_ns)
        self.target_forwards += 1
        self.target_busy.append((arrived_ns - forward_ns, arrived_ns))

    def committed(self) -> None:
        if self.first_token_ns is None:
            self.first_token_ns = self.now()

    def verified(self, window_id: int, offset: int, sent: int, accepted: int) -> None:
        """``sent`` draft tokens of a window, from ``offset`` within it, were judged together;
        the first ``accepted`` of them were kept."""
        self.draft_tokens += sent
        self.accepted_tokens += accepted
        self.used_per_window[window_id] += sent
        for i in range(sent):
            cell = self.by_offset[offset + i]
            cell[0] += i < accepted
            cell[1] += 1
        self.run += accepted
        if accepted < sent:  # a rejection ends the run of accepted tokens
            self.runs.append(self.run)
            self.run = 0

    def window(self, gamma: int) -> None:
        self.gammas.append(gamma)

    def accepted_runs(self) -> list[int]:
        """Runs of consecutively accepted draft tokens, the open one last (none without drafts)."""
        return self.runs + [self.run] if self.draft_tokens else []

    def finish(self, new_tokens: int, reason: str) -> dict:
        end = self.now()
        wall_ns = max(1, end - self.t0)
        runs = self.accepted_runs()
        both = intersection(self.draft_busy, self.target_busy)
        wall_s = wall_ns / 1e9
        offsets = range(max(self.by_offset) + 1) if self.by_offset else range(0)
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": new_tokens,
            "wall_s": wall_s,
            "tokens_per_s": new_tokens / wall_s,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "tokens_per_target_forward": new_tokens / max(1, self.target_forwards),
            "mean_accepted_tokens": sum(runs) / len(runs) if runs else 0.0,
            "per_position_acceptance": [
                self.by_offset[i][0] / self.by_offset[i][1] if self.by_offset[i][1] else math.nan
                for i in offsets],
            "gamma_history": list(self.gammas),
            "draft_length_histogram": dict(sorted(Counter(self.used_per_window.values()).items())),
            "both_busy_s": both / 1e9,
            "target_idle_s": max(0, wall_ns - measure(self.target_busy)) / 1e9,
            "draft_idle_s": max(0, wall_ns - measure(self.draft_busy)) / 1e9,
            "overlap_ratio": both / wall_ns,
            "stale_proposals": self.stale,
            "time_to_first_token_s": ((self.first_token_ns or end) - self.t0) / 1e9,
            "finish_reason": reason,
            "fell_back": bool(self.fallback_reason),
            "fallback_reason": self.fallback_reason,
            "prefill_s": self.prefill_ns / 1e9,
            "target_forward_times": _times(self.target_times),
            "draft_forward_times": _times(self.draft_times),
            "queue_wait_s": self.queue_ns / 1e9,
            "mean_target_batch": (sum(self.target_batch) / len(self.target_batch)
                                  if self.target_batch else 0.0),
            "cached_prompt_tokens": self.cached["target"],
            "draft_cached_prompt_tokens": self.cached["draft"],
        }


def _tally(cells: dict[int, list[int]], input_tokens: int, forward_ns: int) -> None:
    cell = cells[input_tokens]
    cell[0] += 1
    cell[1] += forward_ns


def _times(cells: dict[int, list[int]]) -> dict[int, dict]:
    return {m: {"count": n, "seconds": ns / 1e9} for m, (n, ns) in sorted(cells.items())}
