"""Sessions spread over target replicas: aggregate throughput with 1, then 2 targets.

For each replica count n: one draft, n targets and one coordinator, each its own process on
loopback (one torch thread, float32), the coordinator given ``--target ipv4:127.0.0.1:P1,...``.
At each concurrency c and each mode (ar, pearl), c clients each send ``--requests-per-client``
requests one after the other (a closed loop), every request a different HumanEval prompt. Per
(n, c, mode): aggregate tok/s (all new tokens / the phase's wall time), p50 request latency, and
how many sessions the coordinator placed on each target (its own count, exact).

The coordinator runs in a child of this script (``--serve-coordinator``): the same
``coordinator.server.serve`` as ``pearl serve coordinator``, plus a file with its placement counts
(``Pool.counts``) rewritten every 0.2 s, which is how the table knows the sessions per replica.

Models: ``smollm2-135m-instruct`` (the default; fetched and converted once) or ``--tiny``, a tiny
random Qwen2 saved to a folder (seconds to start; the gRPC and scheduling work dominates). The
draft is the target's own model, so every draft token is accepted: the table measures spreading,
not speculation.

This machine's cores bound what more replicas can give: on 2 cores a second target cannot add
compute that the first one and the draft do not already use; the table shows that spreading works
(sessions per replica) and what it costs. On a machine with a core (or a GPU) per replica, the
same command shows the scaling.

    .venv/bin/python -m benchmarks.replicas                    # full: see --help for the run
    .venv/bin/python -m benchmarks.replicas --tiny --concurrency 1,4 --requests-per-client 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the children's working directory

MODEL = "smollm2-135m-instruct"
COUNTS_EVERY_S = 0.2


# -- the coordinator child ------------------------------------------------------------------------

def serve_coordinator(target: str, draft: str, port_file: str, counts_file: str) -> None:
    """``pearl serve coordinator`` on a free port, writing its placement counts as JSON."""
    from coordinator.server import serve

    async def main():
        server, servicer = await serve(target, draft, 0, "127.0.0.1")

        async def write_counts():
            while True:
                pools = {"target": servicer.targets, "draft": servicer.drafts}
                state = {role: {"placed": pool.counts(),
                                "serving": sorted(a for a, r in pool.replicas.items()
                                                  if r.serving and r.checked)}
                         for role, pool in pools.items() if pool is not None}
                tmp = counts_file + ".tmp"
                Path(tmp).write_text(json.dumps(state))
                os.replace(tmp, counts_file)
                await asyncio.sleep(COUNTS_EVERY_S)

        writer = asyncio.create_task(write_counts())
        Path(port_file + ".tmp").write_text(str(server.port))
        os.replace(port_file + ".tmp", port_file)
        await server.serve_until_signal(5)
        writer.cancel()
        await servicer.close()

    asyncio.run(main())


# -- processes ------------------------------------------------------------------------------------

class Proc:
    """One child process that writes its port to a file once it serves."""

    def __init__(self, name: str, cmd: list[str], workdir: Path):
        self.name, self.port_file = name, workdir / f"{name}.port"
        self.log = workdir / f"{name}.log"
        self.port_file.unlink(missing_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout_s: float = 600) -> str:
        from specdec.serving import wait_healthy

        deadline = time.monotonic() + timeout_s
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log.read_text().splitlines()[-30:])
                raise RuntimeError(f"{self.name} did not start (exit {self.proc.poll()}):\n{tail}")
            time.sleep(0.2)
        address = f"127.0.0.1:{int(self.port_file.read_text())}"
        wait_healthy(address, max(5.0, deadline - time.monotonic()))
        return address

    def stop(self, grace_s: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def serve_cmd(role: str, model: str, port_file: Path) -> list[str]:
    return [sys.executable, "-m", "pearl.cli", "serve", role, "--host", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), "--model", model, "--dtype", "float32",
            "--threads", "1"]


@contextlib.contextmanager
def fleet(n_targets: int, model: str, workdir: Path):
    """One draft, ``n_targets`` targets and a coordinator over them; yields the coordinator's
    address and a function returning its counts."""
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    try:
        def start(name, cmd):
            procs.append(Proc(name, cmd, workdir))
            return procs[-1]

        draft = start("draft", serve_cmd("draft", model, workdir / "draft.port"))
        targets = [start(f"target{i}", serve_cmd("target", model, workdir / f"target{i}.port"))
                   for i in range(n_targets)]
        draft_addr = draft.wait()
        target_addrs = [t.wait() for t in targets]
        counts_file = workdir / "coordinator.counts.json"
        coord = start("coordinator", [sys.executable, "-m", "benchmarks.replicas",
                                      "--serve-coordinator",
                                      "ipv4:" + ",".join(target_addrs), draft_addr,
                                      str(workdir / "coordinator.port"), str(counts_file)])
        address = coord.wait()

        def counts(settle: bool = True) -> dict:
            if settle:  # the file is rewritten every COUNTS_EVERY_S: let it catch up
                time.sleep(2 * COUNTS_EVERY_S)
            return json.loads(counts_file.read_text())

        deadline = time.monotonic() + 60  # every target watched and checked by the coordinator
        while not (counts_file.exists()
                   and len(counts(settle=False)["target"]["serving"]) == n_targets):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator does not see {n_targets} serving targets")
            time.sleep(0.2)
        yield address, target_addrs, counts
    finally:
        for p in reversed(procs):
            p.stop()


# -- load -----------------------------------------------------------------------------------------

def prompts(n: int, tiny: bool) -> list[str]:
    from pearl.demo import humaneval_prompt

    out = [humaneval_prompt(i % 164) for i in range(n)]
    return [p[-120:] for p in out] if tiny else out  # a character tokenizer: keep them short


def phase(address: str, mode: str, c: int, per_client: int, texts: list[str], new_tokens: int):
    """c clients, each sending ``per_client`` requests in turn; (tokens, wall s, latencies)."""
    from pearl.client import Client

    lock, latencies, tokens = threading.Lock(), [], [0]

    def client(k: int) -> None:
        with Client(address, timeout_s=600) as cl:
            for j in range(per_client):
                t0 = time.perf_counter()
                r = cl.complete(texts[(k * per_client + j) % len(texts)], mode=mode,
                                max_new_tokens=new_tokens, ignore_eos=True)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens[0] += len(r.token_ids)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as ex:
        list(ex.map(client, range(c)))
    return tokens[0], time.perf_counter() - t0, latencies


def spread(after: dict, before: dict, addrs: list[str]) -> list[int]:
    return [after.get(a, 0) - before.get(a, 0) for a in addrs]


def table(rows: list[dict], modes: list[str]) -> str:
    head = "| targets | clients | " + " | ".join(f"{m} tok/s | {m} sessions per target"
                                                 for m in modes) + " |"
    out = [head, "|" + " --- |" * (2 + 2 * len(modes))]
    keys = sorted({(r["replicas"], r["concurrency"]) for r in rows})
    for n, c in keys:
        cells = []
        for m in modes:
            r = next((r for r in rows if (r["replicas"], r["concurrency"], r["mode"]) == (n, c, m)),
                     None)
            cells += ([f"{r['tok_s']:.1f}", " / ".join(map(str, r["sessions"]))] if r
                      else ["-", "-"])
        out.append(f"| {n} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def tiny_folder(workdir: Path) -> str:
    """The tests' tiny random Qwen2 (specdec.models.tiny_loaded) saved for `pearl serve --model`."""
    from specdec.models import tiny_loaded

    folder = workdir / "tiny-model"
    loaded = tiny_loaded(2)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas",
                                description=__doc__.splitlines()[0])
    p.add_argument("--replicas", default="1,2", help="target replica counts to run, in turn")
    p.add_argument("--concurrency", default="1,4,8,16", help="concurrent clients")
    p.add_argument("--modes", default="ar,pearl")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default=MODEL, help="registry name or folder (draft and target)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead (seconds)")
    p.add_argument("--json", default="bench-out/bench-replicas.json")
    p.add_argument("--serve-coordinator", nargs=4, metavar=("TARGET", "DRAFT", "PORT_FILE",
                                                             "COUNTS_FILE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_coordinator:
        serve_coordinator(*a.serve_coordinator)
        return 0
    replicas = [int(x) for x in a.replicas.split(",")]
    conc = [int(x) for x in a.concurrency.split(",")]
    modes = a.modes.split(",")
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="pearl-replicas-"))
    if a.tiny:
        model = tiny_folder(work)
    else:
        from specdec import model_store

        model = str(model_store.resolve(a.model))  # converted once, not by two services at once
    texts = prompts(max(conc) * a.requests_per_client, a.tiny)
    label = "tiny random Qwen2" if a.tiny else a.model
    print(f"# {label}, draft = target model, float32, 1 torch thread per service; {cores} cores; "
          f"{a.requests_per_client} requests per client, {a.max_new_tokens} new tokens each; "
          f"logs in {work}", flush=True)
    rows = []
    t_start = time.monotonic()
    for n in replicas:
        with fleet(n, model, work / f"replicas-{n}") as (address, target_addrs, counts):
            for mode in modes:  # warm-up: one request per mode (not counted)
                phase(address, mode, 1, 1, texts, 8)
            for c in conc:
                for mode in modes:
                    before = counts()["target"]["placed"]
                    tokens, wall, lat = phase(address, mode, c, a.requests_per_client, texts,
                                              a.max_new_tokens)
                    sessions = spread(counts()["target"]["placed"], before, target_addrs)
                    if sum(sessions) != c * a.requests_per_client:
                        print(f"warning: {sum(sessions)} sessions counted for "
                              f"{c * a.requests_per_client} requests", flush=True)
                    row = {"replicas": n, "concurrency": c, "mode": mode, "tokens": tokens,
                           "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 2),
                           "p50_latency_s": round(statistics.median(lat), 3),
                           "sessions": sessions}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print(table(rows, modes))
    print()
    print(f"{cores} CPU cores for {1 + max(replicas)} model processes and a coordinator: more "
          "target replicas cannot add compute here; the table shows that sessions spread "
          "(sessions per target) and what spreading costs, not how throughput scales with "
          f"hardware. Took {time.monotonic() - t_start:.0f} s.")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": label, "cores": cores, "rows": rows,
                               "requests_per_client": a.requests_per_client,
                               "max_new_tokens": a.max_new_tokens}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
