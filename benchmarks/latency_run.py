"""Running `pearl bench latency`: the contenders, the services and the interleaved runs, and the
checks that need the models (identical tokens, logit margins, the draft's agreement).

Every contender runs each prompt in turn, the order rotated prompt by prompt so that none always
goes first; the service contenders go through a coordinator (real processes, or in this process
with `--tiny`), the local ones through benchmarks/local.py. The results are plain records (one
dict per prompt and run) that benchmarks/latency_report.py aggregates and reports.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.divergence import first_difference
from benchmarks.hardware import ALL_CPUS, hardware_split, peak_rss_mb, rss_mb
from benchmarks.prompts import load_prompts
from benchmarks.replay import replay_args, write_references
from benchmarks.services import SERVICE, start_coordinator, start_pair
from specdec.defaults import DEFAULT_GAMMA_MAX

LOCAL = ("hf-assisted-1t", "hf-assisted-all", "ar-local-1t", "ar-local-all")
CONTENDERS = SERVICE + LOCAL
BASELINE = "ar-local-1t"
SWEEP = range(1, DEFAULT_GAMMA_MAX + 1)


# -- what runs ------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What one `pearl bench latency` invocation runs, and on which hardware split."""

    contenders: list[str]
    runs: list[tuple[str, str]]  # (contender, run): see expand()
    baseline: str  # what speedups divide by
    gpu: bool
    replay: bool  # the draft service replays the target's tokens (draft_service/replay.py)
    use_services: bool
    draft_name: str
    target_name: str
    dtype: str
    split: str  # the hardware split, in words
    cpus: list[int]  # every CPU of this process; the draft on the first, the target on the last
    t_start: float = field(default_factory=time.monotonic)


def setup(a) -> Setup:
    """The contenders and the hardware split of ``a`` (the parsed flags); ValueError names
    unknown contenders."""
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {','.join(CONTENDERS)}")
    gpu = a.device == "cuda"
    if gpu:  # one thread or all cores means nothing to a GPU run
        contenders = [c for c in contenders if not c.endswith("-1t")]
    return Setup(
        contenders=contenders, runs=expand(contenders, a.sweep), baseline=baseline(contenders),
        gpu=gpu, replay=a.replay_acceptance is not None,
        use_services=any(c in SERVICE for c in contenders) or a.sweep,
        draft_name="tiny-draft (noisy copy of tiny-target)" if a.tiny else a.draft_model,
        target_name="tiny-target (random Qwen2, 2 layers)" if a.tiny else a.target_model,
        dtype="float32" if a.tiny else a.dtype,
        split=hardware_split(LOCAL, a.tiny, a.device, a.dtype, a.replay_acceptance),
        cpus=ALL_CPUS)


def baseline(contenders: list[str]) -> str:
    """What speedups divide by: plain generation of the target with one thread (CPU), or with
    the whole machine where that is all that ran (GPU)."""
    return next((c for c in ("ar-local-1t", "ar-local-all", "ar") if c in contenders), BASELINE)


def reference_run(s: Setup) -> str | None:
    """Whose tokens every run is compared with: the baseline, or ar when the baseline did not
    run."""
    return s.baseline if s.baseline in s.contenders else ("ar" if "ar" in s.contenders else None)


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


# -- one run of one prompt ------------------------------------------------------------------------


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


# -- the whole run --------------------------------------------------------------------------------


@dataclass
class Measured:
    """What the runs produced: one record per prompt and run, and the processes' memory."""

    records: list[dict]
    prompts: list[dict]
    local: object  # benchmarks.local.Local: the in-process pair, for the checks below
    rss_services: dict[str, float | None]  # peak RSS (VmHWM) of each service process, MB
    rss_self: float | None  # peak RSS of the bench process
    rss_now: dict[str, float | None]  # RSS of every process at the end


