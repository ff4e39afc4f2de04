"""Many replicas (coordinator/replicas.py): target strings resolve into replicas, sessions go to
the least-loaded healthy one, a full / draining / dead replica gets none, and outputs stay the
target's own. In process with tiny models (a fleet of servers on one event loop), except the
kill -9 test, which runs its targets as processes (slow)."""

import asyncio
import copy
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from conftest import greedy_reference
from coordinator.replicas import Pool, Replica, parse_address, resolve
from coordinator.server import serve as serve_coordinator
from draft_service.server import serve as serve_draft
from pearl.client import Client, Delta, Result
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.models import LoadedModel
from target_service.server import serve as serve_target

PROMPTS = [[5, 17, 33, 2, 9, 41], [7, 7, 80, 3], [100, 3, 55, 21, 8, 9, 13, 2], [42, 6]]
N = 16
MODES = ("ar", "sd", "pearl")


def twin(loaded: LoadedModel) -> LoadedModel:
    """The same weights in a model object of its own (each replica holds its own copy)."""
    return LoadedModel(loaded.name, copy.deepcopy(loaded.model), loaded.tokenizer, loaded.device,
                       loaded.dtype)


def ipv4(ports) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


class Fleet:
    """Draft, target and coordinator servers, any number of each, on one background loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.drafts: list = []  # (server, servicer)
        self.targets: list = []
        self.coordinators: list = []

    def call(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def add_draft(self, loaded, port: int = 0, **kw):
        self.drafts.append(self.call(serve_draft(twin(loaded), port, "127.0.0.1", **kw)))
        return self.drafts[-1]

    def add_target(self, loaded, port: int = 0, **kw):
        self.targets.append(self.call(serve_target(twin(loaded), port, "127.0.0.1", **kw)))
        return self.targets[-1]

    def add_coordinator(self, target: str, draft: str | None, poll_s: float | None = None):
        server, servicer = self.call(serve_coordinator(target, draft, 0, "127.0.0.1"))
        if poll_s is not None:
            for pool in (servicer.targets, servicer.drafts):
                if pool is not None:
                    pool.poll_s = poll_s
        self.coordinators.append((server, servicer))
        return f"127.0.0.1:{server.port}", servicer

    def close(self) -> None:
        for server, servicer in self.coordinators:
            self.call(server.stop(0.5))
            self.call(servicer.close())
        for server, _ in self.drafts + self.targets:
            self.call(server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def placed(servicer, role: str) -> dict[str, int]:
    return (servicer.targets if role == "target" else servicer.drafts).counts()


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def refs(tiny_target):
    return [greedy_reference(tiny_target, p, N) for p in PROMPTS]


def complete(address: str, i: int) -> Result:
    with Client(address, timeout_s=120) as c:
        return c.complete(PROMPTS[i % len(PROMPTS)], mode=MODES[i % len(MODES)],
                          max_new_tokens=N, ignore_eos=True)


# -- target strings and the choice, without servers ------------------------------------------

def test_target_strings_parse():
    t = parse_address("ipv4:127.0.0.1:50052,127.0.0.1:50062")
    assert t.addresses == ("127.0.0.1:50052", "127.0.0.1:50062") and not t.dynamic
    assert parse_address("ipv6:[::1]:5,[::1]:6").addresses == ("[::1]:5", "[::1]:6")
    d = parse_address("dns:///target-headless.pearl.svc:50052")
    assert (d.host, d.port, d.dynamic) == ("target-headless.pearl.svc", 50052, True)
    assert parse_address("dns:localhost:7").host == "localhost"
    assert parse_address("target:50052").addresses == ("target:50052",)  # dialled as it is
    for bad in ("ipv4:", "ipv4:1.2.3.4", "dns:///nohost", ""):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_dns_resolves_every_address():
    addrs = asyncio.run(resolve(parse_address("dns:///localhost:50052")))
    assert "127.0.0.1:50052" in addrs, addrs
    assert asyncio.run(resolve(parse_address("dns:///no-such-host.invalid:1"))) == []


def _pool(*replicas: Replica) -> Pool:
    async def make():
        return Pool("target", "ipv4:127.0.0.1:1", [])
    p = asyncio.run(make())
    p.replicas = {r.address: r for r in replicas}
    return p


def _replica(name: str, **kw) -> Replica:
    return Replica(name, channel=None, serving=True, checked=True, **kw)


def test_pick_least_loaded_counting_other_coordinators():
    a, b, c = _replica("a", own=2), _replica("b", live=5, own_at_poll=0), _replica("c", own=1)
    assert _pool(a, b, c).pick() is c  # b holds 5 sessions of other coordinators
    c.own = 3
    assert _pool(a, b, c).pick() is a


def test_pick_rotates_on_ties_and_skips_unusable_replicas():
    rs = [_replica(n) for n in "abc"]
    pool = _pool(*rs)
    chosen = []
    for _ in range(6):
        r = pool.pick()
        r.last_placed = time.monotonic()
        chosen.append(r.address)
    assert chosen == list("abcabc")
    rs[0].serving = False
    rs[1].draining = True
    assert pool.pick() is rs[2]
    rs[2].live, rs[2].limit = 4, 4  # at its limit: still asked when nothing else is left
    assert pool.pick() is rs[2]  # (a limit seen by polling may be stale; its answer is not)
    assert pool.pick(exclude={rs[2]}) is None
    assert pool.why_none().code == grpc.StatusCode.UNAVAILABLE
    rs[0].serving, rs[1].draining = True, False
    rs[0].refused_until = time.monotonic() + 60  # refused a session a moment ago
    assert pool.pick() is rs[1]


# -- a fleet on loopback ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tiny_draft, tiny_target):
    """2 drafts, 3 targets, 2 coordinators given `ipv4:` lists of them."""
    f = Fleet()
    for _ in range(2):
        f.add_draft(tiny_draft)
    for _ in range(3):
        f.add_target(tiny_target)
    drafts = ipv4(s.port for s, _ in f.drafts)
    targets = ipv4(s.port for s, _ in f.targets)
    f.coords = [f.add_coordinator(targets, drafts) for _ in range(2)]
    yield f
    f.close()


def test_sessions_spread_evenly_and_outputs_are_the_targets_own(fleet, refs):
    """60 concurrent mixed requests through two coordinators (stateless: either serves any
    request): each target gets 20 +- 30 %, every output equals the target's greedy output."""
    before = [placed(s, "target") for _, s in fleet.coords]
    with ThreadPoolExecutor(60) as ex:
        results = list(ex.map(lambda i: complete(fleet.coords[i % 2][0], i), range(60)))
    for i, r in enumerate(results):
        assert r.token_ids == refs[i % len(PROMPTS)], (i, MODES[i % len(MODES)])
        assert not r.stats["fell_back"], r.stats["fallback_reason"]
    per_target = {s.port: 0 for s, _ in fleet.targets}
    for (_, servicer), old in zip(fleet.coords, before):
        for addr, n in placed(servicer, "target").items():
            per_target[port_of(addr)] += n - old.get(addr, 0)
    assert sum(per_target.values()) == 60
    assert all(14 <= n <= 26 for n in per_target.values()), per_target
    drafts = {}
    for _, servicer in fleet.coords:
        for addr, n in placed(servicer, "draft").items():
            drafts[addr] = drafts.get(addr, 0) + n
    assert len(drafts) == 2 and min(drafts.values()) >= 0.35 * sum(drafts.values()), drafts


