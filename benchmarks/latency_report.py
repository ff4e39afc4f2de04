"""Reporting `pearl bench latency`: aggregates of the records benchmarks/latency_run.py produced,
the table, the protocol overhead, the hf-assisted settings, the analytical ceiling
(benchmarks/ceiling.py), the divergences, the speed goals, the gamma sweep and the chart. Pure
functions of the records; each report returns its text (and, where results.json keeps it, its
data).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.divergence import NEAR_TIE, divergence_text
from benchmarks.latency_run import BASELINE, SWEEP
from benchmarks.services import SERVICE
from benchmarks.stats import pct
from pearl.report import RATE_COLUMNS, table

DEFINITIONS = {
    "tokens_per_s": "new tokens / client-observed wall time, summed over prompts",
    "speedup": "tokens_per_s / tokens_per_s of the baseline (config.baseline: ar-local-1t on a "
               "CPU, ar-local-all where the -1t runs are skipped, as on a GPU)",
    "overhead_s": "per request, time in which neither model computes: coordinator wall_s - "
                  "busy_union, busy_union = (wall_s - target_idle_s) + (wall_s - draft_idle_s) "
                  "- both_busy_s (busy intervals as the services report their forward times); "
                  "protocol, serialization, scheduling and Python time, plus any wait for the "
                  "other model that nothing overlapped",
    "overhead_per_round_ms": "overhead_s / target_forwards (one target forward per round)",
    "overhead_share": "overhead_s / coordinator wall_s",
    "hf acceptance_rate": "(new_tokens - target forwards) / draft forwards (every target "
                          "forward of assisted generation commits the accepted drafts plus one)",
    "alpha": "teacher-forced per-token agreement of the draft's greedy token with the "
             "reference tokens",
}

# -- aggregates -----------------------------------------------------------------------------------


def aggregate(recs: list[dict]) -> dict:
    tot = lambda k: sum(r.get(k) or 0 for r in recs)  # noqa: E731
    has = lambda k: all(r.get(k) is not None for r in recs)  # noqa: E731
    wall, new = tot("wall_s"), tot("new_tokens")
    agg = {"prompts": len(recs), "new_tokens": new, "wall_s": wall,
           "tokens_per_s": new / wall if wall else 0.0,
           "target_forwards": tot("target_forwards"), "draft_forwards": tot("draft_forwards"),
           "tokens_per_target_forward": new / max(1, tot("target_forwards")),
           "identical": all(r.get("identical", True) for r in recs)}
    if has("draft_tokens") and tot("draft_tokens") > 0:
        agg["acceptance_rate"] = tot("accepted_tokens") / max(1, tot("draft_tokens"))
    if has("mean_accepted_tokens") and tot("draft_tokens") > 0:
        agg["mean_accepted_tokens"] = statistics.mean(r["mean_accepted_tokens"] for r in recs)
    if has("coordinator_wall_s"):
        cw = tot("coordinator_wall_s")
        agg.update(overlap_ratio=tot("both_busy_s") / cw,
                   target_idle_frac=tot("target_idle_s") / cw,
                   draft_idle_frac=tot("draft_idle_s") / cw,
                   overhead_share=tot("overhead_s") / cw,
                   overhead_per_round_ms_p50=pct([r["overhead_per_round_ms"] for r in recs], .5),
                   overhead_per_round_ms_p99=pct([r["overhead_per_round_ms"] for r in recs], .99),
                   overhead_share_p50=pct([r["overhead_share"] for r in recs], .5),
                   overhead_share_p99=pct([r["overhead_share"] for r in recs], .99))
    elif has("overlap_ratio"):
        agg["overlap_ratio"] = 0.0
    if any(r.get("drafted_per_target_forward") is not None for r in recs):
        agg["drafted_per_target_forward"] = tot("draft_forwards") / max(1, tot("target_forwards"))
    return agg


def aggregates(records: list[dict], runs: list[tuple[str, str]], sets) -> tuple[dict, dict]:
    """(by run over all prompts, by prompt set and run)."""
    by_run = {run: aggregate([r for r in records if r["run"] == run]) for _, run in runs}
    by_set = {s: {run: aggregate([r for r in records if r["run"] == run and r["set"] == s])
                  for _, run in runs} for s in sorted(sets)}
    return by_run, by_set


def best_run(aggs: dict, contender: str) -> str | None:
    """The run of ``contender`` in ``aggs``; for hf-assisted the faster of its two settings."""
    if contender in aggs:
        return contender
    runs = [k for k in aggs if k.startswith(contender + ":")]
    return max(runs, key=lambda k: aggs[k]["tokens_per_s"]) if runs else None


# -- the table ------------------------------------------------------------------------------------

TABLE = [
    ("contender", "contender", "{}"), *RATE_COLUMNS,
    ("target idle", "target_idle_frac", "{:.3f}"), ("draft idle", "draft_idle_frac", "{:.3f}"),
    ("peak RSS MB", "peak_rss", "{}"), ("identical", "identical_text", "{}"),
]


def summary_rows(contenders, by_run, rss_services, rss_self, tiny, baseline_run) -> list[dict]:
    svc_rss = " + ".join(f"{rss_services[r]:.0f} {r[0]}" for r in ("draft", "target", "coordinator")
                         if rss_services.get(r))
    base = by_run.get(baseline_run, {}).get("tokens_per_s")
    rows = []
    for c in contenders:
        run = best_run(by_run, c)
        agg, label = by_run[run], (c if run == c else f"{c} ({run.partition(':')[2]})")
        rss = svc_rss if (c in SERVICE and not tiny) else f"{rss_self:.0f} (bench)"
        rows.append({"contender": label, **agg,
                     "speedup": agg["tokens_per_s"] / base if base else None, "peak_rss": rss})
    return rows


def render_table(rows: list[dict], ref_run: str | None, base: str = BASELINE) -> str:
    for r in rows:
        r["identical_text"] = "-" if ref_run is None else ("yes" if r["identical"] else "NO")
    return (f"(speedup over {base}; identical: tokens equal to {ref_run}'s on every prompt; "
            "idle = fraction of coordinator wall time)\n" + table(rows, TABLE))


# -- texts beside the table -----------------------------------------------------------------------


def overhead_text(by_run: dict) -> str:
    lines = ["\nprotocol overhead (time neither model computes = wall_s - busy_union, busy_union "
             "= (wall - target_idle) + (wall - draft_idle) - both_busy; per round = / "
             "target_forwards; p50/p99 across requests):"]
    for run in SERVICE:
        g = by_run.get(run)
        if g and "overhead_share" in g:
            lines.append(f"  {run:6s} per round p50 {g['overhead_per_round_ms_p50']:.1f} ms, "
                         f"p99 {g['overhead_per_round_ms_p99']:.1f} ms; share of wall "
                         f"p50 {100 * g['overhead_share_p50']:.1f}%, "
                         f"p99 {100 * g['overhead_share_p99']:.1f}%, "
                         f"overall {100 * g['overhead_share']:.1f}%")
    return "\n".join(lines)


def assisted_text(by_run: dict, records: list[dict], window: int) -> str:
    """Both hf-assisted settings, with the forward counts that show which one took effect."""
    lines = []
    for run, g in by_run.items():
        if not run.startswith("hf-assisted"):
            continue
        cfg = next(r["assistant_config"] for r in records if r["run"] == run)
        lines.append(f"  {run:24s} {g['tokens_per_s']:.2f} tok/s; draft forwards per target "
                     f"forward {g.get('drafted_per_target_forward', 0):.2f}; assistant "
                     f"generation_config {cfg}")
    if not lines:
        return ""
    return (f"\nhf-assisted settings (the table keeps the better one per thread count; with the "
            f"fixed window each target forward follows {window} draft forwards, less at the end "
            "and when a window is cut by max_new_tokens):\n" + "\n".join(lines))


def divergences_text(records: list[dict]) -> str:
    """Where greedy outputs differ from the reference, and the target's logit margin there."""
    found = [(f"{r['run']} {r['set']}[{r['prompt']}] new token {r['first_difference']}",
              r["divergence"]) for r in records if r.get("divergence")]
    if not found:
        return ""
    return divergence_text(f"\ngreedy outputs that differ from the reference ({NEAR_TIE}):",
                           found, "reference")


