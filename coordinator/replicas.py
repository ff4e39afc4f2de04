"""Many replicas behind one address: the coordinator spreads sessions over draft and target pods.

A gRPC channel to one name keeps one connection to one backend (pick_first), so a Deployment
scaled up behind a ClusterIP Service would still see every stream land on one pod. Here each
``--draft`` / ``--target`` is a gRPC target string resolved into replicas, one channel each:

- ``ipv4:10.0.0.1:50052,10.0.0.2:50052`` and ``ipv6:[::1]:50052,[::1]:50062``: a fixed list;
- ``dns:///target-headless.pearl.svc:50052`` (or ``dns:host:port``): every address the name
  resolves to, re-resolved every ``resolve_s`` (a headless Service lists its ready pods);
- ``host:port`` (or ``unix:...``): one replica, dialled as it is (gRPC resolves the name).

Each replica is watched (``Replica``): the standard health service's ``Watch`` stream says whether
it is SERVING (a pod that drains on SIGTERM turns NOT_SERVING at once; a killed one breaks the
stream), and ``LoadReport.GetLoad`` is polled every ``poll_s`` for the sessions it holds from
every coordinator, its ``--max-sessions`` and whether it drains. A pool (``Pool``) places a new
session on the least-loaded usable replica: load = the replica's own count at the last poll, less
this coordinator's sessions then, plus this coordinator's sessions now (exact and immediate); ties
go to the replica chosen longest ago, so equal loads rotate (round robin is the floor). Usable
means SERVING, not draining, below its limit, not refused recently, and sharing the tokenizer of
the pool's first replica. A session stays on its replica for its whole life (one stream).

``Pool.place`` opens the stream and waits for the server's headers (``specdec.limits`` sends them
the moment its ``CallGuard`` accepts the session, before any model work): a replica that refuses
(RESOURCE_EXHAUSTED at its limit, UNAVAILABLE while draining) is skipped for ``refused_s`` and the
next one is tried, so a full replica is skipped, not failed. The draft and the target each get a
pool and are chosen independently: the two never talk to each other (every message goes through
the coordinator), so the locality that matters is coordinator to replica, not draft to target.
"""

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.security import ClientTLS, aio_channel

log = logging.getLogger("pearl.replicas")

POLL_S = 1.0  # GetLoad period per replica
RESOLVE_S = 10.0  # dns: re-resolution period
REFUSED_S = 2.0  # a replica that refused a session gets none for this long
ACCEPT_TIMEOUT_S = 10.0  # a session's headers must arrive within this
WATCH_BACKOFF_S = (0.25, 2.0)  # first and longest pause before watching a lost replica again


@dataclass(frozen=True)
class Address:
    """A parsed gRPC target string (``--draft``, ``--target``): fixed ``addresses``, or a
    ``host`` and ``port`` to resolve."""

    text: str
    addresses: tuple[str, ...] = ()
    host: str = ""
    port: int = 0

    @property
    def dynamic(self) -> bool:
        return bool(self.host)


def parse_address(text: str) -> Address:
    """``ipv4:a:p,b:p``, ``ipv6:[a]:p,...``, ``dns:[//authority/]host:port``, or one address."""
    text = text.strip()
    if not text:
        raise ValueError("empty target address")
    scheme, _, rest = text.partition(":")
    if scheme in ("ipv4", "ipv6"):
        addrs = tuple(a.strip() for a in rest.split(",") if a.strip())
        if not addrs:
            raise ValueError(f"{text}: no addresses after {scheme}:")
        for a in addrs:
            _split_host_port(a, text)
        return Address(text, addrs)
    if scheme == "dns":
        if rest.startswith("//"):  # dns://[authority]/host:port; a DNS server authority is not used
            rest = rest[2:].partition("/")[2]
        host, port = _split_host_port(rest, text)
        return Address(text, host=host, port=port)
    return Address(text, (text,))  # host:port, unix:..., or anything else gRPC dials as it is


def _split_host_port(hostport: str, text: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, sep, port = hostport[1:].partition("]:")
    else:
        host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text}: {hostport!r} is not HOST:PORT")
    return host, int(port)


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(t: Address) -> list[str]:
    """The addresses ``t`` stands for now (sorted; empty when a name does not resolve)."""
    if not t.dynamic:
        return list(t.addresses)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(t.host, t.port,
                                                             type=socket.SOCK_STREAM)
    except OSError as e:
        log.warning("%s: cannot resolve %s: %s", t.text, t.host, e)
        return []
    return sorted({_join(info[4][0], t.port) for info in infos})