def test_plain_host_port_is_one_replica(fleet, refs):
    target = f"127.0.0.1:{fleet.targets[0][0].port}"
    address, servicer = fleet.add_coordinator(target, None)
    assert list(servicer.targets.replicas) == [target]
    assert complete(address, 0).token_ids == refs[0]


def test_a_replica_at_its_limit_is_skipped_not_failed(tiny_draft, tiny_target, refs):
    """A target at --max-sessions 1, its slot held by another client: every request succeeds on
    the other one, whether the coordinator knew the limit from GetLoad or learnt it from the
    refusal (polling off)."""
    f = Fleet()
    try:
        full, _ = f.add_target(tiny_target, max_sessions=1)
        free, _ = f.add_target(tiny_target)
        targets = ipv4([full.port, free.port])
        ch = grpc.insecure_channel(f"127.0.0.1:{full.port}")
        hold = threading.Event()

        def requests():
            yield pb.VerifyRequest(start=pb.VerifyStart(session_id="hold", prompt_ids=[1, 2],
                                                        first_token=True))
            hold.wait(60)

        call = pearl_pb2_grpc.TargetServiceStub(ch).Verify(requests())
        next(call)  # the slot is taken
        try:
            for poll_s in (0.2, 3600.0):  # knows the load / learns it from RESOURCE_EXHAUSTED
                address, servicer = f.add_coordinator(targets, None, poll_s=poll_s)
                time.sleep(0.5)
                for i in range(4):
                    r = complete(address, 3 * i)  # mode ar
                    assert r.token_ids == refs[(3 * i) % len(PROMPTS)]
                counts = placed(servicer, "target")
                assert counts[f"127.0.0.1:{free.port}"] == 4, counts
        finally:
            hold.set()
            call.cancel()
            ch.close()
    finally:
        f.close()