def measure(a, s: Setup, out_dir: Path) -> Measured:
    """Start what ``s`` needs, run every prompt through every run, stop everything."""
    from benchmarks.local import Local, load_pair
    from pearl.client import Client
    from pearl.procs import running

    with running() as svcs:
        out_of_process = s.use_services and not a.tiny
        if out_of_process and not s.replay:  # load in parallel with the in-process pair
            start_pair(svcs, a.draft_model, a.target_model, a.device, a.dtype)
        draft, target = load_pair(a.draft_model, a.target_model, a.dtype, a.tiny, a.device)
        local = Local(draft, target, a.gamma)
        prompts = load_prompts(a.set, a.prompts, target.tokenizer, a.tiny)
        if out_of_process and s.replay:  # the draft needs the target's continuations first
            path = write_references(lambda ids, n: local.run(ids, n, "all").token_ids,
                                    prompts, a.max_new_tokens, out_dir / "replay.jsonl")
            start_pair(svcs, a.draft_model, a.target_model, a.device, a.dtype,
                       extra_draft=replay_args(path, a.replay_acceptance))
        cluster, address = connect(a, s, svcs, draft, target)
        print(f"ready in {time.monotonic() - s.t_start:.0f} s", flush=True)
        client = Client(address) if address else None

        def one(run: str, ids: list[int], m: int) -> dict:
            if run.split(":")[0] in LOCAL:
                return local_run(local, run, ids, m)
            return service_run(client, run, ids, m, a.gamma)

        try:
            records = interleave(one, s.runs, prompts, a.max_new_tokens, s.gpu)
        finally:
            if client:
                client.close()
            if cluster:
                cluster.close()
        pids = {role: svc.proc.pid for role, svc in svcs.all.items()}
        rss_services = {role: peak_rss_mb(pid) for role, pid in pids.items()}
        rss_now = {role: rss_mb(pid) for role, pid in pids.items()}
    rss_now["bench"] = rss_mb(os.getpid())
    return Measured(records, prompts, local, rss_services, peak_rss_mb(os.getpid()), rss_now)


def connect(a, s: Setup, svcs, draft, target):
    """(in-process cluster or None, coordinator address or None)."""
    if not s.use_services:
        return None, None
    if a.tiny:
        from benchmarks.local import untrained
        from pearl.cluster import Cluster

        cluster = Cluster(draft, target, a.gamma, target_kw={"transfer": untrained(target)})
        return cluster, cluster.address
    d, t = svcs.wait("draft"), svcs.wait("target")
    return None, start_coordinator(svcs, d, t, ["--gamma", str(a.gamma)])


def interleave(one, runs: list[tuple[str, str]], prompts: list[dict], new_tokens: int,
               gpu: bool) -> list[dict]:
    """Every prompt through every run, the order rotated by prompt; a warm-up first."""
    from tqdm import tqdm

    # warm-up, not recorded: first-call costs; on a GPU a whole request, since every new shape
    # (window length, cache length) costs a kernel choice the first time
    warm = new_tokens if gpu else min(4, new_tokens)
    for _, run in runs:
        one(run, prompts[0]["ids"], warm)
    records = []
    bar = tqdm(total=len(prompts) * len(runs), desc="bench", unit="run", file=sys.stderr)
    for pi, p in enumerate(prompts):
        k = pi % len(runs)  # rotate the order so no contender always goes first
        for contender, run in runs[k:] + runs[:k]:
            bar.set_postfix_str(f"{p['set']}[{p['index']}] {run}")
            rec = one(run, p["ids"], new_tokens)
            rec.update(contender=contender, run=run, set=p["set"], prompt=p["index"],
                       prompt_tokens=len(p["ids"]))
            rec["tokens_per_s"] = rec["new_tokens"] / rec["wall_s"]
            records.append(rec)
            bar.update()
    bar.close()
    return records


# -- checks that need the models ------------------------------------------------------------------


def compare(m: Measured, ref_run: str | None) -> None:
    """Mark each record identical or not to ``ref_run``'s tokens on the same prompt; where greedy
    outputs differ, the target's logit margin at the first difference (``divergence``)."""
    ref = {(r["set"], r["prompt"]): r["token_ids"] for r in m.records if r["run"] == ref_run}
    for r in m.records:
        same = None if ref_run is None else r["token_ids"] == ref[(r["set"], r["prompt"])]
        r["identical"] = same
        r["first_difference"] = (None if ref_run is None else
                                 first_difference(r["token_ids"], ref[(r["set"], r["prompt"])]))
    prompt_ids = {(p["set"], p["index"]): p["ids"] for p in m.prompts}
    for r in m.records:
        d, key = r["first_difference"], (r["set"], r["prompt"])
        if d is not None and d < min(len(r["token_ids"]), len(ref[key])):
            r["divergence"] = m.local.margin(prompt_ids[key], r["token_ids"][:d], ref[key][d],
                                             r["token_ids"][d])


def agreement(m: Measured, ref_run: str | None) -> dict[str, float]:
    """The draft's teacher-forced agreement with ``ref_run``'s tokens (the ceiling's alpha), per
    prompt set and over all prompts ("all")."""
    if ref_run is None:
        return {}
    ref = {(r["set"], r["prompt"]): r["token_ids"] for r in m.records if r["run"] == ref_run}
    counts: dict[str, list[int]] = {}
    for p in m.prompts:
        x, n = m.local.agreement(p["ids"], ref[(p["set"], p["index"])])
        for key in (p["set"], "all"):
            counts.setdefault(key, [0, 0])
            counts[key][0] += x
            counts[key][1] += n
    return {k: x / n for k, (x, n) in counts.items() if n}