# -- the analytical ceiling -----------------------------------------------------------------------


def service_times(recs: list[dict], min_count: int = 3) -> dict:
    """Mean forward times of one contender's requests, as its services measured them while they
    ran: t_draft (a draft step feeding one token), t_forward[m] (a target forward feeding m
    tokens; gaps between measured m filled linearly) and each prompt's prefill."""
    def pooled(name: str) -> dict[int, float]:
        cells: dict[int, list[float]] = {}
        for r in recs:
            for m, c in (r.get(name) or {}).items():
                cell = cells.setdefault(int(m), [0, 0.0])
                cell[0] += c["count"]
                cell[1] += c["seconds"]
        return {m: sec / n for m, (n, sec) in sorted(cells.items()) if n >= min_count}

    tf = {m: t for m, t in pooled("target_forward_times").items() if m <= 16}
    for m in range(min(tf, default=0), max(tf, default=0)):  # interior gaps
        if m not in tf:
            lo, hi = max(k for k in tf if k < m), min(k for k in tf if k > m)
            tf[m] = tf[lo] + (tf[hi] - tf[lo]) * (m - lo) / (hi - lo)
    return {"t_draft": pooled("draft_forward_times").get(1), "t_forward": dict(sorted(tf.items())),
            "prefill_s": {f"{r['set']}[{r['prompt']}]": r.get("prefill_s") or 0.0 for r in recs}}


