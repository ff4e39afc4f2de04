"""`pearl bench --concurrency 1,2,4,8`: many requests at once (issue 12).

For each concurrency c and each contender, c clients each send requests one after the other
(a closed loop: a client sends its next request when its last one is done), every request a
different HumanEval prompt. Contenders:

- ``ar``, ``sd``, ``pearl``, ``hidden-transfer``: the real services through the public gRPC API
  (Coordinator.Generate), one client (its own channel) per thread; processes on loopback as in
  the one-request bench (draft on the first CPU, target on the last, one thread each).
- ``pearl-http``: pearl through the coordinator's OpenAI-compatible HTTP front (streamed
  /v1/completions with the same prompt token ids, one connection per client). HTTP streams text,
  not token ids: its records hold the text and the count the usage chunk gives, and a record is
  identical to the reference when both equal the reference's tokens decoded as the coordinator
  decodes them.
- ``hf-padded-1t`` / ``hf-padded-all``: transformers' ``generate`` of the target alone in this
  process, the c clients' requests left-padded into one batch per round (the round ends when
  its longest row does), one thread on the target's CPU, or all cores.
- ``hf-cb-1t`` / ``hf-cb-all``: transformers' continuous batching (the manager behind
  ``generate_batch``; sdpa attention on a paged cache): the c clients submit and wait on their
  own requests, which join and leave the running batch.

Contenders are interleaved: at each concurrency every contender runs once, in an order rotated
from one concurrency to the next. Per contender and concurrency: aggregate tok/s (all new tokens
/ the phase's wall time), per-request latency p50/p99, time to first token (TTFT) and time per
output token after it (TPOT: (end - first token) / (tokens - 1)) p50/p99. Output: JSON,
a chart of throughput against concurrency, a Markdown table and the goals of issue 12. Each
service request keeps its engine statistics (queue wait, mean target batch, window history).
Every greedy request whose tokens differ from ar's on the same prompt (alone, at concurrency 1,
where the run has that prompt there) is weighed with the target's logit margin at the first
difference: in bf16 each must be a measured near-tie.
``--rss-check`` adds a mixed load (modes, prompt lengths, sampling) of 200 requests and compares
the services' RSS after the first 20 with the RSS at the end.
``--replay-acceptance A`` (models with random weights, e.g. ``random:qwen2.5-7b`` on a GPU): the
target service's greedy continuation of every prompt is written to ``--out``/replay.jsonl before
the phases, and the draft service replays it with probability A (draft_service/replay.py), as in
the one-request bench; every report then says that the acceptance is chosen, not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pearl.bench import DEFAULT_MODELS, SERVICE, load_prompts, pct, rss_mb, untrained
from pearl.bench_run import replay_args, replay_note, write_references

HF = ("hf-padded-1t", "hf-padded-all", "hf-cb-1t", "hf-cb-all")
HTTP = {"pearl-http": "pearl"}  # contenders through the coordinator's HTTP front: their mode
SERVED = SERVICE + tuple(HTTP)  # through the services
DRAFTING = ("sd", "pearl", "hidden-transfer", "pearl-http")  # whose acceptance means something
CONTENDERS = SERVED + HF
HTTP_GOAL = 0.98  # pearl-http / pearl aggregate tok/s at the highest concurrency
DEFAULTS = {"max_new_tokens": 48, "contenders": ",".join(CONTENDERS)}
DEFAULT_JSON = "docs/data/bench-load.json"
DEFAULT_CHART = "docs/bench-load.png"
TINY_JSON, TINY_CHART = "bench-out/bench-load.json", "bench-out/bench-load.png"  # not over docs/
CB_PAGE = 64  # tokens per page of transformers' paged cache (hf-cb)
# GenerateStats fields each service record keeps (queue_wait_s: seconds the request's forward
# passes waited in the services' engine queues; mean_target_batch: sessions per target step)
SERVICE_STATS = ("acceptance_rate", "target_forwards", "overlap_ratio", "finish_reason",
                 "fell_back", "queue_wait_s", "mean_target_batch", "gamma_history")


# -- command line ---------------------------------------------------------------------------------


def extend_bench(p: argparse.ArgumentParser) -> None:
    """Add the load flags to `pearl bench`; ``--concurrency`` sends the run here.

    The flags it shares with the one-request bench (--max-new-tokens, --contenders) default to
    None on the parser and take each bench's own default when the command runs."""
    have = p._option_string_actions  # flags another part of `pearl bench` may already define

    def add(flag: str, **kw) -> None:
        if flag not in have:
            p.add_argument(flag, **kw)

    add("--concurrency", default=None,
        help="load bench: comma list of concurrent clients, e.g. 1,2,4,8 (contenders "
             f"{','.join(CONTENDERS)}; default --max-new-tokens {DEFAULTS['max_new_tokens']})")
    add("--requests-per-client", type=int, default=2, help="load bench: requests each client sends")
    add("--duration", type=float, default=None,
        help="load bench: seconds each phase keeps sending (instead of --requests-per-client)")
    add("--json", default=None,
        help=f"load bench: results JSON path (default {DEFAULT_JSON}; with --tiny {TINY_JSON})")
    add("--chart", default=None, help=f"load bench: throughput chart PNG path (default "
                                      f"{DEFAULT_CHART}; with --tiny {TINY_CHART})")
    add("--rss-check", action="store_true",
        help="load bench: also a mixed load of --rss-requests requests through the services; "
             "RSS after the first 20 against RSS at the end")
    add("--rss-only", action="store_true", help="load bench: the RSS check alone")
    add("--rss-requests", type=int, default=200)
    add("--rss-concurrency", type=int, default=4)
    add("--serve-args", default="",
        help="load bench: extra `pearl serve` flags for the draft and target services")
    add("--max-new-tokens", type=int, default=None)
    add("--contenders", default=None)
    add("--replay-acceptance", type=float, default=None,
        help="the draft replays the target's greedy tokens with this probability "
             "(draft_service/replay.py; random-weight models): chosen acceptance, not measured")
    add("--out", default="bench-out", help="load bench: folder for replay.jsonl")
    for flag, kw in (("--tiny", {"action": "store_true"}), ("--gamma", {"type": int, "default": 3}),
                     ("--dtype", {"default": "bfloat16"}), ("--device", {"default": "cpu"}),
                     ("--draft-model", {"default": DEFAULT_MODELS["draft"]}),
                     ("--target-model", {"default": DEFAULT_MODELS["target"]})):
        add(flag, **kw)
    original = {k: p.get_default(k) for k in DEFAULTS}
    p.set_defaults(max_new_tokens=None, contenders=None)
    one_request = p.get_default("fn")

    def dispatch(a) -> None:
        load = bool(a.concurrency or a.rss_only)
        for key, value in (DEFAULTS if load else original).items():
            if getattr(a, key) is None:
                setattr(a, key, value)
        if load:
            sys.exit(bench_load(a))
        one_request(a)

    p.set_defaults(fn=dispatch)


