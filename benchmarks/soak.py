"""A bounded soak under load and faults: real service processes on loopback.

    python -m benchmarks.soak --seconds 600   (make soak SOAK_S=600; tests/test_soak.py: 75 s)

The target is smollm2-135m-instruct, the draft a noisy copy of it saved to a local folder (so
drafts are sometimes rejected), both float32 with one thread. ``clients`` threads send requests
of mixed modes (ar, sd, pearl) and sampling (greedy, and seeded temperature / top-k / top-p) for
``seconds``; some are cancelled after a few tokens, some get a short deadline. Meanwhile the
draft is killed (SIGKILL) and restarted every ``draft_period_s``, and the target once.

What is checked afterwards (``Report.problems``; empty means passed):

- every completed request has exactly its reference tokens. References come from undisturbed
  runs before the load, one request at a time: greedy, the ar run (the target's own greedy
  tokens), which sd and pearl must match too; sampled, each mode's own seeded run (sampled sd
  and pearl use a fixed window of 4: pearl's adaptive window follows measured times, and with
  other windows other positions would be drawn by the bonus rule). A sampled sd or pearl
  request that fell back to the target alone (``fell_back``) is exempt from equality: after the
  loss a different rule draws the tokens (coordinator/schedule.py's fallback: exact in
  distribution, not draw for draw), so for it only the length and the vocabulary are checked;
- every failed request failed with UNAVAILABLE, CANCELLED or DEADLINE_EXCEEDED, and the tokens
  it streamed before failing are a prefix of its reference (greedy requests and sampled ar
  ones; a sampled sd or pearl request may have fallen back before it failed);
- live sessions (GetLoad on every service; GetModelInfo.live_sessions on draft and target)
  return to 0 within 5 s of the load ending;
- the resident memory (RSS) of each service after the run has grown by at most 10 % over its RSS
  after the warm-up (the references, then 20 s of the same load without faults; a drop is no
  leak and passes); for a service restarted during the run, its RSS once it has served 16
  requests of the load since it came back stands for the warm-up. The draft is last restarted
  25 s before the end at the latest.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from pearl.procs import Services, running
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.serving import CHANNEL_OPTIONS

TARGET = "smollm2-135m-instruct"
# A small KV store: a 135M model needs little, and leaked sessions would fill it sooner.
COMMON = ["--dtype", "float32", "--threads", "1", "--kv-cache-tokens", "4096"]
MODES = {"ar": pb.MODE_AR, "sd": pb.MODE_SD, "pearl": pb.MODE_PEARL}
PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colours are",
    "Once upon a time, in a small village by the sea,",
]
SAMPLINGS = {  # name: (temperature, top_k, top_p, seed)
    "greedy": (0.0, 0, 1.0, 0),
    "t0.8-k20-p0.9": (0.8, 20, 0.9, 23),
}
EXPECTED_FAILURES = {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"}
LIVE_ZERO_WITHIN_S = 5.0
RSS_TOLERANCE = 0.10
WARM = 16  # requests a restarted service serves before its RSS baseline is taken
WARM_UP_S = 20.0  # the load without faults before the services' first RSS baseline


@dataclass(frozen=True)
class Kind:
    """One kind of request; each has one undisturbed reference."""

    prompt: int
    mode: str
    sampling: str
    new_tokens: int

    @property
    def ref_key(self) -> tuple:  # greedy output is the same in every mode
        return (self.prompt, "any" if self.sampling == "greedy" else self.mode, self.sampling,
                self.new_tokens)

    def request(self) -> pb.GenerateRequest:
        t, k, p, seed = SAMPLINGS[self.sampling]
        # Sampled: a fixed window. pearl's adaptive one follows measured times, and under load
        # the windows (so the positions drawn by the bonus rule) would differ from the
        # reference's. Greedy output does not depend on the windows: adaptive.
        return pb.GenerateRequest(
            prompt=PROMPTS[self.prompt], mode=MODES[self.mode], max_new_tokens=self.new_tokens,
            ignore_eos=True, gamma=0 if self.sampling == "greedy" else 4,
            sampling=pb.SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed))


KINDS = [Kind(p, m, s, n) for p in range(len(PROMPTS)) for m in MODES for s in SAMPLINGS
         for n in (16,)]


@dataclass
class Outcome:
    kind: Kind
    action: str  # "complete", "cancel" or "deadline"
    tokens: list[int]
    code: str  # "OK" or the status code's name
    detail: str = ""
    fell_back: bool = False
    ended: float = field(default_factory=time.monotonic)

    def served_by(self, role: str) -> bool:
        """Completed, with the draft's help when ``role`` is the draft."""
        return self.code == "OK" and (role != "draft" or (self.kind.mode != "ar"
                                                          and not self.fell_back))


