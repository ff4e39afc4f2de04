"""`pearl bench`: ar, sd and pearl through the real services against transformers' own greedy and
assisted generation, interleaved prompt by prompt on the same models, dtype and prompts.

Hardware split (models distinct nodes on one machine): the draft service is pinned to the first
CPU, the target service to the last, one torch thread each; the coordinator is unpinned. The
in-process contenders (`hf-assisted-*`, `ar-local-*`) run in this process: `-1t` with one thread
pinned to one core (both models of hf-assisted share it), `-all` with every core and as many
threads. With `--tiny` the three services run in this process too (no pinning; for CI only).

Output: a Markdown table, the protocol overhead, the analytical ceiling (pearl/ceiling.py),
`results.json` (every per-prompt record and the aggregates) and `chart.png` in `--out`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from specdec.defaults import (
    DEFAULT_DTYPE,
    DEFAULT_GAMMA_MAX,
    DEFAULT_MODELS,
    DEFAULT_NEW_TOKENS,
    DEFAULT_PAIR_GAMMA,
    DTYPES,
)

SERVICE = ("ar", "sd", "pearl", "hidden-transfer")
LOCAL = ("hf-assisted-1t", "hf-assisted-all", "ar-local-1t", "ar-local-all")
CONTENDERS = SERVICE + LOCAL
BASELINE = "ar-local-1t"
SWEEP = range(1, DEFAULT_GAMMA_MAX + 1)

PROSE = [
    "The history of the printing press begins in the fifteenth century, when",
    "Rivers shape the land in slow and patient ways. Over thousands of years",
    "Dear neighbours, we are writing to let you know that the community garden",
    "The old lighthouse keeper climbed the stairs every evening, and on the night",
    "Sleep is one of the most important things a person can do for their health, because",
    "In the small town where I grew up, the bakery on the corner was",
    "Photosynthesis is the process by which plants turn sunlight into energy. It",
    "The meeting had been going on for three hours when someone finally asked",
    "Travelling by train across Europe offers a different view of the continent:",
    "Bees communicate with each other through a remarkable dance that",
]


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark ar/sd/pearl against transformers' generation")
    p.add_argument("--draft-model", default=DEFAULT_MODELS["draft"])
    p.add_argument("--target-model", default=DEFAULT_MODELS["target"])
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES)
    p.add_argument("--prompts", type=int, default=8, help="prompts per set")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    p.add_argument("--set", default="both", choices=["humaneval", "prose", "both"])
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma list of {','.join(CONTENDERS)}")
    p.add_argument("--gamma", type=int, default=DEFAULT_PAIR_GAMMA,
                   help="sd's fixed window; also hf-assisted's fixed window")
    p.add_argument("--sweep", action="store_true",
                   help=f"also sd and pearl with fixed gamma {SWEEP[0]}..{SWEEP[-1]} (pearl adaptive "
                        "is `pearl`)")
    p.add_argument("--out", default="bench-out", help="folder for results.json and chart.png")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random models built in code, services in this process (CI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: every service and the in-process contenders on the one GPU "
                        "(the -1t contenders are CPU-only and skipped)")
    p.add_argument("--replay-acceptance", type=float, default=None,
                   help="benchmarking draft (models with random weights, e.g. random:qwen2.5-7b):"
                        " the draft proposes the target's own greedy token with this probability "
                        "(draft_service/replay.py); times the schedule, not a real pair")
    p.set_defaults(fn=cmd_bench)


def cmd_bench(a) -> None:
    sys.exit(bench(a))


# -- prompts and runs -----------------------------------------------------------------------------


def load_prompts(which: str, n: int, tokenizer, tiny: bool) -> list[dict]:
    from pearl.demo import humaneval_prompt

    out = []
    for s in (("humaneval", "prose") if which == "both" else (which,)):
        for i in range(n):
            text = humaneval_prompt(i) if s == "humaneval" else PROSE[i % len(PROSE)]
            if tiny:  # a character-level tokenizer: keep prompts short
                text = text[-120:]
            out.append({"set": s, "index": i, "text": text, "ids": tokenizer.encode(text)})
    return out


def expand(contenders: list[str], sweep: bool) -> list[tuple[str, str]]:
    """(contender, run) pairs: hf-assisted runs twice (default and fixed-window settings)."""
    runs = []
    for c in contenders:
        if c.startswith("hf-assisted"):
            runs += [(c, f"{c}:default"), (c, f"{c}:fixed")]
        else:
            runs.append((c, c))
    if sweep:
        runs += [(f"{m}-g{g}", f"{m}-g{g}") for m in ("sd", "pearl") for g in SWEEP]
    return runs


def untrained(loaded):
    """Copy-forward transfer layers for --tiny (a harness check: the mode runs, drafts poorly)."""
    from target_service.transfer import Transfer, TransferLayers

    cfg = loaded.model.config
    layers = TransferLayers(cfg.hidden_size, cfg.num_hidden_layers // 2, 3, 8)
    return Transfer(layers, loaded.name)


def service_run(client, run: str, ids: list[int], m: int, gamma: int) -> dict:
    mode, _, g = run.partition("-g")
    g = int(g) if g else (gamma if mode == "sd" else 0)
    t = time.perf_counter()
    res = client.complete(ids, mode=mode, max_new_tokens=m, gamma=g)
    wall = time.perf_counter() - t
    s = res.stats
    cw = s["wall_s"]
    busy = (cw - s["target_idle_s"]) + (cw - s["draft_idle_s"]) - s["both_busy_s"]
    overhead = max(0.0, cw - busy)
    rounds = max(1, s["target_forwards"])
    return {
        "token_ids": res.token_ids, "new_tokens": len(res.token_ids), "wall_s": wall,
        "coordinator_wall_s": cw, "gamma": g or None,
        **{k: s.get(k) for k in (
            "acceptance_rate", "mean_accepted_tokens", "target_forwards", "draft_forwards",
            "draft_tokens", "accepted_tokens", "both_busy_s", "target_idle_s", "draft_idle_s",
            "overlap_ratio", "gamma_history", "draft_length_histogram", "finish_reason",
            "prefill_s", "target_forward_times", "draft_forward_times",
            "per_position_acceptance")},
        "overhead_s": overhead, "overhead_per_round_ms": 1e3 * overhead / rounds,
        "overhead_share": overhead / cw if cw else 0.0,
    }


def local_run(local, run: str, ids: list[int], m: int) -> dict:
    name, _, setting = run.partition(":")
    threads = "1t" if name.endswith("-1t") else "all"
    r = local.run(ids, m, threads, setting or None)
    rec = {"token_ids": r.token_ids, "new_tokens": len(r.token_ids), "wall_s": r.wall_s,
           "target_forwards": r.target_forwards, "draft_forwards": r.draft_forwards, **r.extra}
    if setting:  # each target forward commits the accepted drafts + one token of its own
        accepted = max(0, rec["new_tokens"] - r.target_forwards)
        rec.update(accepted_tokens=accepted, draft_tokens=r.draft_forwards,
                   acceptance_rate=accepted / r.draft_forwards if r.draft_forwards else 0.0,
                   drafted_per_target_forward=r.draft_forwards / max(1, r.target_forwards),
                   overlap_ratio=0.0)
    return rec


# -- aggregation ----------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def aggregate(recs: list[dict]) -> dict:
    tot = lambda k: sum(r.get(k) or 0 for r in recs)
    has = lambda k: all(r.get(k) is not None for r in recs)
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


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- memory ---------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), or its current RSS where that is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


# -- the run --------------------------------------------------------------------------------------


def bench(a) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from tqdm import tqdm

    from pearl.bench_local import ALL_CPUS, Local, load_pair
    from pearl.cluster import Cluster
    from pearl.client import Client
    from pearl.procs import running

    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        print(f"pearl bench: unknown contenders {unknown}; choose from {','.join(CONTENDERS)}",
              file=sys.stderr)
        return 2
    gpu = a.device == "cuda"
    if gpu:  # one thread or all cores means nothing to a GPU run
        contenders = [c for c in contenders if not c.endswith("-1t")]
    base = baseline(contenders)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    dcpu, tcpu = ALL_CPUS[0], ALL_CPUS[-1]
    use_services = any(c in SERVICE for c in contenders) or a.sweep
    draft_name = "tiny-draft (noisy copy of tiny-target)" if a.tiny else a.draft_model
    target_name = "tiny-target (random Qwen2, 2 layers)" if a.tiny else a.target_model
    dtype = "float32" if a.tiny else a.dtype
    if a.tiny:
        split = ("--tiny: all three services and the local contenders in this process, no "
                 "pinning (a harness check, not a measurement)")
    elif gpu:
        split = ("draft, target and coordinator services as separate processes sharing the one "
                 "GPU; hf-assisted-all / ar-local-all in the bench process on the same GPU")
    else:
        split = (f"draft service: CPU {dcpu}, 1 thread; target service: CPU {tcpu}, 1 thread; "
                 f"coordinator: unpinned; hf-assisted-1t / ar-local-1t: CPU {tcpu}, 1 thread "
                 f"(both models of hf-assisted on it); hf-assisted-all / ar-local-all: CPUs "
                 f"{','.join(map(str, ALL_CPUS))}, {len(ALL_CPUS)} threads")
    replay = a.replay_acceptance is not None
    if replay:
        split += (f"; the draft replays the target's greedy tokens with probability "
                  f"{a.replay_acceptance} (draft_service/replay.py: timing of the schedule and "
                  "the protocol, not real-model acceptance)")
    print(f"pearl bench: draft {draft_name}, target {target_name}, {dtype}, "
          f"{len(ALL_CPUS)} CPUs{', ' + gpu_name() if gpu else ''}, greedy\n"
          f"hardware split: {split}", flush=True)

    rss_services: dict[str, float | None] = {}
    with running() as svcs:
        cluster = None

        def start_models(extra_draft: list[str]) -> None:
            # one torch thread each: on a GPU too, where more only spin against the other
            # processes' launch threads
            common = ["--device", a.device, "--dtype", a.dtype, "--threads", "1"]
            svcs.start("draft", ["--model", a.draft_model, *common, *extra_draft],
                       cpus=None if gpu else str(dcpu))
            svcs.start("target", ["--model", a.target_model, *common],
                       cpus=None if gpu else str(tcpu))

        services_out = use_services and not a.tiny
        if services_out and not replay:  # load in parallel with the in-process pair
            start_models([])
        draft, target = load_pair(a.draft_model, a.target_model, a.dtype, a.tiny, a.device)
        local = Local(draft, target, a.gamma)
        prompts = load_prompts(a.set, a.prompts, target.tokenizer, a.tiny)
        if services_out and replay:  # the draft needs the target's continuations first
            path = write_references(local, prompts, a.max_new_tokens, out_dir / "replay.jsonl")
            start_models(["--replay", str(path), "--replay-acceptance",
                          str(a.replay_acceptance)])
        address = None
        if use_services:
            if a.tiny:
                cluster = Cluster(draft, target, a.gamma, target_kw={"transfer": untrained(target)})
                address = cluster.address
            else:
                d, t = svcs.wait("draft"), svcs.wait("target")
                svcs.start("coordinator", ["--draft", d, "--target", t, "--gamma", str(a.gamma)])
                address = svcs.wait("coordinator", 120)
        print(f"ready in {time.monotonic() - t_start:.0f} s", flush=True)
        runs = expand(contenders, a.sweep)
        client = Client(address) if address else None

        def one(run: str, ids: list[int], m: int) -> dict:
            if run.split(":")[0] in LOCAL:
                return local_run(local, run, ids, m)
            return service_run(client, run, ids, m, a.gamma)

        try:
            # warm-up, not recorded: first-call costs; on a GPU a whole request, since every new
            # shape (window length, cache length) costs a kernel choice the first time
            warm = a.max_new_tokens if gpu else min(4, a.max_new_tokens)
            for _, run in runs:
                one(run, prompts[0]["ids"], warm)
            records = []
            bar = tqdm(total=len(prompts) * len(runs), desc="bench", unit="run", file=sys.stderr)
            for pi, p in enumerate(prompts):
                k = pi % len(runs)  # rotate the order so no contender always goes first
                for contender, run in runs[k:] + runs[:k]:
                    bar.set_postfix_str(f"{p['set']}[{p['index']}] {run}")
                    rec = one(run, p["ids"], a.max_new_tokens)
                    rec.update(contender=contender, run=run, set=p["set"], prompt=p["index"],
                               prompt_tokens=len(p["ids"]))
                    rec["tokens_per_s"] = rec["new_tokens"] / rec["wall_s"]
                    records.append(rec)
                    bar.update()
            bar.close()
        finally:
            if client:
                client.close()
            if cluster:
                cluster.close()
        rss_now = {}
        for role, svc in svcs.all.items():
            rss_services[role] = peak_rss_mb(svc.proc.pid)
            rss_now[role] = rss_mb(svc.proc.pid)
    rss_self = peak_rss_mb(os.getpid())
    rss_now["bench"] = rss_mb(os.getpid())

    # identical tokens, against ar-local-1t (or ar when it did not run)
    ref_run = base if base in contenders else ("ar" if "ar" in contenders else None)
    ref = {(r["set"], r["prompt"]): r["token_ids"] for r in records if r["run"] == ref_run}
    for r in records:
        same = None if ref_run is None else r["token_ids"] == ref[(r["set"], r["prompt"])]
        r["identical"] = same
        r["first_difference"] = (None if ref_run is None else
                                 first_difference(r["token_ids"], ref[(r["set"], r["prompt"])]))

    # greedy outputs that differ from the reference: the target's logit margin there
    prompt_ids = {(p["set"], p["index"]): p["ids"] for p in prompts}
    for r in records:
        d, key = r["first_difference"], (r["set"], r["prompt"])
        if d is not None and d < min(len(r["token_ids"]), len(ref[key])):
            r["divergence"] = local.margin(prompt_ids[key], r["token_ids"][:d], ref[key][d],
                                           r["token_ids"][d])

    # per-prompt agreement of the draft with the reference tokens (the ceiling's alpha)
    agreement: dict[str, list[int]] = {}
    for p in prompts:
        if ref_run is None:
            break
        x, n = local.agreement(p["ids"], ref[(p["set"], p["index"])])
        for key in (p["set"], "all"):
            agreement.setdefault(key, [0, 0])
            agreement[key][0] += x
            agreement[key][1] += n
    alphas = {k: x / n for k, (x, n) in agreement.items() if n}
    if replay:  # the draft that ran is the replaying one, not the model in this process
        alphas = {k: a.replay_acceptance for k in alphas}
    alpha = alphas.get("all")

    by_run = {}
    for _, run in runs:
        by_run[run] = aggregate([r for r in records if r["run"] == run])
    by_set = {s: {run: aggregate([r for r in records if r["run"] == run and r["set"] == s])
                  for _, run in runs} for s in sorted({p["set"] for p in prompts})}
    rows = summary_rows(contenders, by_run, rss_services, rss_self, a.tiny, base)
    # forward times per schedule, the fixed-gamma runs of a sweep pooled with the adaptive one
    same = lambda r, m: r["run"] == m or r["run"].startswith(m + "-g")  # noqa: E731
    timing = {m: service_times([r for r in records if same(r, m)])
              for m in ("ar", "sd", "pearl") if any(same(r, m) for r in records)}
    ceil = ceiling_report(timing, alphas, by_run, by_set, records, a.gamma)

    print()
    print(f"hardware split: {split}")
    print(render_table(rows, ref_run, base))
    print("peak RSS = VmHWM of each process (includes the model-loading peak); RSS at the end, "
          "MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss_now.items() if v is not None))
    print(overhead_text(by_run))
    print(assisted_text(by_run, records, a.gamma))
    print(ceil["text"])
    print(divergence_text(records))
    goals = goals_report(by_run, by_set, ceil["data"])
    print(goals["text"])
    sweep_rows = None
    if a.sweep:
        sweep_rows = {m: {g: by_run[f"{m}-g{g}"]["tokens_per_s"] for g in SWEEP}
                      for m in ("sd", "pearl")}
        print("\ngamma sweep (tokens/s; fixed gamma; pearl adaptive is the `pearl` row; sd has "
              "no adaptive window in the coordinator):")
        print("| mode | " + " | ".join(f"g={g}" for g in SWEEP) + " |")
        print("|---|" + "---|" * len(SWEEP))
        for m, d in sweep_rows.items():
            print(f"| {m} | " + " | ".join(f"{d[g]:.2f}" for g in SWEEP) + " |")
    elapsed = time.monotonic() - t_start
    result = {
        "config": {"draft_model": draft_name, "target_model": target_name, "dtype": dtype,
                   "prompts_per_set": a.prompts, "set": a.set, "max_new_tokens": a.max_new_tokens,
                   "gamma": a.gamma, "sweep": a.sweep, "tiny": a.tiny, "cpus": ALL_CPUS,
                   "device": a.device, "gpu": gpu_name() if gpu else None,
                   "replay_acceptance": a.replay_acceptance, "baseline": base,
                   "hardware_split": split, "contenders": contenders, "reference": ref_run},
        "definitions": DEFINITIONS,
        "records": records, "aggregates": by_run, "aggregates_by_set": by_set, "table": rows,
        "peak_rss_mb": {"services": rss_services, "bench_process": rss_self},
        "rss_at_end_mb": rss_now,
        "timing": {"by_run": timing, "alpha_teacher_forced": alpha, "alpha_by_set": alphas},
        "ceiling": ceil["data"], "goals": goals["data"],
        "sweep": sweep_rows, "elapsed_s": elapsed,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    chart(out_dir / "chart.png", rows, sweep_rows, by_run)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'chart.png'} "
          f"({elapsed:.0f} s in all)")
    return 0


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


def baseline(contenders: list[str]) -> str:
    """What speedups divide by: plain generation of the target with one thread (CPU), or with
    the whole machine where that is all that ran (GPU)."""
    return next((c for c in ("ar-local-1t", "ar-local-all", "ar") if c in contenders), BASELINE)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def write_references(local, prompts: list[dict], new_tokens: int, path: Path) -> Path:
    """The target's own greedy continuation of every prompt (in this process), one JSON list of
    prompt + continuation per line: what a replaying draft proposes (draft_service/replay.py)."""
    with path.open("w") as f:
        for p in prompts:
            r = local.run(p["ids"], new_tokens + 16, "all")
            f.write(json.dumps(p["ids"] + r.token_ids) + "\n")
    return path


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


TABLE = [
    ("contender", "contender", "{}"), ("tokens/s", "tokens_per_s", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}x"), ("acceptance", "acceptance_rate", "{:.3f}"),
    ("mean accepted", "mean_accepted_tokens", "{:.2f}"),
    ("tok/target fwd", "tokens_per_target_forward", "{:.2f}"),
    ("overlap", "overlap_ratio", "{:.3f}"), ("target idle", "target_idle_frac", "{:.3f}"),
    ("draft idle", "draft_idle_frac", "{:.3f}"), ("peak RSS MB", "peak_rss", "{}"),
    ("identical", "identical_text", "{}"),
]


def render_table(rows: list[dict], ref_run: str | None, base: str = BASELINE) -> str:
    from pearl.report import table

    for r in rows:
        r["identical_text"] = "-" if ref_run is None else ("yes" if r["identical"] else "NO")
    return (f"(speedup over {base}; identical: tokens equal to {ref_run}'s on every prompt; "
            "idle = fraction of coordinator wall time)\n" + table(rows, TABLE))


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


def ceiling_report(timing: dict, alphas: dict[str, float], by_run: dict, by_set: dict,
                   records: list[dict], gamma: int) -> dict:
    """The analytical ceiling of the pearl schedule per prompt set and overall (pearl/ceiling.py)
    from the forward times the services measured during the pearl requests themselves (the
    same contention, the same moment), after those requests' own prefill; beside the models of
    ar and sd on their own requests' times, and pearl's measured rate."""
    from pearl.ceiling import ar_rate, best_gamma, ceiling, sd_rate, with_prefill

    data: dict = {"alpha": alphas.get("all"), "by_set": {}, "inputs": {}}
    lines = ["\nforward times as the services measured them during each schedule's requests "
             "(pearl: with the other model computing on the other core much of the time; the "
             "ceiling searches the windows whose forward times pearl measured, all of "
             f"{SWEEP[0]}..{SWEEP[-1]} with --sweep):"]
    for run, t in timing.items():
        if t["t_forward"]:
            data["inputs"][run] = {"t_draft": t["t_draft"], "t_forward": t["t_forward"]}
            lines.append(f"  {run:6s} t_draft {1e3 * (t['t_draft'] or 0):.1f} ms; t_forward(m "
                         "tokens fed) ms: " + " ".join(f"{m}:{1e3 * x:.1f}"
                                                     for m, x in t["t_forward"].items())
                         + f"; prefill mean {1e3 * statistics.mean(t['prefill_s'].values()):.0f}"
                         " ms")
    p = timing.get("pearl")
    if not alphas or not p or not p["t_draft"] or 2 not in p["t_forward"]:
        return {"text": "\n".join(lines + ["  (no reference tokens or pearl runs: no ceiling)"]),
                "data": data}
    td, tf = p["t_draft"], p["t_forward"]
    lines.append("  ceiling = the pearl schedule with perfect overlap and no overhead on pearl's "
                 "own forward times, after its own prefills (pearl/ceiling.py); models of ar and "
                 f"sd (g={gamma}) likewise on theirs")
    for name in [k for k in by_set if k in alphas] + ["all"]:
        alpha = alphas[name]
        in_set = lambda r: name in ("all", r["set"])  # noqa: E731
        recs = [r for r in records if r["run"] == "pearl" and in_set(r)]
        new = sum(r["new_tokens"] for r in recs)
        pre = sum(r.get("prefill_s") or 0.0 for r in recs)
        g = best_gamma(td, tf, alpha)
        decode = ceiling(td, tf, alpha, g)
        d = {"alpha": alpha, "best_gamma": g, "decode_ceiling_tokens_per_s": decode,
             "prefill_s": pre, "new_tokens": new,
             "ceiling_tokens_per_s": with_prefill(decode, new, pre)}
        for run, model in (("ar", lambda t: ar_rate(t["t_forward"])),
                           ("sd", lambda t: sd_rate(t["t_draft"], t["t_forward"], alpha, gamma))):
            t = timing.get(run)
            rr = [r for r in records if r["run"] == run and in_set(r)]
            ok = t and ((run == "ar" and 1 in t["t_forward"]) or (
                run == "sd" and t["t_draft"] and gamma + 1 in t["t_forward"]))
            d[f"model_{run}_tokens_per_s"] = (with_prefill(
                model(t), sum(r["new_tokens"] for r in rr),
                sum(r.get("prefill_s") or 0.0 for r in rr)) if ok and rr else None)
        agg = by_run.get("pearl") if name == "all" else by_set[name].get("pearl")
        text = (f"  {name:9s} alpha {alpha:.3f} (teacher-forced); model ar "
                f"{d['model_ar_tokens_per_s'] or 0:.2f}, sd {d['model_sd_tokens_per_s'] or 0:.2f}, "
                f"pearl ceiling {d['ceiling_tokens_per_s']:.2f} tok/s at gamma {g} "
                f"(decode alone {decode:.2f})")
        if d["model_sd_tokens_per_s"]:
            d["ceiling_over_sd_model"] = d["ceiling_tokens_per_s"] / d["model_sd_tokens_per_s"]
            text += f"; ceiling / sd model {d['ceiling_over_sd_model']:.2f}"
        if agg:
            d["pearl_tokens_per_s"] = agg["tokens_per_s"]
            d["pearl_fraction_of_ceiling"] = agg["tokens_per_s"] / d["ceiling_tokens_per_s"]
            text += (f"; pearl measured {agg['tokens_per_s']:.2f} = "
                     f"{100 * d['pearl_fraction_of_ceiling']:.0f}% of the ceiling")
        lines.append(text)
        data["by_set"][name] = d
    overall = data["by_set"]["all"]
    data.update({k: overall.get(k) for k in (
        "best_gamma", "ceiling_tokens_per_s", "model_ar_tokens_per_s", "model_sd_tokens_per_s",
        "pearl_fraction_of_ceiling")})
    data["ceiling_by_gamma"] = {k: ceiling(td, tf, overall["alpha"], k)
                                for k in tf if k == 1 or k - 1 in tf}
    return {"text": "\n".join(lines), "data": data}


def divergence_text(records: list[dict]) -> str:
    """Where greedy outputs differ from the reference, and the target's logit margin there."""
    rows = [r for r in records if r.get("divergence")]
    if not rows:
        return ""
    lines = ["\ngreedy outputs that differ from the reference (the target's logits at the first "
             "differing position, recomputed in this process over the common prefix; noise = "
             "the largest logit difference between a full pass and a KV-cached step there; a "
             "margin within twice the noise is a near-tie of the dtype):"]
    for r in rows:
        v = r["divergence"]
        lines.append(f"  {r['run']:22s} {r['set']}[{r['prompt']}] new token {r['first_difference']}:"
                     f" reference {v['reference_id']} logit {v['reference_logit']:.4f}, this run "
                     f"{v['other_id']} logit {v['other_logit']:.4f}, margin {v['margin']:.4f} "
                     f"(cached step {v['cached_margin']:.4f}, noise {v['noise']:.4f}, ulp "
                     f"{v['ulp']:.4f}): {'near-tie' if v['near_tie'] else 'NOT a tie'}")
    return "\n".join(lines)