# -- request plans and records --------------------------------------------------------------------


def plan(c: int, client: int, n_prompts: int, per_client: int, deadline: float | None):
    """The prompt indices client ``client`` of ``c`` sends, one after the other: its j-th
    request takes prompt (j*c + client) mod n, so every request of a phase has its own prompt and
    the first prompts recur at every concurrency. With a deadline it sends until then."""
    j = 0
    while (j < per_client) if deadline is None else (time.perf_counter() < deadline):
        yield (j * c + client) % n_prompts
        j += 1


def record(contender: str, c: int, client: int, prompt: dict, tokens: list[int] | int,
           start: float, first: float | None, end: float, **extra) -> dict:
    """``tokens``: the new token ids, or their count where only text came back (HTTP; then
    ``token_ids`` is None). TPOT: the time per new token after the first."""
    n = tokens if isinstance(tokens, int) else len(tokens)
    return {"contender": contender, "concurrency": c, "client": client, "prompt": prompt["index"],
            "prompt_tokens": len(prompt["ids"]), "new_tokens": n,
            "token_ids": None if isinstance(tokens, int) else tokens,
            "start": start, "end": end, "latency_s": end - start,
            "ttft_s": None if first is None else first - start,
            "tpot_s": None if first is None or n < 2 else (end - first) / (n - 1), **extra}


# -- service contenders ---------------------------------------------------------------------------


def closed_loop(clients: list, prompts: list[dict], per_client: int, duration: float | None,
                one) -> list[dict]:
    """``len(clients)`` closed-loop clients started together, each sending its next request when
    the last ended; ``one(client, i, prompt)`` runs one request of client i and returns its
    record. The clients are closed at the end."""
    c = len(clients)
    barrier = threading.Barrier(c)

    def run(i: int) -> list[dict]:
        barrier.wait()
        deadline = None if duration is None else time.perf_counter() + duration
        return [one(clients[i], i, prompts[k])
                for k in plan(c, i, len(prompts), per_client, deadline)]

    try:
        with ThreadPoolExecutor(c) as ex:
            return [r for rs in ex.map(run, range(c)) for r in rs]
    finally:
        for cl in clients:
            cl.close()


def service_phase(address: str, mode: str, c: int, prompts: list[dict], m: int, gamma: int,
                  per_client: int, duration: float | None) -> list[dict]:
    from pearl.client import Client, Delta

    g = gamma if mode == "sd" else 0

    def one(client, i: int, p: dict) -> dict:
        first, stats, ids, text = None, {}, [], []
        start = time.perf_counter()
        for part in client.generate(p["ids"], mode=mode, max_new_tokens=m, gamma=g):
            if isinstance(part, Delta):
                if part.token_ids and first is None:
                    first = time.perf_counter()
                ids += part.token_ids
                text.append(part.text)
            else:
                stats = part.stats
        return record(mode, c, i, p, ids, start, first, time.perf_counter(),
                      text="".join(text), **{k: stats.get(k) for k in SERVICE_STATS})

    return closed_loop([Client(address) for _ in range(c)], prompts, per_client, duration, one)