@dataclass
class Report:
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)
    live_after: dict = field(default_factory=dict)
    rss_mb: dict = field(default_factory=dict)  # role: (after warm-up, after the run)
    warm_up: int = 0  # requests of the warm-up load (the first ones in ``outcomes``)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by_code = Counter(o.code for o in self.outcomes)
        by_action = Counter(o.action for o in self.outcomes)
        by_mode = Counter(o.kind.mode for o in self.outcomes)
        fell = sum(o.fell_back for o in self.outcomes)
        lines = [
            f"soak: {self.seconds:.0f} s of faults after {WARM_UP_S:g} s of warm-up load, "
            f"{len(self.outcomes)} requests ({self.warm_up} in the warm-up) "
            f"({', '.join(f'{k} {v}' for k, v in sorted(by_mode.items()))}; "
            f"{', '.join(f'{k} {v}' for k, v in sorted(by_action.items()))})",
            f"completed OK: {by_code.get('OK', 0)} ({fell} finished by the target alone after "
            "a draft loss)",
            "errors by code: " + (", ".join(f"{k} {v}" for k, v in sorted(by_code.items())
                                            if k != "OK") or "none"),
            *(f"  {code}: e.g. {detail[:160]!r} ({n}x)" for (code, detail), n in
              Counter((o.code, o.detail) for o in self.outcomes if o.code != "OK").most_common(4)),
            "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())),
            "live sessions after the load: " + ", ".join(
                f"{k} {v}" for k, v in self.live_after.items()),
            "RSS MB (after warm-up -> after run): " + ", ".join(
                f"{k} {a:.0f} -> {b:.0f} ({(b - a) / a:+.1%})"
                for k, (a, b) in self.rss_mb.items()),
            f"problems: {len(self.problems)}",
            *(f"  - {p}" for p in self.problems[:30]),
        ]
        return "\n".join(lines)


def make_draft(folder: Path, scale: float = 0.02) -> Path:
    """A noisy copy of the target saved as a local model folder, with the target's own
    tokenizer files (the coordinator insists both serve the same tokenizer)."""
    from specdec import model_store
    from specdec.models import load_model, noisy_copy

    src = Path(model_store.resolve(TARGET))
    if not (folder / "model.safetensors").exists():
        loaded = load_model(str(src), dtype="float32")
        noisy_copy(loaded, 1, scale).model.save_pretrained(folder)
        for f in src.iterdir():  # everything but the weights and config: the tokenizer
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, folder / f.name)
    return folder


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb(svc) -> float:
    return psutil.Process(svc.proc.pid).memory_info().rss / 2**20


