"""`pearl trace FILE... [--trace-id ID] --out timeline.png`: one request's timeline from the
JSON-lines spans that `pearl serve --trace-file` writes (specdec/telemetry.py), and the overlap
figures of docs/design.md section 6 computed from those spans.

The figures use the interval arithmetic of specdec/stats.py on the services' own forward passes:
the draft's from the ``draft.window`` spans (each lists its forward passes), the target's from the
``target.verify`` spans (a held verdict runs none), both cut at the end of the coordinator's
schedule, over the wall time of the ``pearl.generate`` span. The coordinator's statistics use the
same passes, timed by their arrival, so the two agree to within a network hop per pass.
"""

import json
import sys
from pathlib import Path

from specdec.stats import intersection, measure

FIGURES = ("wall_s", "both_busy_s", "target_idle_s", "draft_idle_s", "overlap_ratio")


def load_spans(paths) -> list[dict]:
    """Every span record in the files (several services may share one file or write their own)."""
    spans = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    spans.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON span record ({e})") from None
    return spans


def pick_request(spans: list[dict], trace_id: str | None = None) -> tuple[dict, list[dict]]:
    """The ``pearl.generate`` span of ``trace_id`` (the latest request when None) and all spans
    of its trace."""
    requests = [s for s in spans if s["name"] == "pearl.generate"]
    if trace_id:
        requests = [s for s in requests if s["trace_id"] == trace_id.lower()]
        if not requests:
            raise LookupError(f"no pearl.generate span with trace id {trace_id}")
    if not requests:
        raise LookupError("no pearl.generate span in the files (was the coordinator traced?)")
    req = max(requests, key=lambda s: s["end_unix_ns"])
    return req, [s for s in spans if s["trace_id"] == req["trace_id"]]


def busy_intervals(trace: list[dict], until_ns: int) -> tuple[list, list]:
    """The draft's and the target's forward passes [start, end) that ended by ``until_ns``."""
    draft, target = [], []
    for s in trace:
        a = s["attributes"]
        if s["name"] == "draft.window":
            for start, d in zip(a.get("pearl.forward_starts_unix_ns", []),
                                a.get("pearl.forward_ns", [])):
                if start + d <= until_ns:
                    draft.append((start, start + d))
        elif s["name"] == "target.verify" and a.get("pearl.input_tokens", 0):
            if s["end_unix_ns"] <= until_ns:
                target.append((s["start_unix_ns"], s["end_unix_ns"]))
    return draft, target


def figures(req: dict, trace: list[dict]) -> dict:
    """wall_s, both_busy_s, target_idle_s, draft_idle_s, overlap_ratio from the spans."""
    t0, t1 = req["start_unix_ns"], req["end_unix_ns"]
    until = req["attributes"].get("pearl.schedule_end_unix_ns", t1)
    draft, target = busy_intervals(trace, until)
    wall = max(1, t1 - t0)
    both = intersection(draft, target)
    return {
        "wall_s": wall / 1e9,
        "both_busy_s": both / 1e9,
        "target_idle_s": max(0, wall - measure(target)) / 1e9,
        "draft_idle_s": max(0, wall - measure(draft)) / 1e9,
        "overlap_ratio": both / wall,
    }


def reported(req: dict) -> dict:
    """The statistics Generate returned, as the coordinator put them on its span."""
    a = req["attributes"]
    return {k: a[f"pearl.stats.{k}"] for k in FIGURES if f"pearl.stats.{k}" in a}


FATE_COLORS = {"accepted": "#4c9f50", "cut": "#e39b2d", "stale": "#b0b0b0", "ended": "#7aa6d6"}
PHASE_COLORS = {"start": "#404040", "pre": "#3b6fb6", "post": "#7b4fb0", "held": "#9e9e9e",
                "sd": "#3b6fb6", "ar": "#3b6fb6"}


