"""The open-loop serving bench's figures (`pearl bench serve`, benchmarks/serve.py): one record
per request, each phase's (contender x request rate) latencies, throughput and goodput, the
tables and the chart.

Definitions (times from the phase's start, when its first request arrives):

- TTFT: first token - sent; TPOT: (end - first token) / (new tokens - 1), None for one token;
  e2e latency: end - sent. A two-turn conversation's turn 2 is sent when turn 1 ends.
- throughput: the phase's new tokens / its wall time (first arrival to last end); requests/s:
  requests completed without error / wall time.
- goodput: requests/s that met both SLOs: TTFT <= ``ttft_slo_s`` and TPOT <= ``tpot_slo_s``
  (a one-token answer has no TPOT and meets that SLO); a failed request meets neither.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.load_analysis import DRAFTING
from benchmarks.stats import ms, pct

SERVICE_STATS = ("acceptance_rate", "mean_target_batch", "queue_wait_s", "prefill_s",
                 "finish_reason", "fell_back", "prompt_tokens")


@dataclass
class Turn:
    """One request as its sender saw it: seconds from the phase start when it was sent, when
    its first token came and when it ended; its new token ids and text; the service's
    GenerateStats as a dict (empty for a contender without services); the error, if it failed."""

    sent: float
    first: float | None
    end: float
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: dict = field(default_factory=dict)
    error: str | None = None


def record(contender: str, rate: float, arrival, turn: int, arrived: float, t: Turn) -> dict:
    """One request's record: ``arrival`` the conversation's, ``turn`` 1 or 2, ``arrived`` when
    this turn arrived (turn 2: when turn 1 ended). ``cached_prompt_tokens`` is 0 where the
    services do not report it."""
    n = len(t.ids)
    return {"contender": contender, "rate": rate, "request": arrival.index, "kind": arrival.kind,
            "turn": turn, "arrival_s": arrived, "sent_s": t.sent, "first_s": t.first,
            "end_s": t.end, "new_tokens": n, "token_ids": t.ids, "text": t.text,
            "ttft_s": None if t.first is None else t.first - t.sent,
            "tpot_s": None if t.first is None or n < 2 else (t.end - t.first) / (n - 1),
            "latency_s": t.end - t.sent, "error": t.error,
            "cached_prompt_tokens": int(t.stats.get("cached_prompt_tokens", 0) or 0),
            **{k: t.stats.get(k) for k in SERVICE_STATS}}


def met(r: dict, ttft_slo: float, tpot_slo: float) -> bool:
    """Whether a request met both SLOs."""
    if r["error"] or r["ttft_s"] is None:
        return False
    return r["ttft_s"] <= ttft_slo and (r["tpot_s"] is None or r["tpot_s"] <= tpot_slo)


def mean_of(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def summarize(recs: list[dict], ttft_slo: float, tpot_slo: float) -> dict:
    """One phase (contender x request rate)."""
    ok = [r for r in recs if not r["error"]]
    wall = max(r["end_s"] for r in recs)
    arrivals = sorted(r["arrival_s"] for r in recs if r["turn"] == 1)
    s = {"requests": len(recs), "errors": len(recs) - len(ok), "wall_s": wall,
         "offered_rps": (len(arrivals) - 1) / arrivals[-1] if len(arrivals) > 1 and arrivals[-1]
         else None,
         "new_tokens": sum(r["new_tokens"] for r in ok),
         "slo_met": sum(met(r, ttft_slo, tpot_slo) for r in recs)}
    per_s = (lambda v: v / wall if wall > 0 else 0.0)  # noqa: E731
    s.update(tokens_per_s=per_s(s["new_tokens"]), requests_per_s=per_s(len(ok)),
             goodput_rps=per_s(s["slo_met"]), slo_met_share=s["slo_met"] / len(recs))
    for key in ("ttft", "tpot", "latency"):
        vals = [r[f"{key}_s"] for r in ok if r[f"{key}_s"] is not None]
        s[f"{key}_p50_s"], s[f"{key}_p99_s"] = pct(vals, .5), pct(vals, .99)
    s["max_send_lag_s"] = max((r["sent_s"] - r["arrival_s"] for r in recs), default=None)
    for key in ("cached_prompt_tokens", "prompt_tokens", "acceptance_rate", "mean_target_batch",
                "queue_wait_s"):
        s[f"{key}_mean"] = mean_of(ok, key)
    if recs[0]["contender"] not in DRAFTING:  # ar's 0 says nothing
        s["acceptance_rate_mean"] = None
    s["ttft_p50_by_kind_s"] = {
        k: pct([r["ttft_s"] for r in ok if r["kind"] == k and r["ttft_s"] is not None], .5)
        for k in sorted({r["kind"] for r in ok})}
    return s


def phases(records: list[dict], contenders: list[str], rates: list[float], ttft_slo: float,
           tpot_slo: float) -> dict[str, dict[float, dict]]:
    out: dict[str, dict[float, dict]] = {}
    for name in contenders:
        for rate in rates:
            recs = [r for r in records if r["contender"] == name and r["rate"] == rate]
            if recs:
                out.setdefault(name, {})[rate] = summarize(recs, ttft_slo, tpot_slo)
    return out


def detail(found: dict[str, dict[float, dict]]) -> str:
    """The printed table: every phase."""
    from pearl.report import table

    cols = [("contender", "contender", "{}"), ("req/s in", "rate", "{:g}"),
            ("reqs", "requests", "{}"), ("err", "errors", "{}"), ("wall s", "wall_s", "{:.0f}"),
            ("TTFT p50 s", "ttft_p50_s", "{:.2f}"), ("TTFT p99 s", "ttft_p99_s", "{:.2f}"),
            ("TPOT p50 ms", "tpot_p50_ms", "{:.0f}"), ("TPOT p99 ms", "tpot_p99_ms", "{:.0f}"),
            ("e2e p50 s", "latency_p50_s", "{:.1f}"), ("e2e p99 s", "latency_p99_s", "{:.1f}"),
            ("tok/s", "tokens_per_s", "{:.2f}"), ("req/s done", "requests_per_s", "{:.3f}"),
            ("goodput req/s", "goodput_rps", "{:.3f}"), ("SLO met", "slo_met_share", "{:.2f}"),
            ("cached tok", "cached_prompt_tokens_mean", "{:.0f}"),
            ("accept", "acceptance_rate_mean", "{:.3f}"),
            ("tgt batch", "mean_target_batch_mean", "{:.2f}")]
    rows = [{"contender": n, "rate": rate, **s, "tpot_p50_ms": ms(s["tpot_p50_s"]),
             "tpot_p99_ms": ms(s["tpot_p99_s"])}
            for n, by_rate in found.items() for rate, s in by_rate.items()]
    return table(rows, cols)


def markdown(found: dict[str, dict[float, dict]], ttft_slo: float, tpot_slo: float) -> str:
    """The README's table: per contender and rate, p50 / p99 and the rates."""
    f = lambda v, spec="{:.2f}": "-" if v is None else spec.format(v)  # noqa: E731
    head = ["contender", "req/s offered", "TTFT p50 / p99 s", "TPOT p50 / p99 ms",
            "e2e p50 / p99 s", "tok/s", "req/s done",
            f"goodput req/s (TTFT <= {ttft_slo:g} s, TPOT <= {ms(tpot_slo):g} ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_rate in found.items():
        for rate, s in by_rate.items():
            cells = [f"**{name}**" if name == "pearl" else name, f"{rate:g}",
                     f"{f(s['ttft_p50_s'])} / {f(s['ttft_p99_s'])}",
                     f"{f(ms(s['tpot_p50_s']), '{:.0f}')} / {f(ms(s['tpot_p99_s']), '{:.0f}')}",
                     f"{f(s['latency_p50_s'], '{:.1f}')} / {f(s['latency_p99_s'], '{:.1f}')}",
                     f(s["tokens_per_s"]), f(s["requests_per_s"], "{:.3f}"),
                     f(s["goodput_rps"], "{:.3f}")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(path: Path, found: dict[str, dict[float, dict]], title: str) -> None:
    """TTFT p50, TPOT p50 and goodput against the request rate, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("ttft_p50_s", "TTFT p50, s", 1.0), ("tpot_p50_s", "TPOT p50, ms", 1000.0),
              ("goodput_rps", "goodput, requests/s", 1.0))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, by_rate in found.items():
        rates = sorted(by_rate)
        style = dict(marker="o", lw=2.5 if name == "pearl" else 1.5,
                     ls="--" if name.startswith("hf-") else "-")
        for ax, (key, _, scale) in zip(axes, panels):
            pts = [(r, by_rate[r][key]) for r in rates if by_rate[r][key] is not None]
            ax.plot([r for r, _ in pts], [v * scale for _, v in pts], label=name, **style)
    for ax, (_, label, _) in zip(axes, panels):
        ax.set_xlabel("request rate offered, requests/s")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(',')[0]}: {title}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