@dataclass(eq=False)
class Replica:
    """One backend process as this coordinator sees it."""

    address: str
    channel: grpc.aio.Channel
    serving: bool = False  # the health service says SERVING
    checked: bool = False  # its tokenizer was compared with the pool's
    unfit: str = ""  # why it may never be used (another tokenizer)
    live: int = 0  # sessions it reported at the last poll, from every coordinator
    own_at_poll: int = 0  # this coordinator's sessions on it when that poll was answered
    own: int = 0  # this coordinator's sessions on it now
    limit: int = 0  # its --max-sessions (0: none)
    draining: bool = False
    refused_until: float = 0.0
    refused_code: str = ""  # the status of its last refusal (RESOURCE_EXHAUSTED: full)
    placed: int = 0  # sessions ever placed on it by this coordinator
    last_placed: float = 0.0
    tasks: list[asyncio.Task] = field(default_factory=list)

    def load(self) -> int:
        return max(0, self.live - self.own_at_poll) + self.own

    def usable(self, now: float) -> bool:
        return (self.serving and self.checked and not self.unfit and not self.draining
                and now >= self.refused_until and not (self.limit and self.load() >= self.limit))


class NoReplica(RuntimeError):
    """No replica of a pool took the session; ``code`` is what the client should get."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        super().__init__(message)
        self.code = code


class Pool:
    """The replicas of one role (``draft`` or ``target``) behind one address."""

    def __init__(self, role: str, address: str, options, tls: ClientTLS | None = None,
                 poll_s: float = POLL_S, resolve_s: float = RESOLVE_S,
                 refused_s: float = REFUSED_S):
        self.role, self.address = role, parse_address(address)
        self.service = pb.DESCRIPTOR.services_by_name[
            {"draft": "DraftService", "target": "TargetService"}[role]].full_name
        self.options, self.tls = list(options), tls
        if tls is not None and self.address.dynamic:  # certificates name the service, not pod IPs
            self.options.append(("grpc.ssl_target_name_override", self.address.host))
        self.poll_s, self.resolve_s, self.refused_s = poll_s, resolve_s, refused_s
        self.replicas: dict[str, Replica] = {}
        self.info: pb.ModelInfoResponse | None = None  # the first replica's facts: the reference
        self.changed = asyncio.Event()  # set whenever a replica's state changes (for waiters)
        self._resolver: asyncio.Task | None = None

    def _stub(self, channel):
        return (pearl_pb2_grpc.DraftServiceStub if self.role == "draft"
                else pearl_pb2_grpc.TargetServiceStub)(channel)

    # -- membership -----------------------------------------------------------------------------

    async def start(self, timeout_s: float = 600) -> pb.ModelInfoResponse:
        """Resolve, watch every replica, and return the model facts of the first that answers."""
        await self._update(await resolve(self.address))
        if self.address.dynamic:
            self._resolver = asyncio.create_task(self._resolve_loop())
        deadline = time.monotonic() + timeout_s
        while self.info is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {self.role} replica of {self.address.text} answered within "
                                   f"{timeout_s:g} s")
            await self._wait_changed(min(left, 1.0))
        return self.info

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_s if self.replicas else min(self.resolve_s, 1.0))
            await self._update(await resolve(self.address))

    async def _update(self, addresses: list[str]) -> None:
        if self.address.dynamic and not addresses and self.replicas:
            return  # a failed lookup keeps what we have
        for addr in addresses:
            if addr not in self.replicas:
                r = Replica(addr, aio_channel(addr, self.options, self.tls))
                r.tasks = [asyncio.create_task(self._watch(r)), asyncio.create_task(self._poll(r))]
                self.replicas[addr] = r
                log.info("%s replica %s added (%s)", self.role, addr, self.address.text)
        for addr in [a for a in self.replicas if a not in addresses]:
            r = self.replicas.pop(addr)
            log.info("%s replica %s removed (no longer in %s)", self.role, addr, self.address.text)
            asyncio.create_task(self._retire(r))
        self._notify()

    async def _retire(self, r: Replica) -> None:
        """Stop watching a replica that left; its channel closes once its sessions ended."""
        for t in r.tasks:
            t.cancel()
        while r.own:
            await asyncio.sleep(1.0)
        await r.channel.close()

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
        for r in self.replicas.values():
            for t in r.tasks:
                t.cancel()
            await r.channel.close()
        self.replicas.clear()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def _wait_changed(self, timeout_s: float) -> None:
        try:  # asyncio.timeout, not wait_for (docs/design.md section 11)
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()
        except TimeoutError:
            pass

    # -- watching one replica -------------------------------------------------------------------

    async def _watch(self, r: Replica) -> None:
        """Follow the replica's health; on the first SERVING, check it is fit for the pool."""
        pause = WATCH_BACKOFF_S[0]
        stub = health_pb2_grpc.HealthStub(r.channel)
        while True:
            broken = True
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=self.service),
                                  wait_for_ready=True)
                async for resp in call:
                    if resp.status != health_pb2.HealthCheckResponse.SERVING:
                        # Not serving (draining): let go of the stream, which would hold a
                        # draining server until its grace period ends; ask again later.
                        call.cancel()
                        broken = False
                        break
                    if not r.checked:
                        await self._check(r)
                    r.serving, r.draining = True, False
                    pause = WATCH_BACKOFF_S[0]
                    self._notify()
            except grpc.RpcError:
                pass
            if r.serving:
                log.warning("%s replica %s %s", self.role, r.address,
                            "lost" if broken else "not serving")
            r.serving = False
            if broken:  # perhaps a new process when it comes back: check it again
                r.checked, r.live = False, 0
            self._notify()
            await asyncio.sleep(pause)
            pause = min(pause * 2, WATCH_BACKOFF_S[1])

    async def _check(self, r: Replica) -> None:
        """Model facts once per (re)start: the first replica sets the reference tokenizer."""
        info = await self._stub(r.channel).GetModelInfo(pb.ModelInfoRequest(), timeout=60)
        if self.info is None:
            self.info = info
        elif (info.tokenizer_json != self.info.tokenizer_json
              or info.vocab_size != self.info.vocab_size):
            r.unfit = (f"{self.role} replica {r.address} serves {info.model}, whose tokenizer "
                       f"differs from {self.info.model}'s")
            log.error("%s; it gets no sessions", r.unfit)
        r.checked = True

    async def _poll(self, r: Replica) -> None:
        stub = pearl_pb2_grpc.LoadReportStub(r.channel)
        while True:
            if r.serving:
                try:
                    resp = await stub.GetLoad(pb.LoadRequest(), timeout=max(1.0, 2 * self.poll_s))
                    r.live, r.own_at_poll = resp.live_sessions, r.own
                    r.limit, r.draining = resp.max_sessions, resp.draining
                except grpc.RpcError:
                    pass  # the health watch decides whether it is gone
            await asyncio.sleep(self.poll_s)

    # -- placing sessions -----------------------------------------------------------------------

    def pick(self, exclude=()) -> Replica | None:
        """The least-loaded usable replica not in ``exclude``; ties: the one chosen longest ago."""
        now = time.monotonic()
        ok = [r for r in self.replicas.values() if r not in exclude and r.usable(now)]
        if not ok:  # a recent refusal or a polled limit is a preference, not a ban: when no
            # other replica is left, ask again (the replica's own answer is the truth)
            ok = [r for r in self.replicas.values() if r not in exclude and r.serving
                  and r.checked and not r.unfit and not r.draining]
        if not ok:
            return None
        return min(ok, key=lambda r: (r.load() / r.limit if r.limit else r.load(), r.last_placed))

    def why_none(self) -> NoReplica:
        rs = list(self.replicas.values())
        if rs and all(r.serving and r.limit and r.load() >= r.limit for r in rs):
            return NoReplica(f"every {self.role} replica is at its session limit; retry later",
                             grpc.StatusCode.RESOURCE_EXHAUSTED)
        states = ", ".join(f"{r.address} {self.state(r)}" for r in rs) or "none resolved"
        return NoReplica(f"no {self.role} replica of {self.address.text} takes sessions "
                         f"({states})")

    def state(self, r: Replica) -> str:
        if r.unfit:
            return "unfit"
        if not r.serving:
            return "down"
        if r.draining:
            return "draining"
        if time.monotonic() < r.refused_until:
            return f"refused: {r.refused_code}"
        return f"{r.load()}/{r.limit or '-'} sessions"

    async def place(self, open_link: Callable[[grpc.aio.Channel, asyncio.Queue], Any],
                    events: asyncio.Queue) -> tuple[Replica, Any]:
        """Open a session's stream on the best replica that accepts it; raises NoReplica.

        ``open_link(channel, queue)`` opens a link (coordinator/links.py); its events go to
        ``events`` once the replica accepted the session (a refusal's error goes nowhere). The
        replica's count of this coordinator's sessions drops when the link's reader ends."""
        tried: set[Replica] = set()
        last: NoReplica | None = None
        while (r := self.pick(tried)) is not None:
            tried.add(r)
            r.own += 1
            r.placed += 1
            r.last_placed = time.monotonic()
            private: asyncio.Queue = asyncio.Queue()
            link = open_link(r.channel, private)
            try:
                refusal = await link.refusal(ACCEPT_TIMEOUT_S)
            except BaseException:  # the request was cancelled meanwhile
                r.own -= 1
                link.cancel()
                raise
            if refusal is None:
                link.events = events
                link.reader.add_done_callback(lambda _, r=r: self._release(r))
                return r, link
            r.own -= 1
            link.cancel()
            code, detail = refusal
            r.refused_until = time.monotonic() + self.refused_s
            r.refused_code = code.name
            log.info("%s replica %s refused a session (%s: %s); trying another", self.role,
                     r.address, code.name, detail)
            last = NoReplica(f"{self.role} stream failed: {code.name}: {detail}",
                             code if code == grpc.StatusCode.RESOURCE_EXHAUSTED
                             else grpc.StatusCode.UNAVAILABLE)
        raise last or self.why_none()

    def _release(self, r: Replica) -> None:
        r.own -= 1

    def counts(self) -> dict[str, int]:
        """Sessions placed per replica by this coordinator (for tests and logs)."""
        return {a: r.placed for a, r in self.replicas.items()}