def timings(records: list[dict]) -> dict:
    """service_times per schedule, the fixed-gamma runs of a sweep pooled with the adaptive one."""
    same = lambda r, m: r["run"] == m or r["run"].startswith(m + "-g")  # noqa: E731
    return {m: service_times([r for r in records if same(r, m)])
            for m in ("ar", "sd", "pearl") if any(same(r, m) for r in records)}


def forward_times_text(timing: dict, inputs: dict) -> list[str]:
    """One line per schedule with its measured forward times; fills ``inputs``."""
    lines = ["\nforward times as the services measured them during each schedule's requests "
             "(pearl: with the other model computing on the other core much of the time; the "
             "ceiling searches the windows whose forward times pearl measured, all of "
             f"{SWEEP[0]}..{SWEEP[-1]} with --sweep):"]
    for run, t in timing.items():
        if t["t_forward"]:
            inputs[run] = {"t_draft": t["t_draft"], "t_forward": t["t_forward"]}
            lines.append(f"  {run:6s} t_draft {1e3 * (t['t_draft'] or 0):.1f} ms; t_forward(m "
                         "tokens fed) ms: " + " ".join(f"{m}:{1e3 * x:.1f}"
                                                     for m, x in t["t_forward"].items())
                         + f"; prefill mean {1e3 * statistics.mean(t['prefill_s'].values()):.0f}"
                         " ms")
    return lines


def model_rate(run: str, t: dict | None, recs: list[dict], alpha: float, gamma: int):
    """The model of ar or sd on its own requests' forward times, after their prefills."""
    from benchmarks.ceiling import ar_rate, sd_rate, with_prefill

    if not recs or not t:
        return None
    if run == "ar" and 1 in t["t_forward"]:
        rate = ar_rate(t["t_forward"])
    elif run == "sd" and t["t_draft"] and gamma + 1 in t["t_forward"]:
        rate = sd_rate(t["t_draft"], t["t_forward"], alpha, gamma)
    else:
        return None
    return with_prefill(rate, sum(r["new_tokens"] for r in recs),
                        sum(r.get("prefill_s") or 0.0 for r in recs))