def test_a_draining_draft_finishes_its_sessions_and_gets_no_new_ones(tiny_draft, tiny_target,
                                                                      refs):
    """SIGTERM's drain (Server.stop with a grace period) on one of two drafts while requests run
    through it: they finish with the draft (no fallback) and new ones go to the other draft."""
    f = Fleet()
    try:
        d0, d0_servicer = f.add_draft(tiny_draft)
        d1, _ = f.add_draft(tiny_draft)
        f.add_target(tiny_target)
        address, servicer = f.add_coordinator(ipv4([f.targets[0][0].port]),
                                              ipv4([d0.port, d1.port]))
        slow = d0_servicer.runner.run

        async def slower(fn, *args):  # d0's forwards take 20 ms: its sessions outlast the drain
            await asyncio.sleep(0.02)
            return await slow(fn, *args)

        d0_servicer.runner.run = slower
        clients = [Client(address, timeout_s=60) for _ in range(4)]
        streams = [c.generate(PROMPTS[0], mode="pearl", max_new_tokens=N, ignore_eos=True)
                   for c in clients]
        firsts = [next(s) for s in streams]
        assert all(isinstance(x, Delta) for x in firsts)
        on_d0 = d0.guard.active
        assert on_d0 >= 1, "no session landed on the first draft"
        drain = asyncio.run_coroutine_threadsafe(d0.stop(30), f.loop)
        time.sleep(0.3)  # the health watch hears NOT_SERVING
        before = placed(servicer, "draft")[f"127.0.0.1:{d0.port}"]
        later = [complete(address, 2) for _ in range(3)]  # pearl
        for r in later:
            assert r.token_ids == refs[2] and not r.stats["fell_back"], r.stats["fallback_reason"]
        assert placed(servicer, "draft")[f"127.0.0.1:{d0.port}"] == before
        for first, s in zip(firsts, streams):
            rest = list(s)
            assert first.token_ids + [t for p in rest[:-1] for t in p.token_ids] == refs[0]
            assert not rest[-1].stats["fell_back"], rest[-1].stats["fallback_reason"]
        drain.result(timeout=30)
        for c in clients:
            c.close()
    finally:
        f.close()


# -- kill -9 a target process -------------------------------------------------------------------

def serve_tiny_target(port_file: str, port: int) -> None:
    """A target process holding the tiny test model (as conftest builds it)."""
    import torch

    from specdec.models import tiny_loaded

    torch.set_num_threads(1)

    async def main():
        server, _ = await serve_target(tiny_loaded(2), port, "127.0.0.1")
        Path(port_file + ".tmp").write_text(str(server.port))
        os.replace(port_file + ".tmp", port_file)
        await server.serve_until_signal(5)

    asyncio.run(main())


def start_target(tmp: Path, name: str, port: int = 0) -> tuple[subprocess.Popen, Path]:
    pf = tmp / f"{name}.port"
    pf.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, str(pf), str(port)],
                            cwd=Path(__file__).parents[1], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "w"))
    return proc, pf


def wait_port(proc, pf: Path, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while not pf.exists():
        assert proc.poll() is None, f"target exited with {proc.returncode}"
        assert time.monotonic() < deadline, "target did not start"
        time.sleep(0.1)
    return int(pf.read_text())


@pytest.mark.slow
def test_a_killed_target_fails_only_its_sessions_and_is_used_again_after_restart(
        tiny_draft, tiny_target, refs, tmp_path):
    procs = [start_target(tmp_path, f"t{i}") for i in range(3)]
    f = Fleet()
    try:
        ports = [wait_port(p, pf) for p, pf in procs]
        address, servicer = f.add_coordinator(ipv4(ports), None)
        victim = f"127.0.0.1:{ports[0]}"
        clients = [Client(address, timeout_s=60) for _ in range(9)]
        streams = [c.generate(PROMPTS[1], mode="ar", max_new_tokens=400, ignore_eos=True)
                   for c in clients]
        for s in streams:
            assert isinstance(next(s), Delta)
        on_victim = servicer.targets.replicas[victim].own
        assert on_victim == 3, placed(servicer, "target")
        os.kill(procs[0][0].pid, signal.SIGKILL)
        procs[0][0].wait()
        failed, finished = 0, 0
        for s in streams:
            try:
                r = list(s)[-1]
                assert isinstance(r, Result) and len(r.token_ids) == 400
                finished += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                failed += 1
        assert (failed, finished) == (on_victim, 9 - on_victim)
        for i in range(6):  # later requests all succeed, on the others
            assert complete(address, 3 * i).token_ids == refs[(3 * i) % len(PROMPTS)]
        assert servicer.targets.replicas[victim].own == 0
        before = placed(servicer, "target")[victim]
        procs[0] = start_target(tmp_path, "t0-again", ports[0])
        wait_port(*procs[0])
        deadline = time.monotonic() + 30
        while placed(servicer, "target")[victim] == before:  # it gets new sessions again
            assert time.monotonic() < deadline, "the restarted target got no sessions"
            assert complete(address, 0).token_ids == refs[0]
        for c in clients:
            c.close()
    finally:
        f.close()
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":  # the target process of the kill -9 test
    sys.path.insert(0, str(Path(__file__).parents[1]))
    serve_tiny_target(sys.argv[1], int(sys.argv[2]))