def live_sessions(address: str, role: str) -> int:
    """The larger of GetLoad's and (draft, target) GetModelInfo's count of live sessions."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        n = pearl_pb2_grpc.LoadReportStub(ch).GetLoad(pb.LoadRequest(), timeout=10).live_sessions
        stub = {"draft": pearl_pb2_grpc.DraftServiceStub,
                "target": pearl_pb2_grpc.TargetServiceStub}.get(role)
        if stub is not None:
            info = stub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
            n = max(n, info.live_sessions)
        return n


def run_one(stub, kind: Kind, action: str, rng: random.Random) -> Outcome:
    timeout = rng.uniform(0.3, 3.0) if action == "deadline" else 300
    cancel_after = rng.randint(1, 8) if action == "cancel" else None
    call = stub.Generate(kind.request(), timeout=timeout, wait_for_ready=True)
    tokens: list[int] = []
    try:
        for resp in call:
            if resp.HasField("stats"):
                return Outcome(kind, action, tokens, "OK", fell_back=resp.stats.fell_back)
            tokens.extend(resp.token_ids)
            if cancel_after is not None and len(tokens) >= cancel_after:
                call.cancel()
        return Outcome(kind, action, tokens, "NO_STATS", "stream ended without statistics")
    except grpc.RpcError as e:
        return Outcome(kind, action, tokens, e.code().name, e.details() or "")


def client_loop(address: str, seed: int, stop: threading.Event, out: list[Outcome],
                lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = pearl_pb2_grpc.CoordinatorStub(ch)
        while not stop.is_set():
            kind = rng.choice(KINDS)
            action = rng.choices(["complete", "cancel", "deadline"], [0.7, 0.15, 0.15])[0]
            o = run_one(stub, kind, action, rng)
            with lock:
                out.append(o)
            if o.code == "UNAVAILABLE":
                time.sleep(1.0)  # a service is restarting: do not spin


def restart(svcs: Services, role: str, args: list[str], kill_sig=signal.SIGKILL,
            down_s: float = 1.0) -> None:
    old = svcs.all[role]
    port = old.port
    old.proc.send_signal(kill_sig)
    old.proc.wait()
    time.sleep(down_s)
    svcs.start(role, [*args, "--port", str(port)])  # the last --port wins
    svcs.wait(role, 300)


def fault_loop(svcs: Services, args: dict[str, list[str]], seconds: float, draft_period_s: float,
               stop: threading.Event, faults: Counter, rng: random.Random,
               baseline: dict[str, tuple[int, float]], quiet: threading.Event,
               outcomes: list[Outcome]) -> None:
    """Kill and restart the draft every ~``draft_period_s`` and the target once until ``stop``;
    ``baseline`` gets each restarted service's (pid, RSS) once it has served WARM requests
    (given up after 120 s). Sets ``quiet`` once stopped with every baseline taken and 10 s of
    load after the last one."""
    t0 = time.monotonic()
    target_at = seconds * 0.45
    next_draft = draft_period_s * rng.uniform(0.6, 1.0)
    target_done = False
    due: dict[str, float] = {}  # role: when it came back, until its baseline RSS is taken
    last = 0.0
    while True:
        now = time.monotonic() - t0
        for role, back in list(due.items()):
            served = sum(o.ended > back + t0 and o.served_by(role) for o in list(outcomes))
            if served >= WARM or now > back + 120:
                svc = svcs.all[role]
                if served >= WARM:
                    baseline[role] = (svc.proc.pid, rss_mb(svc))
                del due[role]
                last = now
        if stop.is_set() and target_done:
            if not due and now >= last + 10:
                quiet.set()
                return
            time.sleep(0.2)
            continue
        if not target_done and now >= target_at:
            say("killing the target")
            restart(svcs, "target", args["target"], down_s=rng.uniform(0.5, 2))
            say("target back")
            due["target"] = time.monotonic() - t0
            faults["target killed and restarted"] += 1
            target_done = True
        elif now >= next_draft and now < seconds - 25:
            say("killing the draft")
            restart(svcs, "draft", args["draft"], down_s=rng.uniform(0.5, 3))
            say("draft back")
            due["draft"] = time.monotonic() - t0
            faults["draft killed and restarted"] += 1
            next_draft = now + draft_period_s * rng.uniform(0.8, 1.2)
        time.sleep(0.2)


def references(address: str) -> tuple[dict, list[str]]:
    """Undisturbed outputs, one request at a time: greedy by ar alone (the target's own greedy
    tokens), sampled by each mode with its seed."""
    refs: dict[tuple, list[int]] = {}
    problems = []
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        stub = pearl_pb2_grpc.CoordinatorStub(ch)
        for kind in KINDS:
            if kind.ref_key in refs or (kind.sampling == "greedy" and kind.mode != "ar"):
                continue
            o = run_one(stub, kind, "complete", random.Random(0))
            if o.code != "OK" or o.fell_back:
                problems.append(f"reference run {kind} failed: {o.code} {o.detail} "
                                f"(fell back: {o.fell_back})")
                continue
            refs[kind.ref_key] = o.tokens
    return refs, problems


def check(outcomes: list[Outcome], refs: dict, vocab: int) -> list[str]:
    problems = []
    for o in outcomes:
        ref = refs.get(o.kind.ref_key)
        exact = ref is not None and not (o.fell_back and o.kind.sampling != "greedy")
        what = f"{o.kind.mode} {o.kind.sampling} prompt {o.kind.prompt} ({o.action})"
        if o.code == "OK":
            if len(o.tokens) != o.kind.new_tokens or any(not 0 <= t < vocab for t in o.tokens):
                problems.append(f"{what}: {len(o.tokens)} tokens or ids outside the vocabulary")
            elif exact and o.tokens != ref:
                problems.append(f"{what}: tokens differ from the reference (fell back: "
                                f"{o.fell_back}): {o.tokens} vs {ref}")
        else:
            if o.code not in EXPECTED_FAILURES:
                problems.append(f"{what}: failed with {o.code}: {o.detail}")
            # sampled sd/pearl may have fallen back before failing: no prefix check for them
            if (ref is not None and (o.kind.sampling == "greedy" or o.kind.mode == "ar")
                    and o.tokens != ref[:len(o.tokens)]):
                problems.append(f"{what}: streamed tokens are not a prefix of the reference: "
                                f"{o.tokens} vs {ref}")
    return problems


def soak(seconds: float = 600, clients: int = 8, draft_period_s: float = 30.0,
         workdir: Path | None = None, seed: int = 0) -> Report:
    from specdec import model_store

    rep = Report(seconds)
    rng = random.Random(seed)
    with running(workdir) as svcs:
        draft_dir = make_draft(svcs.dir / "draft-model")
        args = {"draft": ["--model", str(draft_dir), *COMMON],
                "target": ["--model", str(model_store.resolve(TARGET)), *COMMON]}
        svcs.start("draft", args["draft"])
        svcs.start("target", args["target"])
        draft, target = svcs.wait("draft", 300), svcs.wait("target", 300)
        svcs.start("coordinator", ["--draft", draft, "--target", target, "--draft-timeout", "5"])
        coord = svcs.wait("coordinator", 300)
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
            vocab = pearl_pb2_grpc.TargetServiceStub(ch).GetModelInfo(
                pb.ModelInfoRequest(), timeout=30).vocab_size

        t0 = time.monotonic()
        refs, rep.problems = references(coord)  # also the warm-up
        say(f"references: {len(refs)} runs in {time.monotonic() - t0:.0f} s; "
            f"load for {seconds:g} s")

        stop, end_faults, quiet = threading.Event(), threading.Event(), threading.Event()
        baseline: dict[str, tuple[int, float]] = {}
        lock = threading.Lock()
        threads = [threading.Thread(target=client_loop, args=(coord, seed * 100 + i, stop,
                                                              rep.outcomes, lock), daemon=True)
                   for i in range(clients)]
        faulter = threading.Thread(target=fault_loop, args=(svcs, args, seconds, draft_period_s,
                                                            end_faults, rep.faults, rng,
                                                            baseline, quiet, rep.outcomes),
                                   daemon=True)
        for t in threads:
            t.start()
        time.sleep(WARM_UP_S)
        baseline.update({role: (svc.proc.pid, rss_mb(svc)) for role, svc in svcs.all.items()})
        with lock:
            rep.warm_up = len(rep.outcomes)
        faulter.start()
        started = time.monotonic()
        time.sleep(seconds)
        end_faults.set()  # a restart in progress finishes and is measured under load
        quiet.wait(900)
        stop.set()
        rep.seconds = time.monotonic() - started
        faulter.join()
        for t in threads:
            t.join(timeout=330)
        ended = time.monotonic()
        rep.faults["requests cancelled"] = sum(o.action == "cancel" for o in rep.outcomes)
        rep.faults["short deadlines"] = sum(o.action == "deadline" for o in rep.outcomes)

        for role, svc in svcs.all.items():
            while (n := live_sessions(svc.address, role)) and (
                    time.monotonic() - ended < LIVE_ZERO_WITHIN_S):
                time.sleep(0.1)
            rep.live_after[role] = n
            if n:
                rep.problems.append(f"{role}: {n} live sessions {LIVE_ZERO_WITHIN_S:g} s after "
                                    "the load ended")
        for role, svc in svcs.all.items():
            pid, before = baseline[role]
            if pid != svc.proc.pid:
                rep.problems.append(f"{role}: no baseline RSS of its last start (it served "
                                    f"fewer than {WARM} requests in 120 s)")
                continue
            after = rss_mb(svc)
            rep.rss_mb[role] = (before, after)
            if after - before > RSS_TOLERANCE * before:
                rep.problems.append(f"{role}: RSS {before:.0f} MB after warm-up, {after:.0f} MB "
                                    f"after the run ({(after - before) / before:+.1%})")
        rep.problems += check(rep.outcomes, refs, vocab)
        if not any(o.code == "OK" for o in rep.outcomes):
            rep.problems.append("no request completed")
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--draft-period", type=float, default=30.0,
                   help="seconds between draft kills")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rep = soak(a.seconds, a.clients, a.draft_period, seed=a.seed)
    print(rep.summary(), flush=True)
    return 1 if rep.problems else 0


if __name__ == "__main__":
    sys.exit(main())