GOALS = [  # (name, numerator contender, denominator contender, lowest ratio that meets it)
    ("pearl / sd", "pearl", "sd", 1.5),
    ("pearl / hf-assisted-1t", "pearl", "hf-assisted-1t", 1.3),
    ("pearl / hf-assisted-all", "pearl", "hf-assisted-all", 1.2),
]


def best_run(aggs: dict, contender: str) -> str | None:
    """The run of ``contender`` in ``aggs``; for hf-assisted the faster of its two settings."""
    if contender in aggs:
        return contender
    runs = [k for k in aggs if k.startswith(contender + ":")]
    return max(runs, key=lambda k: aggs[k]["tokens_per_s"]) if runs else None


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
        lines.append(f"  {label:24s} {ratio:5.2f}  (goal >= {goal}): "
                     f"{'met' if ratio >= goal else 'NOT met'}")
    pearl = aggs.get("pearl")
    if pearl and "overhead_share" in pearl:
        v = pearl["overhead_share"]
        data["protocol overhead"] = {"value": v, "goal": 0.03, "met": v < 0.03}
        lines.append(f"  {'protocol overhead':24s} {100 * v:4.1f}%  (goal < 3% of wall time): "
                     f"{'met' if v < 0.03 else 'NOT met'}")
    c = ceil.get("by_set", {}).get(name, {})
    if c.get("pearl_fraction_of_ceiling") is not None:
        v = c["pearl_fraction_of_ceiling"]
        data["fraction of ceiling"] = {"value": v, "goal": 0.85, "met": v >= 0.85}
        lines.append(f"  {'pearl / ceiling':24s} {v:5.2f}  (goal >= 0.85): "
                     f"{'met' if v >= 0.85 else 'NOT met'}")
    if c.get("ceiling_over_sd_model"):
        lines.append(f"  (on these timings the pearl schedule's ceiling is "
                     f"{c['ceiling_over_sd_model']:.2f}x the sd model: the most pearl / sd can be "
                     "here)")
    return {"text": "\n".join(lines), "data": data}


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