def set_ceiling(name: str, alpha: float, timing: dict, records: list[dict], gamma: int,
                pearl: dict | None) -> tuple[dict, str]:
    """The ceiling of one prompt set ("all": every prompt), the models of ar and sd beside it,
    and pearl's measured rate (``pearl``: its aggregate on that set) as a fraction of it."""
    from benchmarks.ceiling import best_gamma, ceiling, with_prefill

    td, tf = timing["pearl"]["t_draft"], timing["pearl"]["t_forward"]
    of = lambda run: [r for r in records if r["run"] == run and name in ("all", r["set"])]  # noqa
    recs = of("pearl")
    new = sum(r["new_tokens"] for r in recs)
    pre = sum(r.get("prefill_s") or 0.0 for r in recs)
    g = best_gamma(td, tf, alpha)
    decode = ceiling(td, tf, alpha, g)
    d = {"alpha": alpha, "best_gamma": g, "decode_ceiling_tokens_per_s": decode,
         "prefill_s": pre, "new_tokens": new,
         "ceiling_tokens_per_s": with_prefill(decode, new, pre)}
    for run in ("ar", "sd"):
        d[f"model_{run}_tokens_per_s"] = model_rate(run, timing.get(run), of(run), alpha, gamma)
    text = (f"  {name:9s} alpha {alpha:.3f} (teacher-forced); model ar "
            f"{d['model_ar_tokens_per_s'] or 0:.2f}, sd {d['model_sd_tokens_per_s'] or 0:.2f}, "
            f"pearl ceiling {d['ceiling_tokens_per_s']:.2f} tok/s at gamma {g} "
            f"(decode alone {decode:.2f})")
    if d["model_sd_tokens_per_s"]:
        d["ceiling_over_sd_model"] = d["ceiling_tokens_per_s"] / d["model_sd_tokens_per_s"]
        text += f"; ceiling / sd model {d['ceiling_over_sd_model']:.2f}"
    if pearl:
        d["pearl_tokens_per_s"] = pearl["tokens_per_s"]
        d["pearl_fraction_of_ceiling"] = pearl["tokens_per_s"] / d["ceiling_tokens_per_s"]
        text += (f"; pearl measured {pearl['tokens_per_s']:.2f} = "
                 f"{100 * d['pearl_fraction_of_ceiling']:.0f}% of the ceiling")
    return d, text


def ceiling_report(timing: dict, alphas: dict[str, float], by_run: dict, by_set: dict,
                   records: list[dict], gamma: int) -> dict:
    """The analytical ceiling of the pearl schedule per prompt set and overall
    (benchmarks/ceiling.py) from the forward times the services measured during the pearl
    requests themselves (the same contention, the same moment), after those requests' own
    prefill; beside the models of ar and sd on their own requests' times, and pearl's measured
    rate."""
    from benchmarks.ceiling import ceiling

    data: dict = {"alpha": alphas.get("all"), "by_set": {}, "inputs": {}}
    lines = forward_times_text(timing, data["inputs"])
    p = timing.get("pearl")
    if not alphas or not p or not p["t_draft"] or 2 not in p["t_forward"]:
        return {"text": "\n".join(lines + ["  (no reference tokens or pearl runs: no ceiling)"]),
                "data": data}
    lines.append("  ceiling = the pearl schedule with perfect overlap and no overhead on pearl's "
                 "own forward times, after its own prefills (benchmarks/ceiling.py); models of ar "
                 f"and sd (g={gamma}) likewise on theirs")
    for name in [k for k in by_set if k in alphas] + ["all"]:
        pearl = by_run.get("pearl") if name == "all" else by_set[name].get("pearl")
        data["by_set"][name], text = set_ceiling(name, alphas[name], timing, records, gamma,
                                                 pearl)
        lines.append(text)
    overall = data["by_set"]["all"]
    data.update({k: overall.get(k) for k in (
        "best_gamma", "ceiling_tokens_per_s", "model_ar_tokens_per_s", "model_sd_tokens_per_s",
        "pearl_fraction_of_ceiling")})
    td, tf = p["t_draft"], p["t_forward"]
    data["ceiling_by_gamma"] = {k: ceiling(td, tf, overall["alpha"], k)
                                for k in tf if k == 1 or k - 1 in tf}
    return {"text": "\n".join(lines), "data": data}


# -- goals, sweep, chart --------------------------------------------------------------------------