# -- HTTP contenders ------------------------------------------------------------------------------


def free_port() -> int:
    """A port free now, for the coordinator's --http-port (its port file holds the gRPC port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_client(url: str):
    import httpx

    return httpx.Client(base_url=url, timeout=httpx.Timeout(900.0), trust_env=False)


def http_model(url: str) -> str:
    """The model name the HTTP front serves (GET /v1/models)."""
    with http_client(url) as cl:
        return cl.get("/v1/models").raise_for_status().json()["data"][0]["id"]


def http_completion(cl, body: dict) -> tuple[str, float | None, dict]:
    """One streamed /v1/completions: the text, when its first text came (the front sends no
    chunk for ids whose text it holds back, an incomplete UTF-8 character) and the last chunks'
    finish_reason, usage and metrics."""
    text, first, tail, event = [], None, {}, None
    with cl.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if event == "error":
                raise RuntimeError(f"HTTP stream error: {line[len('data: '):]}")
            chunk = json.loads(line[len("data: "):])
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter()
                text.append(choice["text"])
                tail["finish_reason"] = choice["finish_reason"] or tail.get("finish_reason")
            tail.update({k: chunk[k] for k in ("usage", "metrics") if k in chunk})
    return "".join(text), first, tail


def http_phase(url: str, model: str, name: str, c: int, prompts: list[dict], m: int,
               per_client: int, duration: float | None) -> list[dict]:
    """As :func:`service_phase`, through the HTTP front: the same prompt ids and settings, greedy,
    no logprobs (they would add work to the target's steps); each client its own connection."""

    def one(client, i: int, p: dict) -> dict:
        body = {"model": model, "prompt": p["ids"], "max_tokens": m, "stream": True,
                "mode": HTTP[name], "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        text, first, tail = http_completion(client, body)
        stats = {**tail.get("metrics", {}), "finish_reason": tail.get("finish_reason")}
        return record(name, c, i, p, tail["usage"]["completion_tokens"], start, first,
                      time.perf_counter(), text=text, **{k: stats.get(k) for k in SERVICE_STATS})

    return closed_loop([http_client(url) for _ in range(c)], prompts, per_client, duration, one)


# -- transformers contenders (in this process) ----------------------------------------------------


class HFTarget:
    """The target in this process: left-padded batched ``generate`` and continuous batching."""

    def __init__(self, loaded):
        from pearl.bench_local import warm_pool

        self.loaded, self.model = loaded, loaded.model
        gc = self.model.generation_config
        eos = gc.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else min(self.eos, default=0)
        warm_pool(self.model)

    @staticmethod
    def threads(contender: str) -> list[int]:
        """'-1t': one thread on the target service's CPU (idle meanwhile); '-all': every core."""
        from pearl.bench_local import ALL_CPUS

        return ALL_CPUS[-1:] if contender.endswith("-1t") else ALL_CPUS

    @staticmethod
    @contextmanager
    def pinned(contender: str):
        """This thread (and the threads it starts) on the contender's CPUs, torch on as many
        threads; all CPUs again afterwards."""
        import torch

        from pearl.bench_local import ALL_CPUS, pin

        cpus = HFTarget.threads(contender)
        pin(cpus)
        torch.set_num_threads(len(cpus))
        try:
            yield
        finally:
            pin(ALL_CPUS)
            torch.set_num_threads(len(ALL_CPUS))

    def cut(self, row: list[int]) -> list[int]:
        """New tokens up to and including the first end-of-sequence token."""
        for i, t in enumerate(row):
            if t in self.eos:
                return row[: i + 1]
        return row

    def padded_phase(self, contender: str, c: int, prompts: list[dict], m: int, per_client: int,
                     duration: float | None) -> list[dict]:
        per = per_client if duration is None else 10**9  # with a duration: rounds until then
        out = []
        with self.pinned(contender):
            plans = [plan(c, i, len(prompts), per, None) for i in range(c)]
            deadline = None if duration is None else time.perf_counter() + duration
            while deadline is None or time.perf_counter() < deadline:
                batch = [(i, prompts[k]) for i, pl in enumerate(plans) for k in
                         (next(pl, None),) if k is not None]
                if not batch:
                    break
                out += self.padded_round(contender, c, batch, m)
        return out

    def padded_round(self, contender: str, c: int, batch: list[tuple[int, dict]],
                     m: int) -> list[dict]:
        """One ``generate`` of the batch's prompts, left-padded to the longest."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from pearl.bench_local import sync

        class FirstStep(LogitsProcessor):  # called once per step, the first right after prefill
            first: float | None = None

            def __call__(self, input_ids, scores):
                if self.first is None:
                    self.first = time.perf_counter()
                return scores

        width = max(len(p["ids"]) for _, p in batch)
        ids = torch.tensor([[self.pad] * (width - len(p["ids"])) + p["ids"]
                            for _, p in batch], device=self.loaded.device)
        mask = torch.tensor([[0] * (width - len(p["ids"])) + [1] * len(p["ids"])
                             for _, p in batch], device=self.loaded.device)
        step = FirstStep()
        start = time.perf_counter()
        with torch.inference_mode():
            gen = self.model.generate(ids, attention_mask=mask, max_new_tokens=m,
                                      do_sample=False, pad_token_id=self.pad,
                                      logits_processor=LogitsProcessorList([step]))
        sync(self.model)
        end = time.perf_counter()
        return [record(contender, c, i, p, self.cut(row), start, step.first, end,
                       batch_size=len(batch))
                for row, (i, p) in zip(gen[:, width:].tolist(), batch)]

    def cb_configs(self, c: int, prompts: list[dict], m: int):
        """The paged cache sized for c requests (sized by hand: left to itself on a CPU it takes
        60 % of the RAM), chunked prefill under a token budget; greedy generation."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        longest = max(len(p["ids"]) for p in prompts) + m
        cfg = ContinuousBatchingConfig(
            page_size=CB_PAGE, num_blocks=c * (math.ceil(longest / CB_PAGE) + 1) + 1,
            max_batch_tokens=max(256, longest), max_requests_per_batch=max(c, 1),
            allow_block_sharing=False)
        gen = GenerationConfig(do_sample=False, max_new_tokens=m, pad_token_id=self.pad,
                               eos_token_id=sorted(self.eos) or -1)
        return cfg, gen

    def cb_phase(self, contender: str, c: int, prompts: list[dict], m: int, per_client: int,
                 duration: float | None) -> list[dict]:
        """Continuous batching: c clients submit to one manager and each waits on its own
        requests (:meth:`cb_configs`)."""
        cfg, gen = self.cb_configs(c, prompts, m)
        # pinned: the manager's generation thread inherits this thread's affinity
        with self.pinned(contender), self.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cfg, warmup=False) as mgr:
            results = CBResults(mgr)
            barrier = threading.Barrier(c)

            def run(i: int) -> list[dict]:
                out = []
                barrier.wait()
                deadline = None if duration is None else time.perf_counter() + duration
                for j, k in enumerate(plan(c, i, len(prompts), per_client, deadline)):
                    p, rid = prompts[k], f"{contender}-{c}-{i}-{j}"
                    start = time.perf_counter()
                    mgr.add_request(p["ids"], request_id=rid, max_new_tokens=m,
                                    record_timestamps=True)
                    res, end = results.wait(rid, contender)
                    first = res.timestamps[0] if res.timestamps else None
                    out.append(record(contender, c, i, p, self.cut(res.generated_tokens),
                                      start, first, end))
                return out

            try:
                with ThreadPoolExecutor(c) as ex:
                    return [r for rs in ex.map(run, range(c)) for r in rs]
            finally:
                results.close()


class CBResults:
    """The finished requests of a continuous-batching manager by request id, with the time each
    was seen: one reader of the manager's shared output queue, in its own thread."""

    def __init__(self, mgr):
        self.mgr = mgr
        self.done: dict[str, tuple[object, float]] = {}
        self.ready = threading.Condition()
        self.stop = threading.Event()
        self.router = threading.Thread(target=self.route, daemon=True)
        self.router.start()

    def route(self) -> None:
        while not self.stop.is_set():
            r = self.mgr.get_result(timeout=0.05)
            if r is not None and r.is_finished():
                with self.ready:
                    self.done[r.request_id] = (r, time.perf_counter())
                    self.ready.notify_all()

    def wait(self, rid: str, contender: str) -> tuple[object, float]:
        """The finished request ``rid`` and when it was seen; raises if it failed or the
        generation thread stopped first."""
        with self.ready:
            self.ready.wait_for(lambda: rid in self.done or not self.mgr.is_running())
        if rid not in self.done:
            raise RuntimeError(f"{contender}: the generation thread stopped")
        res, end = self.done.pop(rid)
        if res.error:
            raise RuntimeError(f"{contender}: {res.error}")
        return res, end

    def close(self) -> None:
        self.stop.set()
        self.router.join(timeout=5)


# -- aggregation ----------------------------------------------------------------------------------


def summarize(recs: list[dict]) -> dict:
    """One phase (contender x concurrency): aggregate rate and request latencies."""
    wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    new = sum(r["new_tokens"] for r in recs)
    lat = [r["latency_s"] for r in recs]
    ttft = [r["ttft_s"] for r in recs if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in recs if r.get("tpot_s") is not None]
    s = {"requests": len(recs), "new_tokens": new, "wall_s": wall,
         "tokens_per_s": new / wall if wall > 0 else 0.0,
         "latency_p50_s": pct(lat, .5), "latency_p99_s": pct(lat, .99),
         "latency_mean_s": statistics.mean(lat), "ttft_p50_s": pct(ttft, .5),
         "ttft_p99_s": pct(ttft, .99), "tpot_p50_s": pct(tpot, .5), "tpot_p99_s": pct(tpot, .99),
         "per_request_tokens_per_s": statistics.mean(r["new_tokens"] / r["latency_s"]
                                                     for r in recs if r["latency_s"] > 0)}
    if any(r.get("identical") is not None for r in recs):
        same = [r["identical"] for r in recs if r.get("identical") is not None]
        s["identical_share"] = sum(same) / len(same)
    if recs[0]["contender"] in DRAFTING and any(r.get("acceptance_rate") is not None
                                                for r in recs):
        s["acceptance_rate_mean"] = statistics.mean(r["acceptance_rate"] or 0 for r in recs)
    for key, name in (("queue_wait_s", "queue_wait_mean_s"),
                      ("mean_target_batch", "mean_target_batch")):
        vals = [r[key] for r in recs if r.get(key) is not None]
        if vals:
            s[name] = statistics.mean(vals)
    return s


def references(records: list[dict], reference: str | None) -> dict[int, dict]:
    """Per prompt, the reference contender's record to compare with: its first request with
    that prompt at the lowest concurrency that ran it (alone, at concurrency 1, where the run
    has the prompt there)."""
    ref: dict[int, dict] = {}
    for r in records:
        if r["contender"] == reference:
            best = ref.get(r["prompt"])
            if best is None or r["concurrency"] < best["concurrency"]:
                ref[r["prompt"]] = r
    return ref


def mark_identical(records: list[dict], reference: str | None, decode=None) -> None:
    """Greedy tokens (every request of the load phases is greedy) against the reference's on the
    same prompt (:func:`references`; the reference's own batched requests are compared with it
    alone too): ``identical`` and ``first_difference``, None where there is nothing to compare
    with. A record with text and no ids (HTTP) is identical when its text equals ``decode`` of
    the reference's ids and it has as many tokens; its ``first_difference`` is a character."""
    from pearl.bench_run import first_difference

    ref = references(records, reference)
    for r in records:
        base = ref.get(r["prompt"])
        if base is None or base is r:
            r["identical"] = r["first_difference"] = None
        elif r["token_ids"] is None:
            theirs = decode(base["token_ids"])
            r["identical"] = r["text"] == theirs and r["new_tokens"] == base["new_tokens"]
            at = first_difference(r["text"], theirs)  # None: the same text, not as many tokens
            r["first_difference"] = (None if r["identical"] else
                                     len(theirs) if at is None else at)
        else:
            r["identical"] = r["token_ids"] == base["token_ids"]
            r["first_difference"] = first_difference(r["token_ids"], base["token_ids"])


def mark_divergences(records: list[dict], reference: str | None,
                     prompt_ids: dict[int, list[int]], margin) -> dict:
    """Where a record's greedy tokens differ from the reference's on its prompt, the target's
    logit margin at the first difference (``divergence``: ``margin(prompt_ids, common_prefix,
    reference_token, this_token)``, :func:`pearl.bench_local.margin` in the bench), and a
    summary: how many records were compared, how many differ, how many of those are near-ties
    of the dtype. Where one output is a prefix of the other (no differing token to weigh), the
    divergence has ``near_tie`` None: not a measured near-tie. After :func:`mark_identical`."""
    ref = references(records, reference)
    compared = alone = 0
    for r in records:
        base = ref.get(r["prompt"])
        if base is None or base is r:
            continue
        compared += 1
        alone += base["concurrency"] == 1
        d = r.get("first_difference")
        if d is None:
            continue
        mine, theirs = r["token_ids"], base["token_ids"]
        where = {"position": d, "reference": reference,
                 "reference_concurrency": base["concurrency"]}
        if mine is None:  # HTTP: text, no ids to weigh
            where.update(near_tie=None, margin=None, noise=None,
                         note=f"text over HTTP differs at character {d} ({r['new_tokens']} vs "
                              f"{len(theirs)} tokens); no token ids to weigh")
        elif d < min(len(mine), len(theirs)):
            where.update(margin(prompt_ids[r["prompt"]], mine[:d], theirs[d], mine[d]))
        else:
            where.update(near_tie=None, margin=None, noise=None,
                         note=f"one output is a prefix of the other ({len(mine)} vs "
                              f"{len(theirs)} tokens)")
        r["divergence"] = where
    div = [r["divergence"] for r in records if r.get("divergence")]
    return {"reference": reference, "compared": compared, "against_alone": alone,
            "divergences": len(div), "near_ties": sum(v["near_tie"] is True for v in div)}


def divergence_text(records: list[dict], summary: dict) -> str:
    """Every divergence; loudly the ones that are not near-ties."""
    ref = summary["reference"]
    if not summary["compared"]:
        return f"\ndivergences: nothing compared (needs {ref or 'ar'} and another contender)"
    lines = [f"\ndivergences from {ref}'s greedy tokens on the same prompt ("
             f"{summary['compared']} requests compared, {summary['against_alone']} with {ref} "
             f"alone at concurrency 1, the rest with {ref} at the lowest concurrency that ran "
             f"the prompt): {summary['divergences']} differ, {summary['near_ties']} near-ties "
             "(the target's logits at the first difference over the common prefix, in this "
             "process; near-tie: margin within twice the noise between a full pass and a "
             "KV-cached step there, or two ulp)"]
    loud = []
    for r in records:
        v = r.get("divergence")
        if not v:
            continue
        where = (f"{r['contender']} x{r['concurrency']} prompt {r['prompt']} new token "
                 f"{v['position']} (vs {ref} at concurrency {v['reference_concurrency']})")
        if v["near_tie"] is None:
            what = v["note"]
        else:
            what = (f"{ref} {v['reference_id']} logit {v['reference_logit']:.4f}, this "
                    f"{v['other_id']} logit {v['other_logit']:.4f}, margin {v['margin']:.4f}, "
                    f"noise {v['noise']:.4f}, ulp {v['ulp']:.4f}")
        tie = v["near_tie"] is True
        lines.append(f"  {where}: {what}: {'near-tie' if tie else 'NOT a near-tie'}")
        if not tie:
            loud.append(f"!!! {where}: {what}")
    if loud:
        bar = "!" * 100
        lines += [bar, f"!!! {len(loud)} divergence(s) NOT a near-tie: the tokens differ where "
                       "the target's choice is clear, not by rounding", *loud, bar]
    return "\n".join(lines)


def divergence_goal(summary: dict, dtype: str) -> dict:
    """Every greedy divergence from the reference is a measured near-tie."""
    name = f"{'bf16' if dtype == 'bfloat16' else dtype} divergences are near-ties"
    n, ties, ref = summary["divergences"], summary["near_ties"], summary["reference"]
    if not summary["compared"]:
        return {"goal": name, "value": None, "target": 0, "at_most": True, "met": None,
                "figures": f"needs {ref or 'ar'} and another contender", "unit": "count"}
    return {"goal": name, "value": n - ties, "target": 0, "at_most": True, "met": n == ties,
            "figures": f"{n} of {summary['compared']} greedy requests differ from {ref}'s "
                       f"tokens, {ties} of them near-ties", "unit": "count"}


class Margins:
    """The target's logit margin at a divergence (:func:`pearl.bench_local.margin`), with the
    target in this process: the one the bench already holds, else loaded on the first call, on
    the services' device and dtype."""

    def __init__(self, held, name: str, device: str, dtype: str):
        self.target = held if getattr(held, "model", None) is not None else None
        self.name, self.device, self.dtype = name, device, dtype

    def __call__(self, prompt_ids: list[int], prefix: list[int], reference_id: int,
                 other_id: int) -> dict:
        from pearl.bench_local import margin
        from specdec.models import load_model

        if self.target is None:
            print(f"loading {self.name} ({self.dtype}) in this process to weigh divergences ...",
                  flush=True)
            self.target = load_model(self.name, self.device, self.dtype)
        return margin(self.target, prompt_ids, prefix, reference_id, other_id)


# -- goals ----------------------------------------------------------------------------------------


def rate(phases: dict, contender: str, c: int) -> float | None:
    return phases.get(contender, {}).get(c, {}).get("tokens_per_s")


def goals(phases: dict, concurrency: list[int], rss: dict | None) -> list[dict]:
    """The goals of issue 12, each with its figures; ``met`` None where the run lacks the data."""
    out = []

    def goal(name: str, value: float | None, target: float, figures: str, need: str,
             at_most: bool = False) -> None:
        met = None if value is None else (value <= target if at_most else value >= target)
        out.append({"goal": name, "value": value, "target": target, "at_most": at_most,
                    "met": met, "figures": figures if value is not None else need})

    one = rate(phases, "pearl", 1)
    for c, x in ((4, 3.0), (8, 5.0)):
        r = rate(phases, "pearl", c)
        goal(f"pearl at {c} concurrent / pearl one at a time", r / one if r and one else None, x,
             f"{r or 0:.2f} / {one or 0:.2f} tok/s", f"needs pearl at concurrency 1 and {c}")
    for c in (4, 8):
        for hf, x in (("hf-padded-1t", 1.5), ("hf-padded-all", 1.2)):
            r, h = rate(phases, "pearl", c), rate(phases, hf, c)
            goal(f"pearl / {hf} at {c} concurrent", r / h if r and h else None, x,
                 f"{r or 0:.2f} / {h or 0:.2f} tok/s", f"needs pearl and {hf} at concurrency {c}")
    for c in concurrency:
        r, a = rate(phases, "pearl", c), rate(phases, "ar", c)
        goal(f"pearl / ar (same services) at {c} concurrent", r / a if r and a else None, 1.0,
             f"{r or 0:.2f} / {a or 0:.2f} tok/s", f"needs pearl and ar at concurrency {c}")
    alone = phases.get("pearl", {}).get(1, {}).get("latency_p50_s")
    p99 = phases.get("pearl", {}).get(8, {}).get("latency_p99_s")
    goal("pearl p99 latency at 8 concurrent / one request alone (p50 at 1)",
         p99 / alone if p99 and alone else None, 3.0, f"{p99 or 0:.2f} s / {alone or 0:.2f} s",
         "needs pearl at concurrency 1 and 8", at_most=True)
    if "pearl" in phases and "pearl-http" in phases and concurrency:
        hi = max(concurrency)
        h, r = rate(phases, "pearl-http", hi), rate(phases, "pearl", hi)
        goal(f"pearl-http / pearl (HTTP against gRPC) at {hi} concurrent",
             h / r if h and r else None, HTTP_GOAL, f"{h or 0:.2f} / {r or 0:.2f} tok/s",
             f"needs pearl and pearl-http at concurrency {hi}")
    if rss and rss.get("growth"):
        worst = max(rss["growth"], key=lambda k: rss["growth"][k])
        figs = ", ".join(f"{k} {rss['after_first_mb'][k]:.0f} -> {rss['at_end_mb'][k]:.0f} MB"
                         for k in rss["growth"])
        goal(f"RSS growth over a {rss['requests']}-request mixed load (worst: {worst})",
             rss["growth"][worst], 0.10, figs, "", at_most=True)
    else:
        goal("RSS growth over a 200-request mixed load", None, 0.10, "",
             "run with --rss-check", at_most=True)
    return out


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


# -- KV bytes per token ---------------------------------------------------------------------------


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_from_config(config, dtype: str) -> int:
    """2 (K and V) * layers * KV heads * head dim * bytes per element."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def kv_bytes(role: str, address: str | None, config, dtype: str) -> dict:
    """From the service's GetModelInfo when it has the field ``kv_bytes_per_token``, else
    computed from the model config."""
    from protos.v1 import pearl_pb2 as pb

    if address and "kv_bytes_per_token" in pb.ModelInfoResponse.DESCRIPTOR.fields_by_name:
        import grpc

        from protos.v1 import pearl_pb2_grpc
        from specdec.serving import CHANNEL_OPTIONS

        stub = (pearl_pb2_grpc.TargetServiceStub if role == "target"
                else pearl_pb2_grpc.DraftServiceStub)
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
            info = stub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        if info.kv_bytes_per_token:
            return {"bytes": int(info.kv_bytes_per_token), "source": "GetModelInfo"}
    if config is None:
        return {"bytes": None, "source": "unknown (no config)"}
    return {"bytes": kv_from_config(config, dtype),
            "source": "computed from the model config: 2 * layers * kv_heads * head_dim * "
                      "dtype bytes (GetModelInfo has no kv_bytes_per_token)"}


def tokenizer_only(name: str):
    """A stand-in for a loaded model when only its tokenizer is needed."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from specdec.models import tokenizer_folder

    return SimpleNamespace(model=None, tokenizer=AutoTokenizer.from_pretrained(
        tokenizer_folder(name)))


def model_config(name: str):
    try:
        from transformers import AutoConfig

        from specdec import model_store

        return AutoConfig.from_pretrained(model_store.resolve(name, progress=False))
    except Exception:
        return None


# -- RSS under a mixed load -----------------------------------------------------------------------


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


# -- output ---------------------------------------------------------------------------------------


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


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


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


def chart(path: Path, phases: dict, concurrency: list[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_c in phases.items():
        cs = [c for c in concurrency if c in by_c]
        style = dict(marker="o", lw=2.5 if name == "pearl" else 1.5,
                     ls="-" if name in SERVED else "--")
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


def command_line(a) -> str:
    parts = ["pearl bench"]
    if a.concurrency:
        parts.append(f"--concurrency {a.concurrency}")
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


# -- the run --------------------------------------------------------------------------------------


def parse_load(a) -> tuple[list[str], list[int]] | None:
    """The contenders and the concurrencies the run measures; None (after saying why on stderr)
    where the flags are wrong. With --rss-only no concurrency; on cuda no '-1t' contender."""
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        print(f"pearl bench: unknown load contenders {unknown}; choose from "
              f"{','.join(CONTENDERS)}", file=sys.stderr)
        return None
    try:
        concurrency = sorted({int(x) for x in (a.concurrency or "").split(",") if x.strip()})
    except ValueError:
        print(f"pearl bench: --concurrency takes a comma list of integers, got {a.concurrency!r}",
              file=sys.stderr)
        return None
    if any(c < 1 for c in concurrency):
        print("pearl bench: every --concurrency must be >= 1", file=sys.stderr)
        return None
    if a.rss_only:
        concurrency = []
    if a.device == "cuda":
        contenders = [c for c in contenders if not c.endswith("-1t")]
    return contenders, concurrency


def hardware_split(a, dtype: str) -> str:
    from pearl.bench_local import ALL_CPUS

    if a.tiny:
        split = "--tiny: services in this process, no pinning (a harness check, not a measurement)"
    elif a.device == "cuda":
        split = (f"draft, target and coordinator services as separate processes sharing the one "
                 f"GPU, one torch thread each, {dtype}; hf-*-all in this process on the same GPU")
    else:
        dcpu, tcpu = ALL_CPUS[0], ALL_CPUS[-1]
        split = (f"draft service CPU {dcpu}, target service CPU {tcpu}, one thread each, {dtype}; "
                 f"coordinator unpinned; hf-*-1t: CPU {tcpu}, 1 thread; hf-*-all: CPUs "
                 f"{','.join(map(str, ALL_CPUS))}, {len(ALL_CPUS)} threads")
    if a.replay_acceptance is not None:
        split += "; " + replay_note(a.replay_acceptance)
    return split


@dataclass
class Rig:
    """What a load run drives: the models in this process (``target`` may be a tokenizer alone,
    :func:`tokenizer_only`), the prompts, and the services' addresses (the tiny run's in-process
    ``cluster``, else the processes of ``pearl.procs.running``); ``http``: the coordinator's
    HTTP front's base URL and ``model`` its model name, where an HTTP contender runs."""

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


def start_services(svcs, a, extra_draft: list[str]) -> None:
    """The draft and target service processes (they load while this process loads its own);
    on a CPU the draft on the first core, the target on the last."""
    from pearl.bench_local import ALL_CPUS

    gpu = a.device == "cuda"
    common = ["--device", a.device, "--dtype", a.dtype, "--threads", "1",
              *shlex.split(a.serve_args)]
    svcs.start("draft", ["--model", a.draft_model, *common, *extra_draft],
               cpus=None if gpu else str(ALL_CPUS[0]))
    svcs.start("target", ["--model", a.target_model, *common],
               cpus=None if gpu else str(ALL_CPUS[-1]))


def set_up(a, svcs, contenders: list[str], concurrency: list[int], dtype: str) -> Rig:
    from pearl.bench_local import load_pair
    from pearl.cluster import Cluster
    from specdec.models import load_model

    need_services = any(c in SERVED for c in contenders) or a.rss_check or a.rss_only
    http_port = free_port() if any(c in HTTP for c in contenders) else None
    replay = replay_file(a) if need_services and a.replay_acceptance is not None else None
    if need_services and not a.tiny:
        start_services(svcs, a, replay_args(replay, a.replay_acceptance) if replay else [])
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
        svcs.start("coordinator", ["--draft", rig.draft_address, "--target", rig.target_address,
                                   "--gamma", str(a.gamma), *http])
        rig.address = svcs.wait("coordinator", 120)  # the HTTP front starts before the port file
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


def kv_sizes(rig: Rig, a, dtype: str) -> dict:
    target_config = rig.target.model.config if rig.target.model else model_config(a.target_model)
    draft_config = rig.draft.model.config if rig.draft else model_config(a.draft_model)
    return {"target": kv_bytes("target", rig.target_address, target_config, dtype),
            "draft": kv_bytes("draft", rig.draft_address, draft_config, dtype)}


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
        print(divergence_text(records, found["divergences"]))
        print()
        print(found["table_md"])
    if rss:
        print("\nRSS MB after the first {first} / at the end: ".format(**rss) + ", ".join(
            f"{k} {rss['after_first_mb'][k]:.0f} / {rss['at_end_mb'][k]:.0f}"
            for k in rss["at_end_mb"] if rss["at_end_mb"][k]))
    for role, d in kv.items():
        print(f"KV bytes per token, {role}: {d['bytes']} ({d['source']})")
    print(goals_text(found["goals"], command))


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


def bench_load(a) -> int:
    from pearl.bench_local import ALL_CPUS
    from pearl.procs import running

    parsed = parse_load(a)
    if parsed is None:
        return 2
    contenders, concurrency = parsed
    dtype = "float32" if a.tiny else a.dtype
    split, command = hardware_split(a, dtype), command_line(a)
    print(f"pearl bench (load): {command}\nhardware split: {split}", flush=True)
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
