"""The load bench's texts and chart (`pearl bench load`): the phases' table, the divergences,
the goals, the Markdown table for the README and throughput and latency against concurrency."""

from __future__ import annotations

from pathlib import Path

from benchmarks.closed_loop import HTTP
from benchmarks.divergence import NEAR_TIE, divergence_text
from benchmarks.replay import replay_note
from benchmarks.services import SERVICE
from benchmarks.stats import ms


def detail(phases: dict) -> str:
    from pearl.report import table

    cols = [("contender", "contender", "{}"), ("c", "concurrency", "{}"),
            ("requests", "requests", "{}"), ("tokens", "new_tokens", "{}"),
            ("wall s", "wall_s", "{:.1f}"), ("tok/s", "tokens_per_s", "{:.2f}"),
            ("p50 lat s", "latency_p50_s", "{:.2f}"), ("p99 lat s", "latency_p99_s", "{:.2f}"),
            ("TTFT p50 s", "ttft_p50_s", "{:.2f}"), ("TTFT p99 s", "ttft_p99_s", "{:.2f}"),
            ("TPOT p50 ms", "tpot_p50_ms", "{:.0f}"), ("TPOT p99 ms", "tpot_p99_ms", "{:.0f}"),
            ("identical", "identical_share", "{:.2f}"),
            ("accept", "acceptance_rate_mean", "{:.3f}"),
            ("tgt batch", "mean_target_batch", "{:.2f}"),
            ("queue wait s", "queue_wait_mean_s", "{:.3f}")]
    rows = [{"contender": n, "concurrency": c, **s, "tpot_p50_ms": ms(s.get("tpot_p50_s")),
             "tpot_p99_ms": ms(s.get("tpot_p99_s"))} for n, by_c in phases.items()
            for c, s in by_c.items()]
    return table(rows, cols)


def markdown(phases: dict, concurrency: list[int]) -> str:
    hi = max(concurrency)
    head = (["contender"] + [f"tok/s at {c}" for c in concurrency]
            + [f"{hi} vs 1", "p50 latency s at 1", f"p50 / p99 latency s at {hi}",
               f"TTFT p50 / p99 s at {hi}", f"TPOT p50 / p99 ms at {hi}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v, s="{:.2f}": "-" if v is None else s.format(v)  # noqa: E731
    for name, by_c in phases.items():
        top, one = by_c.get(hi, {}), by_c.get(1, {})
        scale = (top["tokens_per_s"] / one["tokens_per_s"]
                 if top and one and one.get("tokens_per_s") else None)
        cells = ([f"**{name}**" if name == "pearl" else name]
                 + [f(by_c.get(c, {}).get("tokens_per_s")) for c in concurrency]
                 + [f(scale, "{:.2f}x"), f(one.get("latency_p50_s"), "{:.1f}"),
                    f"{f(top.get('latency_p50_s'), '{:.1f}')} / "
                    f"{f(top.get('latency_p99_s'), '{:.1f}')}",
                    f"{f(top.get('ttft_p50_s'))} / {f(top.get('ttft_p99_s'))}",
                    f"{f(ms(top.get('tpot_p50_s')), '{:.0f}')} / "
                    f"{f(ms(top.get('tpot_p99_s')), '{:.0f}')}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def divergences_text(records: list[dict], summary: dict) -> str:
    """Every divergence (:func:`benchmarks.load_analysis.mark_divergences`); loudly the ones
    that are not near-ties."""
    ref = summary["reference"]
    if not summary["compared"]:
        return f"\ndivergences: nothing compared (needs {ref or 'ar'} and another contender)"
    head = (f"\ndivergences from {ref}'s greedy tokens on the same prompt ("
            f"{summary['compared']} requests compared, {summary['against_alone']} with {ref} "
            f"alone at concurrency 1, the rest with {ref} at the lowest concurrency that ran "
            f"the prompt): {summary['divergences']} differ, {summary['near_ties']} near-ties "
            f"({NEAR_TIE})")
    found = [(f"{r['contender']} x{r['concurrency']} prompt {r['prompt']} new token "
              f"{r['divergence']['position']} (vs {ref} at concurrency "
              f"{r['divergence']['reference_concurrency']})", r["divergence"])
             for r in records if r.get("divergence")]
    return divergence_text(head, found, ref)


def goals_text(gs: list[dict], command: str) -> str:
    lines = [f"\ngoals of issue 12 ({command}):"]
    for g in gs:
        op = "<=" if g["at_most"] else ">="
        if g["met"] is None:
            lines.append(f"  {g['goal']}: not measured ({g['figures']})")
            continue
        if g.get("unit") == "count":
            lines.append(f"  {g['goal']}: {g['figures']} (goal: every divergence a near-tie):"
                         f" {'met' if g['met'] else 'NOT met'}")
            continue
        value = f"{100 * g['value']:+.1f}%" if "RSS" in g["goal"] else f"{g['value']:.2f}x"
        target = f"{100 * g['target']:.0f}%" if "RSS" in g["goal"] else f"{g['target']}x"
        lines.append(f"  {g['goal']}: {value} ({g['figures']}; goal {op} {target}): "
                     f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def print_report(found: dict, records: list[dict], concurrency: list[int], rss: dict | None,
                 kv: dict, command: str, replay: float | None) -> None:
    print()
    if replay is not None:
        print(f"NOTE: {replay_note(replay)}; accept = the acceptance the services measured "
              "under that choice")
    if concurrency:
        print(detail(found["phases"]))
        print(f"\n(identical: share of greedy requests whose tokens equal {found['reference']}'s "
              "on the same prompt, alone where it ran alone (HTTP: its text and token count "
              "equal theirs decoded); TTFT: time to the first token; TPOT: (end - first token) / "
              "(tokens - 1); tgt batch: mean sessions per target engine step of a request's "
              "forwards; queue wait s: mean seconds a request's forwards waited in the services' "
              "engine queues)")
        print(divergences_text(records, found["divergences"]))
        print()
        print(found["table_md"])
    if rss:
        print("\nRSS MB after the first {first} / at the end: ".format(**rss) + ", ".join(
            f"{k} {rss['after_first_mb'][k]:.0f} / {rss['at_end_mb'][k]:.0f}"
            for k in rss["at_end_mb"] if rss["at_end_mb"][k]))
    for role, d in kv.items():
        print(f"KV bytes per token, {role}: {d['bytes']} ({d['source']})")
    print(goals_text(found["goals"], command))


def chart(path: Path, phases: dict, concurrency: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_c in phases.items():
        cs = [c for c in concurrency if c in by_c]
        style = dict(marker="o", lw=2.5 if name == "pearl" else 1.5,
                     ls="-" if name in SERVICE or name in HTTP else "--")
        ax.plot(cs, [by_c[c]["tokens_per_s"] for c in cs], label=name, **style)
        ax2.plot(cs, [by_c[c]["latency_p99_s"] for c in cs], label=name, **style)
    for a, ylabel, t in ((ax, "aggregate tokens/s", "throughput"),
                         (ax2, "p99 request latency, s", "latency")):
        a.set_xscale("log", base=2)
        a.set_xticks(concurrency, [str(c) for c in concurrency])
        a.set_xlabel("concurrent requests")
        a.set_ylabel(ylabel)
        a.set_title(f"{t}: {title}", fontsize=9)
        a.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