def draw(req: dict, trace: list[dict], out: str, figs: dict) -> None:
    """One lane per service: the request, the draft's forward passes grouped in windows (coloured
    by fate), the target's verifications (coloured by phase), rejections marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = req["start_unix_ns"]
    x = lambda ns: (ns - t0) / 1e9  # noqa: E731
    lanes = {"coordinator": 2, "draft": 1, "target": 0}
    fig, ax = plt.subplots(figsize=(13, 3.6), dpi=120)
    ax.broken_barh([(0, x(req["end_unix_ns"]))], (lanes["coordinator"] - 0.3, 0.6),
                   facecolors="#d9d9d9", edgecolors="#808080")
    attrs = req["attributes"]
    ttft = attrs.get("pearl.stats.time_to_first_token_s")
    if ttft is not None:
        ax.plot([ttft], [lanes["coordinator"]], marker="|", color="black", markersize=18)
        ax.annotate("first token", (ttft, lanes["coordinator"] + 0.33), fontsize=7)
    for s in sorted(trace, key=lambda s: s["start_unix_ns"]):
        a = s["attributes"]
        if s["name"] == "draft.window":
            fate = a.get("pearl.fate", "ended")
            bars = [(x(st), d / 1e9) for st, d in zip(a.get("pearl.forward_starts_unix_ns", []),
                                                      a.get("pearl.forward_ns", []))]
            if fate == "cut":  # kept tokens, the rejected one, then the wasted rest
                i = a["pearl.cut_at"]
                colors = ([FATE_COLORS["accepted"]] * i + [FATE_COLORS["cut"]]
                          + [FATE_COLORS["stale"]] * len(bars))[:len(bars)]
            else:
                colors = [FATE_COLORS[fate]] * len(bars)
            ax.broken_barh(bars, (lanes["draft"] - 0.3, 0.6), facecolors=colors,
                           edgecolors="white", linewidth=0.3)
            ax.plot([x(s["start_unix_ns"]), x(s["end_unix_ns"])],
                    [lanes["draft"] + 0.36] * 2, color=FATE_COLORS[fate], linewidth=1.5)
            if fate == "cut":
                cut = a["pearl.forward_starts_unix_ns"][min(a["pearl.cut_at"],
                                                            len(bars) - 1)]
                ax.plot([x(cut)], [lanes["draft"] + 0.36], marker="v", color="#c62828",
                        markersize=5)
            for e in s.get("events", []):
                if e["name"] == "rollback":
                    ax.axvline(x(e["time_unix_ns"]), ymin=0.36, ymax=0.62, color="#c62828",
                               linewidth=0.6, linestyle=":")
        elif s["name"] == "target.verify":
            phase = a.get("pearl.phase", "")
            color = PHASE_COLORS.get(phase, "#3b6fb6")
            if a.get("pearl.input_tokens", 0):
                ax.broken_barh([(x(s["start_unix_ns"]), (s["end_unix_ns"] - s["start_unix_ns"])
                                 / 1e9)], (lanes["target"] - 0.3, 0.6), facecolors=color,
                               edgecolors="white", linewidth=0.3)
            else:  # a held verdict: judged without a forward pass
                ax.plot([x(s["start_unix_ns"])], [lanes["target"] + 0.1], marker=".",
                        color=color, markersize=4)
            if a.get("pearl.rejected"):
                ax.plot([x(s["end_unix_ns"])], [lanes["target"] + 0.42], marker="x",
                        color="#c62828", markersize=6, markeredgewidth=1.5)
    ax.set_yticks(list(lanes.values()), [f"{k}" for k in lanes])
    ax.set_ylim(-0.6, 2.75)
    ax.set_xlim(0, x(req["end_unix_ns"]) * 1.005)
    ax.set_xlabel("seconds since the request started")
    mode = attrs.get("pearl.mode", "?")
    ax.set_title(
        f"{mode}: {attrs.get('pearl.new_tokens', '?')} tokens in {figs['wall_s']:.2f} s | "
        f"both busy {figs['both_busy_s']:.2f} s (overlap {figs['overlap_ratio']:.0%}), "
        f"target idle {figs['target_idle_s']:.2f} s, draft idle {figs['draft_idle_s']:.2f} s",
        fontsize=9)
    handles = [Patch(color=c, label=f"draft {k}") for k, c in
               zip(("accepted", "rejected", "stale", "unjudged"), FATE_COLORS.values())]
    handles += [Patch(color=PHASE_COLORS[p], label=label) for p, label in (
        ("start", "target prefill"), ("pre", "verify pre (sd, ar)"), ("post", "verify post"))]
    handles.append(plt.Line2D([], [], marker="x", color="#c62828", linestyle="",
                              label="rejection"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=8,
              fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def add_trace(sub) -> None:
    p = sub.add_parser("trace", help="timeline picture and overlap figures of a traced request")
    p.add_argument("files", nargs="+", help="JSON-lines span files (pearl serve --trace-file)")
    p.add_argument("--trace-id", help="the request's trace id (default: the latest request)")
    p.add_argument("--out", default="timeline.png", help="where to write the picture")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(fn=cmd_trace)


def cmd_trace(a) -> None:
    try:
        req, trace = pick_request(load_spans(a.files), a.trace_id)
    except (OSError, ValueError, LookupError) as e:
        sys.exit(f"pearl trace: {e}")
    figs = figures(req, trace)
    draw(req, trace, a.out, figs)
    rep = reported(req)
    if a.json:
        print(json.dumps({"trace_id": req["trace_id"], "out": str(Path(a.out)),
                          "mode": req["attributes"].get("pearl.mode"), **figs,
                          "reported": rep}))
        return
    n_draft = sum(1 for s in trace if s["name"] == "draft.window")
    n_verify = sum(1 for s in trace if s["name"] == "target.verify")
    print(f"trace {req['trace_id']} ({req['attributes'].get('pearl.mode')}): "
          f"{n_draft} draft windows, {n_verify} verifications -> {a.out}")
    print(f"{'':14s} {'from spans':>11s} {'Generate':>10s}")
    for k in FIGURES:
        r = rep.get(k)
        print(f"{k:14s} {figs[k]:11.4f} {r:10.4f}" if r is not None else
              f"{k:14s} {figs[k]:11.4f} {'-':>10s}")

