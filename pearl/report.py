"""Plain-text summaries: one request's statistics, and a comparison table of modes."""

import math

SUMMARY = [
    ("new_tokens", "{:d}"), ("wall_s", "{:.2f}"), ("tokens_per_s", "{:.2f}"),
    ("speedup", "{:.2f}x"), ("acceptance_rate", "{:.3f}"), ("mean_accepted_tokens", "{:.2f}"),
    ("tokens_per_target_forward", "{:.2f}"), ("target_forwards", "{:d}"),
    ("draft_forwards", "{:d}"), ("draft_tokens", "{:d}"), ("accepted_tokens", "{:d}"),
    ("both_busy_s", "{:.2f}"), ("target_idle_s", "{:.2f}"), ("draft_idle_s", "{:.2f}"),
    ("overlap_ratio", "{:.3f}"), ("stale_proposals", "{:d}"), ("time_to_first_token_s", "{:.2f}"),
    ("finish_reason", "{}"),
]


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def print_logprobs(logprobs) -> None:
    """`pearl generate --logprobs N`: each new token's id and log-probability under the target,
    and its N most likely alternatives."""
    print(f"{'#':>4s} {'token':>7s} {'logprob':>9s}  top")
    for i, lp in enumerate(logprobs):
        top = "  ".join(f"{t}:{p:.3f}" for t, p in lp.top)
        print(f"{i:4d} {lp.token_id:7d} {lp.logprob:9.4f}  {top}")


def print_stats(stats: dict) -> None:
    print(f"-- {stats.get('mode', '?')} --")
    for name, spec in SUMMARY:
        if name in stats:
            print(f"{name:28s} {fmt(stats[name], spec)}")
    if stats.get("gamma_history"):
        g = stats["gamma_history"]
        print(f"{'gamma_history':28s} {g[:16]}{' ...' if len(g) > 16 else ''}")
    if stats.get("draft_length_histogram"):
        print(f"{'draft_length_histogram':28s} {stats['draft_length_histogram']}")
    if stats.get("per_position_acceptance"):
        pos = " ".join(fmt(p, "{:.2f}") for p in stats["per_position_acceptance"])
        print(f"{'per_position_acceptance':28s} {pos}")
    if stats.get("fell_back"):
        print(f"{'fell_back':28s} target alone: {stats.get('fallback_reason', '')}")


# Columns of a comparison table: (heading, statistic, format). RATE_COLUMNS are the ones the
# demo's table (TABLE, one row per mode) and the latency bench's (benchmarks/latency_report.py)
# share.
RATE_COLUMNS = [
    ("tokens/s", "tokens_per_s", "{:.2f}"), ("speedup", "speedup", "{:.2f}x"),
    ("acceptance", "acceptance_rate", "{:.3f}"),
    ("mean accepted", "mean_accepted_tokens", "{:.2f}"),
    ("tok/target fwd", "tokens_per_target_forward", "{:.2f}"),
    ("overlap", "overlap_ratio", "{:.3f}"),
]
TABLE = [
    ("mode", "mode", "{}"), *RATE_COLUMNS,
    ("target idle s", "target_idle_s", "{:.2f}"), ("draft idle s", "draft_idle_s", "{:.2f}"),
    ("new tokens", "new_tokens", "{:d}"),
]


def table(rows: list[dict], columns=TABLE) -> str:
    """A Markdown table of ``rows`` (dicts of statistics)."""
    head = [c[0] for c in columns]
    body = [[fmt(r.get(key), spec) for _, key, spec in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])
