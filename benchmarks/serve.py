"""`pearl bench serve`: an open-loop serving benchmark.

Requests arrive as a Poisson process at each ``--request-rate`` (requests/s), and each is sent at
its arrival time whether or not earlier ones have finished (open loop, unlike the closed loop of
`pearl bench load`, benchmarks/load.py). The workload mixes HumanEval completions,
chats sharing one long system prompt, and two-turn conversations whose turn 2 arrives when turn 1
ends (benchmarks/workload.py); the same seed gives the same requests at every rate and for every
contender. Every request is streamed, so its first token is observed. Each phase tags its prompts
so that none finds an earlier phase's in the services' prefix cache: every phase starts cold.

Contenders: ``ar``, ``sd``, ``pearl``, ``hidden-transfer`` through the real services (processes
on loopback started as the load bench starts them: draft on the first CPU, target on the last,
one thread each) and transformers' continuous batching of the target alone in this process
(``hf-cb-1t``: one thread on the target's CPU; ``hf-cb-all``: every core; prefix sharing on, the
services' token budget per step, a fresh manager per phase). At each rate every contender runs
once, in an order rotated from one rate to the next, after one warm-up request of each kind.

Per contender and rate: TTFT, TPOT and end-to-end latency (p50 and p99), throughput (new tok/s,
completed requests/s) and goodput (requests/s meeting both ``--ttft-slo-s`` and ``--tpot-slo-s``);
definitions in benchmarks/serve_report.py. Output: a printed table, a Markdown table for the
README, ``--json`` (every request's record, with the services' ``cached_prompt_tokens``) and
``--chart`` (TTFT p50, TPOT p50 and goodput against the request rate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

from benchmarks import serve_report as report
from benchmarks.hardware import hardware_split
from benchmarks.hf import CBResults
from benchmarks.load import set_up
from benchmarks.serve_report import Turn, record
from benchmarks.services import SERVICE
from benchmarks.workload import (arrival_times, first_turn, function_names, parse_mix,
                                 second_turn, system_prompt, workload)
from specdec.defaults import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MODELS

CB = ("hf-cb-1t", "hf-cb-all")
CONTENDERS = SERVICE + CB
# For a 2-core CPU and the default pair (the load bench: ar ~3 tok/s alone, ~20 tok/s at 8
# concurrent; pearl ~25): light load, moderate, and about ar's capacity (with the mix 1:1:1 an
# arrival asks for 1.33 requests, ~64 new tokens at 48 each)
DEFAULT_RATES, DEFAULT_REQUESTS = "0.1,0.2,0.4", 20
# SLOs for that CPU, from a smoke run: a request is good when its first token comes within 10 s
# (a cold ~1,000-token system prompt takes 5-15 s to prefill on the target's one core beside
# other requests) and the rest at no more than 0.6 s a token (ar alone: ~0.3 s; at 0.5 requests/s
# of 16 tokens: 0.44-0.6 s)
DEFAULT_TTFT_SLO_S, DEFAULT_TPOT_SLO_S = 10.0, 0.6
DEFAULT_JSON, DEFAULT_CHART = "docs/data/bench-serve.json", "docs/bench-serve.png"
CB_SLOTS = 16  # most requests in transformers' running batch (hf-cb); more wait in its queue
NEW_TOKENS = 48  # per request


def parse(a) -> tuple[list[str], list[float], dict[str, float]]:
    """The contenders, the rates and the mix; ValueError says what is wrong."""
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        raise ValueError(f"unknown contenders {unknown}; choose from {','.join(CONTENDERS)}")
    try:
        rates = sorted({float(x) for x in a.request_rate.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--request-rate takes a comma list of numbers, got "
                         f"{a.request_rate!r}") from None
    if not rates or min(rates) <= 0:
        raise ValueError("every --request-rate must be > 0")
    if (a.num_requests is not None and a.num_requests < 1) or (a.duration_s or 1) <= 0:
        raise ValueError("--num-requests and --duration-s must be > 0")
    if a.device == "cuda":
        contenders = [c for c in contenders if c != "hf-cb-1t"]
    return contenders, rates, parse_mix(a.mix)


# -- the open loop --------------------------------------------------------------------------------


def open_loop(arrivals: list, run) -> list[dict]:
    """Each arrival's ``run(arrival, t0)`` started in its own thread at ``t0 + arrival.at``
    (``t0``: the phase's start, a perf_counter time), whatever the earlier ones are doing; their
    records, in arrival order."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, len(arrivals)), thread_name_prefix="arrival") as ex:
        futures = []
        for arr in arrivals:
            time.sleep(max(0.0, t0 + arr.at - time.perf_counter()))
            futures.append(ex.submit(run, arr, t0))
        return [r for f in futures for r in f.result()]


def conversation(name: str, rate: float, send, system: str, prompts: list[dict],
                 tag: str = ""):
    """``run`` for :func:`open_loop`: one arrival's request, and for a two-turn conversation
    turn 2 as soon as turn 1 ends; prompts marked with the phase's ``tag``.
    ``send(payload, seed, t0)`` -> :class:`Turn`."""

    def run(arr, t0: float) -> list[dict]:
        one = send(first_turn(arr, system, prompts, tag), 2 * arr.index, t0)
        recs = [record(name, rate, arr, 1, arr.at, one)]
        if arr.kind == "two-turn" and one.error is None:
            two = send(second_turn(arr, prompts, one.text, tag), 2 * arr.index + 1, t0)
            recs.append(record(name, rate, arr, 2, one.end, two))
        return recs

    return run


def service_sender(client, mode: str, m: int, gamma: int, temperature: float):
    """``send`` through the coordinator: streamed, so the first token is seen when it comes."""
    from pearl.client import Delta

    def send(payload, seed: int, t0: float) -> Turn:
        now = lambda: time.perf_counter() - t0  # noqa: E731
        t = Turn(now(), None, 0.0)
        try:
            for part in client.generate(payload, mode=mode, max_new_tokens=m,
                                        gamma=gamma if mode == "sd" else 0,
                                        temperature=temperature,
                                        seed=seed if temperature > 0 else None):
                if isinstance(part, Delta):
                    if part.token_ids and t.first is None:
                        t.first = now()
                    t.ids += part.token_ids
                    t.text += part.text
                else:
                    t.stats = part.stats
        except Exception as e:  # a failed request is a record, not the end of the run
            t.error = f"{type(e).__name__}: {e}"[:500]
        t.end = now()
        return t

    return send


def cb_sender(hf, mgr, results: CBResults, tokenizer, name: str, m: int):
    """``send`` to transformers' continuous-batching manager (chats rendered with the target's
    chat template, as the coordinator renders them); the first token's time is the manager's
    own timestamp of it."""
    ids_of = itertools.count()

    def send(payload, seed: int, t0: float) -> Turn:
        ids = render(tokenizer, payload)
        rid = f"{name}-{next(ids_of)}"
        t = Turn(time.perf_counter() - t0, None, 0.0, stats={"prompt_tokens": len(ids)})
        try:
            mgr.add_request(ids, request_id=rid, max_new_tokens=m, record_timestamps=True)
            res, end = results.wait(rid, name)
        except RuntimeError as e:
            t.error, t.end = str(e)[:500], time.perf_counter() - t0
            return t
        t.ids = hf.cut(res.generated_tokens)
        t.text = tokenizer.decode(t.ids, skip_special_tokens=True)
        t.first = res.timestamps[0] - t0 if res.timestamps else None
        t.end = end - t0
        return t

    return send


def render(tokenizer, payload: str | list[dict]) -> list[int]:
    """The token ids the coordinator makes of a prompt text or a conversation."""
    if isinstance(payload, str):
        return tokenizer.encode(payload)
    return list(tokenizer.apply_chat_template(payload, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


# -- phases ---------------------------------------------------------------------------------------


class Bench:
    """What the phases share: the rig of the load bench (services, the target or its tokenizer,
    transformers' target), the HumanEval prompts, the shared system prompt and the settings."""

    def __init__(self, rig, a, prompts: list[dict], system: str):
        self.rig, self.a, self.prompts, self.system = rig, a, prompts, system
        self.tokenizer = rig.target.tokenizer
        self.mix = parse_mix(a.mix)
        self.phases = 0  # phases run so far, warm-ups included: the next phase's tag

    def phase(self, name: str, rate: float, arrivals: list, m: int) -> list[dict]:
        """One phase; its prompts tagged with its number (benchmarks/workload.py)."""
        self.phases += 1
        run = partial(conversation, name, rate, system=self.system, prompts=self.prompts,
                      tag=f"{self.phases:03d}")
        if name in CB:
            return self.cb_phase(name, arrivals, m, run)
        from pearl.client import Client

        with Client(self.rig.address) as client:  # one channel; its streams run side by side
            return open_loop(arrivals, run(service_sender(client, name, m, self.a.gamma,
                                                          self.a.temperature)))

    def cb_phase(self, name: str, arrivals: list, m: int, run) -> list[dict]:
        """One manager for the phase, with prefix sharing (as the services' prefix cache) and
        the services' token budget per step, its paged cache sized for :data:`CB_SLOTS`
        requests of the longest prompt any turn can have."""
        hf = self.rig.hf
        longest = max(len(render(self.tokenizer, first_turn(arr, self.system, self.prompts,
                                                            "000"))) for arr in arrivals)
        longest += 2 * m + 64  # turn 2: turn 1, its answer and the follow-up
        cfg, gen = hf.cb_configs(min(len(arrivals), CB_SLOTS), [{"ids": [0] * longest}], m)
        cfg.allow_block_sharing = True
        cfg.max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS  # prefills chunked as the services chunk
        if self.a.temperature > 0:
            gen.do_sample, gen.temperature = True, self.a.temperature
        with hf.pinned(name), hf.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cfg, warmup=False) as mgr:
            results = CBResults(mgr)
            try:
                return open_loop(arrivals, run(cb_sender(hf, mgr, results, self.tokenizer,
                                                         name, m)))
            finally:
                results.close()

    def arrivals(self, rate: float) -> list:
        a = self.a
        n = None if a.duration_s is not None else (a.num_requests or DEFAULT_REQUESTS)
        times = arrival_times(rate, a.seed, n=n, duration=a.duration_s)
        return workload(times, self.mix, a.seed, len(self.prompts), function_names(self.system))

    def run(self, contenders: list[str], rates: list[float]) -> list[dict]:
        """A warm-up of each contender (one short request of each kind, not recorded), then
        every contender at every rate, the order rotated from one rate to the next."""
        first = self.arrivals(rates[0])
        kinds = dict.fromkeys(x.kind for x in first)  # each kind's first arrival, all at once
        warm = [replace(next(x for x in first if x.kind == k), index=i, at=0.0)
                for i, k in enumerate(kinds)]
        for name in contenders:
            self.phase(name, 0.0, warm, min(4, self.a.max_new_tokens))
        records: list[dict] = []
        for ri, rate in enumerate(rates):
            arrivals = self.arrivals(rate)
            k = ri % len(contenders)
            for name in contenders[k:] + contenders[:k]:
                t = time.monotonic()
                recs = self.phase(name, rate, arrivals, self.a.max_new_tokens)
                records += recs
                s = report.summarize(recs, self.a.ttft_slo_s, self.a.tpot_slo_s)
                print(f"  {name} at {rate:g} req/s: {s['requests']} requests "
                      f"({s['errors']} failed), TTFT p50 {s['ttft_p50_s'] or 0:.2f} s, "
                      f"{s['tokens_per_s']:.2f} tok/s, goodput {s['goodput_rps']:.3f} req/s "
                      f"({time.monotonic() - t:.0f} s)", flush=True)
                if s["errors"]:
                    print("    first error: " + next(r["error"] for r in recs if r["error"]),
                          flush=True)
        return records


# -- the run --------------------------------------------------------------------------------------


def load_args(a) -> argparse.Namespace:
    """The flags the load bench's set-up reads: this bench's models and services; no tiny
    models, replaying draft or RSS check."""
    return argparse.Namespace(**{**vars(a), "tiny": False, "rss_check": False,
                                 "rss_only": False, "replay_acceptance": None,
                                 "requests_per_client": 1, "duration": None, "out": "bench-out"})


def prepare(rig, a) -> Bench:
    """The HumanEval prompts (all 164) and the shared system prompt, in the target's tokens."""
    from benchmarks.prompts import load_prompts

    tok = rig.target.tokenizer
    prompts = load_prompts("humaneval", 164, tok, False)
    system = system_prompt([p["text"] for p in prompts], a.system_tokens,
                           lambda s: len(tok.encode(s)))
    print(f"shared system prompt: {len(tok.encode(system))} tokens, "
          f"{len(function_names(system))} functions", flush=True)
    return Bench(rig, a, prompts, system)


def command_line(a) -> str:
    parts = ["pearl bench serve", f"--request-rate {a.request_rate}"]
    if a.duration_s is not None:
        parts.append(f"--duration-s {a.duration_s:g}")
    else:
        parts.append(f"--num-requests {a.num_requests or DEFAULT_REQUESTS}")
    parts += [f"--max-new-tokens {a.max_new_tokens}", f"--contenders {a.contenders}",
              f"--mix {a.mix}", f"--seed {a.seed}"]
    for flag, value, default in (("--temperature", a.temperature, 0.0),
                                 ("--system-tokens", a.system_tokens, 1000),
                                 ("--draft-model", a.draft_model, DEFAULT_MODELS["draft"]),
                                 ("--target-model", a.target_model, DEFAULT_MODELS["target"]),
                                 ("--device", a.device, "cpu"),
                                 ("--serve-args", a.serve_args, "")):
        if value != default:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def run(a) -> int:
    """The serve bench of the parsed flags ``a``; the exit status."""
    from pearl.procs import running

    try:
        contenders, rates, mix = parse(a)
    except ValueError as e:
        print(f"pearl bench serve: {e}", file=sys.stderr)
        return 2
    la, command, t_start = load_args(a), command_line(a), time.monotonic()
    split = hardware_split(CB, False, a.device, a.dtype, None)
    print(f"pearl bench serve: {command}\nhardware split: {split}", flush=True)
    with running() as svcs:
        rig = set_up(la, svcs, contenders, [], a.dtype)
        try:
            bench = prepare(rig, a)
            print(f"ready in {time.monotonic() - t_start:.0f} s", flush=True)
            records = bench.run(contenders, rates)
        finally:
            rig.close()
    found = report.phases(records, contenders, rates, a.ttft_slo_s, a.tpot_slo_s)
    table_md = report.markdown(found, a.ttft_slo_s, a.tpot_slo_s)
    print("\n" + report.detail(found))
    print(f"\n(TTFT: sent to first token; TPOT: (end - first token) / (tokens - 1); e2e: sent to "
          f"end; tok/s and req/s done over the phase's wall time; goodput: requests/s with TTFT "
          f"<= {a.ttft_slo_s:g} s and TPOT <= {a.tpot_slo_s:g} s; cached tok: the services' "
          "cached_prompt_tokens per request, 0 where they do not report it)\n")
    print(table_md)
    config = {"command": command, "draft_model": a.draft_model, "target_model": a.target_model,
              "dtype": a.dtype, "device": a.device, "rates": rates, "contenders": contenders,
              "num_requests": None if a.duration_s else a.num_requests or DEFAULT_REQUESTS,
              "duration_s": a.duration_s, "seed": a.seed,
              "mix": mix, "system_tokens": len(bench.tokenizer.encode(bench.system)),
              "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
              "gamma": a.gamma, "ttft_slo_s": a.ttft_slo_s, "tpot_slo_s": a.tpot_slo_s,
              "hardware_split": split, "serve_args": a.serve_args}
    result = {"config": config, "definitions": report.__doc__,
              "phases": {n: {f"{r:g}": s for r, s in by.items()} for n, by in found.items()},
              "table_md": table_md, "records": records,
              "elapsed_s": time.monotonic() - t_start}
    out, png = Path(a.json), Path(a.chart)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    report.chart(png, found, f"{a.target_model}, {a.max_new_tokens} new tokens")
    print(f"\nwrote {out} and {png} ({result['elapsed_s']:.0f} s in all)")
    return 0
