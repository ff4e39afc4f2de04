"""`pearl bench`: the benchmarks' command line.

    pearl bench latency ...   one request at a time against transformers (benchmarks/latency.py)
    pearl bench load ...      many at once, in a closed loop (benchmarks/load.py)
    pearl bench serve ...     arrivals at a rate, in an open loop (benchmarks/serve.py)

The `pearl` command hands everything after `bench` to :func:`main`, importing this package only
then. Each subcommand owns its flags; those every bench takes come from :func:`add_pair`.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import latency, latency_run, load, serve, workload
from specdec.defaults import (DEFAULT_DTYPE, DEFAULT_MODELS, DEFAULT_NEW_TOKENS,
                              DEFAULT_PAIR_GAMMA, DTYPES)


def add_pair(p: argparse.ArgumentParser, contenders: tuple[str, ...], new_tokens: int) -> None:
    """The flags every bench takes: the pair, its dtype and device, sd's window, the contenders
    and the new tokens of each request."""
    p.add_argument("--draft-model", default=DEFAULT_MODELS["draft"])
    p.add_argument("--target-model", default=DEFAULT_MODELS["target"])
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: every service and the in-process contenders on the one GPU (the "
                        "-1t contenders are CPU-only and skipped)")
    p.add_argument("--gamma", type=int, default=DEFAULT_PAIR_GAMMA,
                   help="sd's fixed window (the latency bench: hf-assisted's fixed window too)")
    p.add_argument("--contenders", default=",".join(contenders),
                   help=f"comma list of {','.join(contenders)}")
    p.add_argument("--max-new-tokens", type=int, default=new_tokens)


def add_harness(p: argparse.ArgumentParser, out: str) -> None:
    """Tiny models, a replaying draft, and the folder for what the run writes besides."""
    p.add_argument("--tiny", action="store_true",
                   help="tiny random models built in code, services in this process (CI)")
    p.add_argument("--replay-acceptance", type=float, default=None,
                   help="benchmarking draft (models with random weights, e.g. random:qwen2.5-7b):"
                        " the draft proposes the target's own greedy token with this probability "
                        "(draft_service/replay.py); times the schedule, not a real pair")
    p.add_argument("--out", default="bench-out", help=f"folder for {out}")


def add_latency(sub) -> None:
    p = sub.add_parser("latency", help="one request at a time: ar/sd/pearl against "
                                       "transformers' generation",
                       description=latency.__doc__.splitlines()[0])
    add_pair(p, latency_run.CONTENDERS, DEFAULT_NEW_TOKENS)
    add_harness(p, "results.json, chart.png and replay.jsonl")
    p.add_argument("--prompts", type=int, default=8, help="prompts per set")
    p.add_argument("--set", default="both", choices=["humaneval", "prose", "both"])
    sweep = latency_run.SWEEP
    p.add_argument("--sweep", action="store_true",
                   help=f"also sd and pearl with fixed gamma {sweep[0]}..{sweep[-1]} (pearl "
                        "adaptive is `pearl`)")
    p.set_defaults(fn=latency.run)


def add_load(sub) -> None:
    p = sub.add_parser("load", help="many requests at once: closed-loop clients at each "
                                    "concurrency", description=load.__doc__.splitlines()[0])
    add_pair(p, load.CONTENDERS, load.DEFAULTS["max_new_tokens"])
    add_harness(p, "replay.jsonl")
    p.add_argument("--concurrency", default=load.DEFAULTS["concurrency"],
                   help="comma list of concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds each phase keeps sending (instead of --requests-per-client)")
    p.add_argument("--json", default=None, help=f"results JSON path (default {load.DEFAULT_JSON}; "
                                                 f"with --tiny {load.TINY_JSON})")
    p.add_argument("--chart", default=None, help=f"throughput chart PNG path (default "
                                                  f"{load.DEFAULT_CHART}; with --tiny "
                                                  f"{load.TINY_CHART})")
    p.add_argument("--rss-check", action="store_true",
                   help="also a mixed load of --rss-requests requests through the services; RSS "
                        "after the first 20 against RSS at the end")
    p.add_argument("--rss-only", action="store_true", help="the RSS check alone")
    p.add_argument("--rss-requests", type=int, default=200)
    p.add_argument("--rss-concurrency", type=int, default=4)
    p.add_argument("--serve-args", default="",
                   help="extra `pearl serve` flags for the draft and target services")
    p.set_defaults(fn=load.run)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="open-loop serving bench: Poisson arrivals, mixed workload",
                       description=serve.__doc__.splitlines()[0])
    add_pair(p, serve.CONTENDERS, serve.NEW_TOKENS)
    p.add_argument("--request-rate", default=serve.DEFAULT_RATES,
                   help=f"comma list of arrival rates, requests/s (default {serve.DEFAULT_RATES})")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--num-requests", type=int, default=None,
                   help=f"arrivals per rate (default {serve.DEFAULT_REQUESTS}; a two-turn "
                        "conversation is one arrival)")
    n.add_argument("--duration-s", type=float, default=None,
                   help="per rate: every arrival within this many seconds, instead")
    p.add_argument("--seed", type=int, default=0, help="arrival times and the workload")
    p.add_argument("--mix", default=workload.DEFAULT_MIX,
                   help=f"request kinds' weights ({workload.DEFAULT_MIX})")
    p.add_argument("--system-tokens", type=int, default=1000,
                   help="length of the shared system prompt, tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--ttft-slo-s", type=float, default=serve.DEFAULT_TTFT_SLO_S,
                   help=f"goodput: most seconds to the first token (default "
                        f"{serve.DEFAULT_TTFT_SLO_S})")
    p.add_argument("--tpot-slo-s", type=float, default=serve.DEFAULT_TPOT_SLO_S,
                   help=f"goodput: most seconds per later token (default "
                        f"{serve.DEFAULT_TPOT_SLO_S})")
    p.add_argument("--json", default=serve.DEFAULT_JSON, help="results JSON path")
    p.add_argument("--chart", default=serve.DEFAULT_CHART, help="chart PNG path")
    p.add_argument("--serve-args", default="",
                   help="extra `pearl serve` flags for the draft and target services")
    p.set_defaults(fn=serve.run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pearl bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="{latency,load,serve}")
    for add in (add_latency, add_load, add_serve):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    sys.exit(a.fn(a))
