"""Running `pearl bench`: the contenders, the prompts, the services and the interleaved runs, and
the checks that need the models (identical tokens, logit margins, the draft's agreement).

Every contender runs each prompt in turn, the order rotated prompt by prompt so that none always
goes first; the service contenders go through a coordinator (real processes, or in this process
with `--tiny`), the local ones through pearl/bench_local.py. The results are plain records (one
dict per prompt and run) that pearl/bench_report.py aggregates and reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from specdec.defaults import DEFAULT_GAMMA_MAX

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


# -- what runs ------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What one `pearl bench` invocation runs, and on which hardware split."""

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
    from pearl.bench_local import ALL_CPUS

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
        dtype="float32" if a.tiny else a.dtype, split=hardware_split(a, gpu, ALL_CPUS),
        cpus=ALL_CPUS)


def hardware_split(a, gpu: bool, cpus: list[int]) -> str:
    if a.tiny:
        split = ("--tiny: all three services and the local contenders in this process, no "
                 "pinning (a harness check, not a measurement)")
    elif gpu:
        split = ("draft, target and coordinator services as separate processes sharing the one "
                 "GPU; hf-assisted-all / ar-local-all in the bench process on the same GPU")
    else:
        dcpu, tcpu = cpus[0], cpus[-1]
        split = (f"draft service: CPU {dcpu}, 1 thread; target service: CPU {tcpu}, 1 thread; "
                 f"coordinator: unpinned; hf-assisted-1t / ar-local-1t: CPU {tcpu}, 1 thread "
                 f"(both models of hf-assisted on it); hf-assisted-all / ar-local-all: CPUs "
                 f"{','.join(map(str, cpus))}, {len(cpus)} threads")
    if a.replay_acceptance is not None:
        split += "; " + replay_note(a.replay_acceptance)
    return split


def replay_note(acceptance: float) -> str:
    """What every report of a run with a replaying draft says about its acceptance."""
    return (f"the draft replays the target's greedy tokens with probability {acceptance} "
            "(draft_service/replay.py): acceptance is CHOSEN, not a real pair's; the figures time "
            "the schedule and the protocol")


def replay_args(path: Path, acceptance: float) -> list[str]:
    """The draft service's flags that make it replay the references in ``path``."""
    return ["--replay", str(path), "--replay-acceptance", str(acceptance)]


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


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


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


def untrained(loaded):
    """Copy-forward transfer layers for --tiny (a harness check: the mode runs, drafts poorly)."""
    from target_service.hidden_transfer.layers import Transfer, TransferLayers

    cfg = loaded.model.config
    layers = TransferLayers(cfg.hidden_size, cfg.num_hidden_layers // 2, 3, 8)
    return Transfer(layers, loaded.name)


def write_references(greedy, prompts: list[dict], new_tokens: int, path: Path,
                     workers: int = 1) -> Path:
    """The target's own greedy continuation of every prompt, one JSON list of prompt +
    continuation per line: what a replaying draft proposes (draft_service/replay.py).
    ``greedy(prompt_ids, n)`` gives the target's first ``n`` greedy tokens (the one-request
    bench: the model in this process; the load bench: the target service, ``workers`` prompts
    at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        rows = list(ex.map(lambda p: p["ids"] + greedy(p["ids"], new_tokens + 16), prompts))
    tmp = path.with_suffix(".tmp")  # whole, at once: a replaying draft may read it any time
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


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
    local: object  # pearl.bench_local.Local: the in-process pair, for the checks below
    rss_services: dict[str, float | None]  # peak RSS (VmHWM) of each service process, MB
    rss_self: float | None  # peak RSS of the bench process
    rss_now: dict[str, float | None]  # RSS of every process at the end


def measure(a, s: Setup, out_dir: Path) -> Measured:
    """Start what ``s`` needs, run every prompt through every run, stop everything."""
    from pearl.bench_local import Local, load_pair
    from pearl.client import Client
    from pearl.procs import running

    with running() as svcs:
        out_of_process = s.use_services and not a.tiny
        if out_of_process and not s.replay:  # load in parallel with the in-process pair
            start_models(a, s, svcs, [])
        draft, target = load_pair(a.draft_model, a.target_model, a.dtype, a.tiny, a.device)
        local = Local(draft, target, a.gamma)
        prompts = load_prompts(a.set, a.prompts, target.tokenizer, a.tiny)
        if out_of_process and s.replay:  # the draft needs the target's continuations first
            path = write_references(lambda ids, n: local.run(ids, n, "all").token_ids,
                                    prompts, a.max_new_tokens, out_dir / "replay.jsonl")
            start_models(a, s, svcs, replay_args(path, a.replay_acceptance))
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


def start_models(a, s: Setup, svcs, extra_draft: list[str]) -> None:
    """The draft and target services as processes, each pinned to its own CPU (not on a GPU)."""
    # one torch thread each: on a GPU too, where more only spin against the other processes'
    # launch threads
    common = ["--device", a.device, "--dtype", a.dtype, "--threads", "1"]
    svcs.start("draft", ["--model", a.draft_model, *common, *extra_draft],
               cpus=None if s.gpu else str(s.cpus[0]))
    svcs.start("target", ["--model", a.target_model, *common],
               cpus=None if s.gpu else str(s.cpus[-1]))


def connect(a, s: Setup, svcs, draft, target):
    """(in-process cluster or None, coordinator address or None)."""
    if not s.use_services:
        return None, None
    if a.tiny:
        from pearl.cluster import Cluster

        cluster = Cluster(draft, target, a.gamma, target_kw={"transfer": untrained(target)})
        return cluster, cluster.address
    d, t = svcs.wait("draft"), svcs.wait("target")
    svcs.start("coordinator", ["--draft", d, "--target", t, "--gamma", str(a.gamma)])
    return None, svcs.wait("coordinator", 120)


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


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
