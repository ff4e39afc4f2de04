"""`pearl bench load`: many requests at once, in a closed loop.

For each concurrency c and each contender, c clients each send requests one after the other
(a closed loop: a client sends its next request when its last one is done,
benchmarks/closed_loop.py), every request a different HumanEval prompt. Contenders:

- ``ar``, ``sd``, ``pearl``, ``hidden-transfer``: the real services through the public gRPC API
  (Coordinator.Generate), one client (its own channel) per thread; processes on loopback as in
  the latency bench (draft on the first CPU, target on the last, one thread each).
- ``pearl-http``: pearl through the coordinator's OpenAI-compatible HTTP front (streamed
  /v1/completions with the same prompt token ids, one connection per client). HTTP streams text,
  not token ids: its records hold the text and the count the usage chunk gives, and a record is
  identical to the reference when both equal the reference's tokens decoded as the coordinator
  decodes them.
- ``hf-padded-1t`` / ``hf-padded-all`` and ``hf-cb-1t`` / ``hf-cb-all``: transformers' left-padded
  batched ``generate`` and continuous batching of the target alone in this process
  (benchmarks/hf.py).

Contenders are interleaved: at each concurrency every contender runs once, in an order rotated
from one concurrency to the next. Per contender and concurrency: aggregate tok/s, per-request
latency p50/p99, time to first token (TTFT) and time per output token after it (TPOT) p50/p99
(benchmarks/load_analysis.py). Output: JSON, a chart of throughput against concurrency, a
Markdown table and the goals (benchmarks/load_report.py). Each service request keeps its engine
statistics (queue wait, mean target batch, window history). Every greedy request whose tokens
differ from ar's on the same prompt (alone, at concurrency 1, where the run has that prompt
there) is weighed with the target's logit margin at the first difference: in bf16 each must be
a measured near-tie.
``--rss-check`` adds a mixed load (modes, prompt lengths, sampling) of 200 requests and compares
the services' RSS after the first 20 with the RSS at the end.
``--replay-acceptance A`` (models with random weights, e.g. ``random:qwen2.5-7b`` on a GPU): the
target service's greedy continuation of every prompt is written to ``--out``/replay.jsonl before
the phases, and the draft service replays it with probability A (benchmarks/replay.py), as in
the latency bench; every report then says that the acceptance is chosen, not measured.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.closed_loop import HTTP, free_port, http_model, http_phase, service_phase
from benchmarks.hardware import ALL_CPUS, hardware_split, rss_mb
from benchmarks.hf import HFTarget
from benchmarks.load_analysis import (Margins, divergence_goal, goals, kv_bytes, mark_divergences,
                                      mark_identical, summarize)
from benchmarks.load_report import chart, markdown, print_report
from benchmarks.prompts import load_prompts
from benchmarks.replay import replay_args, replay_note, write_references
from benchmarks.services import SERVICE, start_coordinator, start_pair
from specdec.defaults import DEFAULT_MODELS

HF = ("hf-padded-1t", "hf-padded-all", "hf-cb-1t", "hf-cb-all")
SERVED = SERVICE + tuple(HTTP)  # through the services
CONTENDERS = SERVED + HF
DEFAULTS = {"concurrency": "1,2,4,8", "max_new_tokens": 48, "contenders": ",".join(CONTENDERS)}
DEFAULT_JSON = "docs/data/bench-load.json"
DEFAULT_CHART = "docs/bench-load.png"
TINY_JSON, TINY_CHART = "bench-out/bench-load.json", "bench-out/bench-load.png"  # not over docs/


# -- the rig: services, models, prompts -----------------------------------------------------------


@dataclass
class Rig:
    """What a load run drives: the models in this process (``target`` may be a tokenizer alone,
    :func:`benchmarks.local.tokenizer_only`), the prompts, and the services' addresses (the tiny
    run's in-process ``cluster``, else the processes of ``pearl.procs.running``); ``http``: the
    coordinator's HTTP front's base URL and ``model`` its model name, where an HTTP contender
    runs."""

    draft: object | None
    target: object
    hf: HFTarget | None
    prompts: list[dict]
    gamma: int
    address: str | None = None
    draft_address: str | None = None
    target_address: str | None = None
    cluster: object | None = None
    http: str | None = None
    model: str | None = None

    def phase(self, name: str, c: int, m: int, per_client: int,
              duration: float | None) -> list[dict]:
        if name in HTTP:
            return http_phase(self.http, self.model, name, c, self.prompts, m, per_client,
                              duration)
        if name in SERVICE:
            return service_phase(self.address, name, c, self.prompts, m, self.gamma, per_client,
                                 duration)
        run = self.hf.padded_phase if name.startswith("hf-padded") else self.hf.cb_phase
        return run(name, c, self.prompts, m, per_client, duration)

    def close(self) -> None:
        if self.cluster:
            self.cluster.close()


def set_up(a, svcs, contenders: list[str], concurrency: list[int], dtype: str) -> Rig:
    """Start the services the contenders need (in this process with --tiny), load what this
    process needs, and the prompts; with a replaying draft, its references first."""
    from benchmarks.local import load_pair, tokenizer_only, untrained
    from pearl.cluster import Cluster
    from specdec.models import load_model

    need_services = any(c in SERVED for c in contenders) or a.rss_check or a.rss_only
    http_port = free_port() if any(c in HTTP for c in contenders) else None
    replay = replay_file(a) if need_services and a.replay_acceptance is not None else None
    if need_services and not a.tiny:
        start_pair(svcs, a.draft_model, a.target_model, a.device, a.dtype,
                   shlex.split(a.serve_args),
                   replay_args(replay, a.replay_acceptance) if replay else [])
    hf_on = any(c in HF for c in contenders)
    if a.tiny:
        draft, target = load_pair(a.draft_model, a.target_model, dtype, True)
    elif hf_on:
        draft, target = None, load_model(a.target_model, a.device, a.dtype)
    else:  # the services alone: the tokenizer is all this process needs
        draft, target = None, tokenizer_only(a.target_model)
    rig = Rig(draft, target, HFTarget(target) if hf_on else None,
              bench_prompts(a, concurrency, target.tokenizer), a.gamma)
    if need_services and a.tiny:
        from draft_service.replay import Replay

        rig.cluster = Cluster(
            draft, target, a.gamma, target_kw={"transfer": untrained(target)},
            draft_kw={"replay": Replay(replay, a.replay_acceptance)} if replay else None,
            coordinator_kw=None if http_port is None else {"http_port": http_port})
        rig.address = rig.cluster.address
        rig.draft_address, rig.target_address = (rig.cluster.draft_address,
                                                 rig.cluster.target_address)
    elif need_services:
        rig.draft_address, rig.target_address = svcs.wait("draft"), svcs.wait("target")
        http = [] if http_port is None else ["--http-port", str(http_port)]
        rig.address = start_coordinator(svcs, rig.draft_address, rig.target_address,
                                        ["--gamma", str(a.gamma), *http])
    if http_port is not None:
        rig.http = f"http://127.0.0.1:{http_port}"
        rig.model = http_model(rig.http)
    if replay:
        target_references(rig.address, rig.prompts, a.max_new_tokens, replay)
    return rig


def replay_file(a) -> Path:
    """Where the replaying draft's references go; empty until :func:`target_references` writes
    them (the draft service reads the file again when it changes)."""
    path = Path(a.out) / "replay.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def target_references(address: str, prompts: list[dict], m: int, path: Path) -> None:
    """The replaying draft's references: the target service's own greedy continuation of every
    prompt (``ar`` through the coordinator, 16 at a time), so that what the draft replays is
    exactly what the target emits, with no second copy of the target in this process."""
    from pearl.client import Client

    t0 = time.monotonic()
    with Client(address) as client:
        write_references(lambda ids, n: client.complete(ids, mode="ar", max_new_tokens=n).token_ids,
                         prompts, m, path, workers=min(16, len(prompts)))
    print(f"replay references: the target's greedy tokens for {len(prompts)} prompts in "
          f"{path} ({time.monotonic() - t0:.0f} s)", flush=True)


def bench_prompts(a, concurrency: list[int], tokenizer) -> list[dict]:
    """Enough HumanEval prompts for every request of a phase to have its own (all 164 with a
    --duration)."""
    n_prompts = max([c * a.requests_per_client for c in concurrency] + [16])
    if a.duration is not None:
        n_prompts = 164
    prompts = load_prompts("humaneval", n_prompts, tokenizer, a.tiny)
    if a.tiny:  # equal cuts of 120 characters: vary them, so that batches need padding
        for p in prompts:
            p["ids"] = p["ids"][(17 * p["index"]) % 50:]
    return prompts


# -- the phases and the RSS check -----------------------------------------------------------------


def run_phases(rig: Rig, a, contenders: list[str], concurrency: list[int]) -> list[dict]:
    """A warm-up of each contender, then every contender at every concurrency, interleaved."""
    from tqdm import tqdm

    for name in contenders:  # warm-up, not recorded: first-call costs
        rig.phase(name, 1, min(4, a.max_new_tokens), 1, None)
    records: list[dict] = []
    bar = tqdm(total=len(concurrency) * len(contenders), desc="bench-load", unit="phase",
               file=sys.stderr)
    for ci, c in enumerate(concurrency):
        k = ci % max(1, len(contenders))  # rotate: no contender always goes first
        for name in contenders[k:] + contenders[:k]:
            bar.set_postfix_str(f"{name} x{c}")
            records += rig.phase(name, c, a.max_new_tokens, a.requests_per_client, a.duration)
            bar.update()
    bar.close()
    return records


def run_rss_check(rig: Rig, a, svcs, contenders: list[str]) -> dict:
    pids = ({"bench process (all services)": os.getpid()} if a.tiny else
            {role: s.proc.pid for role, s in svcs.all.items()})
    modes = [c for c in contenders if c in SERVICE] or list(SERVICE)
    print(f"RSS check: {a.rss_requests} mixed requests ({','.join(modes)}), "
          f"{a.rss_concurrency} at a time ...", flush=True)
    return rss_check(rig.address, pids, rig.prompts, modes, a.max_new_tokens, a.rss_requests,
                     a.rss_concurrency, min(20, a.rss_requests))


def rss_check(address: str, pids: dict[str, int], prompts: list[dict], modes: list[str], m: int,
              n: int, c: int, first: int = 20) -> dict:
    """``n`` requests, ``c`` at a time, cycling the modes, prompt lengths (whole prompts and cut
    ones), new-token counts and greedy/sampled settings; the processes' RSS once ``first`` have
    finished and at the end."""
    from pearl.client import Client

    rng = random.Random(0)
    jobs = []
    for k in range(n):
        p = prompts[k % len(prompts)]["ids"]
        cut = p[: max(8, int(len(p) * rng.choice((1.0, 0.6, 0.3))))]
        sampled = k % 3 == 2
        jobs.append(dict(prompt=cut, mode=modes[k % len(modes)],
                         max_new_tokens=rng.choice((m, max(1, m // 2), max(1, m // 4))),
                         temperature=0.8 if sampled else 0.0, top_p=0.9 if sampled else None,
                         seed=k if sampled else None))
    lock, finished = threading.Lock(), [0]
    snap: dict[str, dict[str, float | None]] = {}
    it = iter(jobs)

    def worker(_: int) -> None:
        with Client(address) as cl:
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                cl.complete(job.pop("prompt"), **job)
                with lock:
                    finished[0] += 1
                    if finished[0] == first:
                        snap["first"] = {k: rss_mb(pid) for k, pid in pids.items()}

    with ThreadPoolExecutor(c) as ex:
        list(ex.map(worker, range(c)))
    end = {k: rss_mb(pid) for k, pid in pids.items()}
    after = snap.get("first", end)
    growth = {k: (end[k] - after[k]) / after[k] for k in pids if end[k] and after[k]}
    return {"requests": n, "first": first, "concurrency": c, "after_first_mb": after,
            "at_end_mb": end, "growth": growth}


# -- the run --------------------------------------------------------------------------------------


def parse_load(a) -> tuple[list[str], list[int]] | None:
    """The contenders and the concurrencies the run measures; None (after saying why on stderr)
    where the flags are wrong. With --rss-only no concurrency; on cuda no '-1t' contender."""
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        print(f"pearl bench load: unknown contenders {unknown}; choose from "
              f"{','.join(CONTENDERS)}", file=sys.stderr)
        return None
    try:
        concurrency = sorted({int(x) for x in (a.concurrency or "").split(",") if x.strip()})
    except ValueError:
        print(f"pearl bench load: --concurrency takes a comma list of integers, got "
              f"{a.concurrency!r}", file=sys.stderr)
        return None
    if any(c < 1 for c in concurrency):
        print("pearl bench load: every --concurrency must be >= 1", file=sys.stderr)
        return None
    if a.rss_only:
        concurrency = []
    if a.device == "cuda":
        contenders = [c for c in contenders if not c.endswith("-1t")]
    return contenders, concurrency


def command_line(a) -> str:
    parts = ["pearl bench load", f"--concurrency {a.concurrency}"]
    if a.duration is not None:
        parts.append(f"--duration {a.duration:g}")
    else:
        parts.append(f"--requests-per-client {a.requests_per_client}")
    parts.append(f"--max-new-tokens {a.max_new_tokens}")
    if a.contenders != DEFAULTS["contenders"]:
        parts.append(f"--contenders {a.contenders}")
    if not a.tiny:
        for flag, value, default in (("--draft-model", a.draft_model, DEFAULT_MODELS["draft"]),
                                     ("--target-model", a.target_model, DEFAULT_MODELS["target"]),
                                     ("--device", a.device, "cpu")):
            if value != default:
                parts.append(f"{flag} {value}")
    if a.replay_acceptance is not None:
        parts.append(f"--replay-acceptance {a.replay_acceptance:g}")
    for flag, on in (("--tiny", a.tiny), ("--rss-check", a.rss_check), ("--rss-only", a.rss_only)):
        if on:
            parts.append(flag)
    return " ".join(parts)


def analyse(records: list[dict], rig: Rig, a, contenders: list[str], concurrency: list[int],
            rss: dict | None, dtype: str) -> dict:
    """Marks the records against the reference's tokens; the phases' summaries, the goals and
    the Markdown table."""
    reference = next((c for c in ("ar", "hf-padded-1t", "hf-padded-all") if c in contenders),
                     None)
    mark_identical(records, reference,
                   lambda ids: rig.target.tokenizer.decode(ids, skip_special_tokens=True))
    weigh = Margins(rig.target, a.target_model, a.device, dtype)
    divergences = mark_divergences(records, reference,
                                   {p["index"]: p["ids"] for p in rig.prompts}, weigh)
    phases: dict[str, dict[int, dict]] = {}
    for name in contenders:
        for c in concurrency:
            recs = [r for r in records if r["contender"] == name and r["concurrency"] == c]
            if recs:
                phases.setdefault(name, {})[c] = summarize(recs)
    gs = goals(phases, concurrency, rss)
    if concurrency:
        gs.append(divergence_goal(divergences, dtype))
    return {"reference": reference, "divergences": divergences, "phases": phases, "goals": gs,
            "table_md": markdown(phases, concurrency) if concurrency else ""}


def kv_sizes(rig: Rig, a, dtype: str) -> dict:
    from benchmarks.local import model_config

    target_config = rig.target.model.config if rig.target.model else model_config(a.target_model)
    draft_config = rig.draft.model.config if rig.draft else model_config(a.draft_model)
    return {"target": kv_bytes("target", rig.target_address, target_config, dtype),
            "draft": kv_bytes("draft", rig.draft_address, draft_config, dtype)}


def write_outputs(a, result: dict, phases: dict, concurrency: list[int]) -> None:
    """The JSON and, with load phases, the chart."""
    out = Path(a.json or (TINY_JSON if a.tiny else DEFAULT_JSON))
    png = Path(a.chart or (TINY_CHART if a.tiny else DEFAULT_CHART))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    wrote = [str(out)]
    if concurrency:
        chart(png, phases, concurrency,
              f"{'tiny models' if a.tiny else a.target_model}, {a.max_new_tokens} new tokens")
        wrote.append(str(png))
    print(f"\nwrote {' and '.join(wrote)} ({result['elapsed_s']:.0f} s in all)")


def run(a) -> int:
    """The load bench of the parsed flags ``a``; the exit status."""
    from pearl.procs import running

    parsed = parse_load(a)
    if parsed is None:
        return 2
    contenders, concurrency = parsed
    dtype = "float32" if a.tiny else a.dtype
    split = hardware_split(HF, a.tiny, a.device, dtype, a.replay_acceptance)
    command = command_line(a)
    print(f"pearl bench load: {command}\nhardware split: {split}", flush=True)
    t_start = time.monotonic()
    rss = None
    with running() as svcs:
        rig = set_up(a, svcs, contenders, concurrency, dtype)
        print(f"ready in {time.monotonic() - t_start:.0f} s", flush=True)
        try:
            records = run_phases(rig, a, contenders, concurrency)
            if a.rss_check or a.rss_only:
                rss = run_rss_check(rig, a, svcs, contenders)
            kv = kv_sizes(rig, a, dtype)
        finally:
            rig.close()
    found = analyse(records, rig, a, contenders, concurrency, rss, dtype)
    print_report(found, records, concurrency, rss, kv, command, a.replay_acceptance)
    config = {"command": command, "draft_model": "tiny" if a.tiny else a.draft_model,
              "target_model": "tiny" if a.tiny else a.target_model, "dtype": dtype,
              "device": a.device, "concurrency": concurrency, "contenders": contenders,
              "max_new_tokens": a.max_new_tokens, "requests_per_client": a.requests_per_client,
              "duration_s": a.duration, "gamma": a.gamma, "tiny": a.tiny, "cpus": ALL_CPUS,
              "hardware_split": split, "reference": found["reference"],
              "serve_args": a.serve_args, "replay_acceptance": a.replay_acceptance,
              "acceptance": ("chosen: " + replay_note(a.replay_acceptance)
                             if a.replay_acceptance is not None else "measured")}
    phases = found["phases"]
    result = {"config": config,
              "phases": {n: {str(c): s for c, s in by_c.items()} for n, by_c in phases.items()},
              "goals": found["goals"], "divergences": found["divergences"],
              "kv_bytes_per_token": kv, "rss": rss, "table_md": found["table_md"],
              "records": records, "elapsed_s": time.monotonic() - t_start}
    write_outputs(a, result, phases, concurrency)
    return 0
