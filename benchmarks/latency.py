"""`pearl bench latency`: one request at a time through the services, against transformers.

ar, sd and pearl through the real services against transformers' own greedy and assisted
generation, interleaved prompt by prompt on the same models, dtype and prompts.

Hardware split (models distinct nodes on one machine): the draft service is pinned to the first
CPU, the target service to the last, one torch thread each; the coordinator is unpinned. The
in-process contenders (`hf-assisted-*`, `ar-local-*`) run in this process: `-1t` with one thread
pinned to one core (both models of hf-assisted share it), `-all` with every core and as many
threads. With `--tiny` the three services run in this process too (no pinning; for CI only).

Output: a Markdown table, the protocol overhead, the analytical ceiling (benchmarks/ceiling.py),
`results.json` (every per-prompt record and the aggregates) and `chart.png` in `--out`.

This module is the order of the steps and results.json (the flags are in benchmarks/cli.py).
Running is in benchmarks/latency_run.py (contenders, services, the interleaved runs, the checks
that need the models), reporting in benchmarks/latency_report.py (aggregates, table, overhead,
ceiling, goals, sweep, chart), the in-process contenders in benchmarks/local.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks import latency_report as report
from benchmarks.hardware import gpu_name
from benchmarks.latency_run import (
    Measured,
    Setup,
    agreement,
    compare,
    measure,
    reference_run,
    setup,
)


def run(a) -> int:
    """The latency bench of the parsed flags ``a``; the exit status."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        s = setup(a)
    except ValueError as e:
        print(f"pearl bench latency: {e}", file=sys.stderr)
        return 2
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"pearl bench latency: draft {s.draft_name}, target {s.target_name}, {s.dtype}, "
          f"{len(s.cpus)} CPUs{', ' + gpu_name() if s.gpu else ''}, greedy\n"
          f"hardware split: {s.split}", flush=True)
    m = measure(a, s, out_dir)
    ref_run = reference_run(s)
    compare(m, ref_run)  # identical tokens; the target's logit margin where greedy outputs differ
    alphas = agreement(m, ref_run)  # the ceiling's alpha
    if s.replay:  # the draft that ran is the replaying one, not the model in this process
        alphas = {k: a.replay_acceptance for k in alphas}
    result = analyse(a, s, m, ref_run, alphas)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    report.chart(out_dir / "chart.png", result["table"], result["sweep"], result["aggregates"])
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'chart.png'} "
          f"({result['elapsed_s']:.0f} s in all)")
    return 0


def analyse(a, s: Setup, m: Measured, ref_run: str | None, alphas: dict[str, float]) -> dict:
    """Aggregate the records, print every report and return what results.json holds."""
    by_run, by_set = report.aggregates(m.records, s.runs, {p["set"] for p in m.prompts})
    rows = report.summary_rows(s.contenders, by_run, m.rss_services, m.rss_self, a.tiny,
                               s.baseline)
    timing = report.timings(m.records)
    ceil = report.ceiling_report(timing, alphas, by_run, by_set, m.records, a.gamma)
    goals = report.goals_report(by_run, by_set, ceil["data"])
    sweep = report.sweep_rows(by_run) if a.sweep else None
    print()
    print(f"hardware split: {s.split}")
    print(report.render_table(rows, ref_run, s.baseline))
    print("peak RSS = VmHWM of each process (includes the model-loading peak); RSS at the end, "
          "MB: " + ", ".join(f"{k} {v:.0f}" for k, v in m.rss_now.items() if v is not None))
    print(report.overhead_text(by_run))
    print(report.assisted_text(by_run, m.records, a.gamma))
    print(ceil["text"])
    print(report.divergences_text(m.records))
    print(goals["text"])
    if sweep:
        print(report.sweep_text(sweep))
    return {
        "config": config(a, s, ref_run), "definitions": report.DEFINITIONS,
        "records": m.records, "aggregates": by_run, "aggregates_by_set": by_set, "table": rows,
        "peak_rss_mb": {"services": m.rss_services, "bench_process": m.rss_self},
        "rss_at_end_mb": m.rss_now,
        "timing": {"by_run": timing, "alpha_teacher_forced": alphas.get("all"),
                   "alpha_by_set": alphas},
        "ceiling": ceil["data"], "goals": goals["data"],
        "sweep": sweep, "elapsed_s": time.monotonic() - s.t_start,
    }


def config(a, s: Setup, ref_run: str | None) -> dict:
    return {"draft_model": s.draft_name, "target_model": s.target_name, "dtype": s.dtype,
            "prompts_per_set": a.prompts, "set": a.set, "max_new_tokens": a.max_new_tokens,
            "gamma": a.gamma, "sweep": a.sweep, "tiny": a.tiny, "cpus": s.cpus,
            "device": a.device, "gpu": gpu_name() if s.gpu else None,
            "replay_acceptance": a.replay_acceptance, "baseline": s.baseline,
            "hardware_split": s.split, "contenders": s.contenders, "reference": ref_run}
