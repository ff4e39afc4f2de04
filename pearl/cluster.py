"""The three services in one process on loopback ports: for tests and the benches' --tiny runs."""

import asyncio
import threading

from coordinator.server import serve as serve_coordinator
from draft_service.server import serve as serve_draft
from specdec.defaults import DEFAULT_GAMMA, DEFAULT_GAMMA_MAX
from target_service.server import serve as serve_target


class Cluster:
    """Draft, target and coordinator servers on a background event loop."""

    def __init__(self, draft, target, gamma: int = DEFAULT_GAMMA,
                 gamma_max: int = DEFAULT_GAMMA_MAX,
                 draft_kw: dict | None = None, target_kw: dict | None = None,
                 coordinator_kw: dict | None = None):
        """``*_kw``: extra keyword arguments of each service's ``serve`` (TLS, limits)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers, self.servicers = [], []  # all stopped and closed by close()
        self.draft_server = self.target_server = self.draft = None
        if draft is not None:
            self.draft_server, self.draft = self.call(serve_draft(draft, 0, "127.0.0.1",
                                                                  **(draft_kw or {})))
            self.add(self.draft_server, self.draft)
        self.target_server, self.target = self.call(serve_target(target, 0, "127.0.0.1",
                                                                 **(target_kw or {})))
        self.add(self.target_server, self.target)
        self.coord_server, self.coordinator = self.call(serve_coordinator(
            f"127.0.0.1:{self.target_server.port}",
            f"127.0.0.1:{self.draft_server.port}" if draft is not None else None,
            0, "127.0.0.1", gamma, gamma_max, **(coordinator_kw or {})))
        self.address = f"127.0.0.1:{self.coord_server.port}"
        self.draft_address = f"127.0.0.1:{self.draft_server.port}" if draft is not None else None
        self.target_address = f"127.0.0.1:{self.target_server.port}"

    def add(self, server, servicer) -> None:
        """A server started beside the cluster's (a restarted service): ``close`` stops it and
        closes its servicer too."""
        self.servers.append(server)
        self.servicers.append(servicer)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=600)

    def close(self) -> None:
        self.call(self.coord_server.stop(1))
        self.call(self.coordinator.close())
        for s in self.servers:
            self.call(s.stop(1))
        for servicer in self.servicers:  # their engines' threads and KV stores
            self.call(servicer.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