GOALS = [  # (name, numerator contender, denominator contender, lowest ratio that meets it)
    ("pearl / sd", "pearl", "sd", 1.5),
    ("pearl / hf-assisted-1t", "pearl", "hf-assisted-1t", 1.3),
    ("pearl / hf-assisted-all", "pearl", "hf-assisted-all", 1.2),
]
MAX_OVERHEAD_SHARE = 0.03  # protocol overhead, share of wall time
MIN_FRACTION_OF_CEILING = 0.85


def goals_report(by_run: dict, by_set: dict, ceil: dict) -> dict:
    """The benchmark issue's speed goals, on HumanEval when it ran (else on all prompts)."""
    name = "humaneval" if "humaneval" in by_set else "all"
    aggs = by_set.get(name, by_run)
    lines = [f"\nspeed goals ({name} prompts; measured side by side in this run):"]
    data = {"set": name}
    for label, num, den, goal in GOALS:
        a, b = best_run(aggs, num), best_run(aggs, den)
        if not a or not b:
            continue
        ratio = aggs[a]["tokens_per_s"] / aggs[b]["tokens_per_s"]
        data[label] = {"value": ratio, "goal": goal, "met": ratio >= goal}
        lines.append(f"  {label:24s} {ratio:5.2f}  (goal >= {goal}): {met(ratio >= goal)}")
    pearl = aggs.get("pearl")
    if pearl and "overhead_share" in pearl:
        v, goal = pearl["overhead_share"], MAX_OVERHEAD_SHARE
        data["protocol overhead"] = {"value": v, "goal": goal, "met": v < goal}
        lines.append(f"  {'protocol overhead':24s} {100 * v:4.1f}%  (goal < {100 * goal:.0f}% of "
                     f"wall time): {met(v < goal)}")
    c = ceil.get("by_set", {}).get(name, {})
    if c.get("pearl_fraction_of_ceiling") is not None:
        v, goal = c["pearl_fraction_of_ceiling"], MIN_FRACTION_OF_CEILING
        data["fraction of ceiling"] = {"value": v, "goal": goal, "met": v >= goal}
        lines.append(f"  {'pearl / ceiling':24s} {v:5.2f}  (goal >= {goal}): {met(v >= goal)}")
    if c.get("ceiling_over_sd_model"):
        lines.append(f"  (on these timings the pearl schedule's ceiling is "
                     f"{c['ceiling_over_sd_model']:.2f}x the sd model: the most pearl / sd can be "
                     "here)")
    return {"text": "\n".join(lines), "data": data}


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def sweep_rows(by_run: dict) -> dict[str, dict[int, float]]:
    """tokens/s of sd and pearl at each fixed gamma of the sweep."""
    return {m: {g: by_run[f"{m}-g{g}"]["tokens_per_s"] for g in SWEEP} for m in ("sd", "pearl")}


def sweep_text(rows: dict[str, dict[int, float]]) -> str:
    lines = ["\ngamma sweep (tokens/s; fixed gamma; pearl adaptive is the `pearl` row; sd has "
             "no adaptive window in the coordinator):",
             "| mode | " + " | ".join(f"g={g}" for g in SWEEP) + " |",
             "|---|" + "---|" * len(SWEEP)]
    lines += [f"| {m} | " + " | ".join(f"{d[g]:.2f}" for g in SWEEP) + " |"
              for m, d in rows.items()]
    return "\n".join(lines)


def chart(path: Path, rows: list[dict], sweep: dict | None, by_run: dict) -> None:
    import matplotlib.pyplot as plt

    n = 2 if sweep else 1
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [r["contender"] for r in rows]
    vals = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(range(len(names)), vals, color=["tab:blue" if r["contender"] in SERVICE
                                                  else "tab:gray" for r in rows])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title("greedy decoding throughput")
    if sweep:
        ax2 = axes[0][1]
        for m, d in sweep.items():
            ax2.plot(list(d), list(d.values()), marker="o", label=f"{m} (fixed gamma)")
        if "pearl" in by_run:
            ax2.axhline(by_run["pearl"]["tokens_per_s"], ls="--", color="tab:red",
                        label="pearl (adaptive)")
        ax2.set_xlabel("gamma")
        ax2.set_ylabel("tokens/s")
        ax2.set_title("gamma sweep")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
