"""Start the three services as separate processes on loopback, and stop them cleanly.

Each service writes its bound port to a file once it is serving, so ports are chosen by the OS
(no races on "free" ports). Stopping sends SIGTERM (graceful), then SIGKILL after a grace period;
a context manager and signal handlers make sure nothing is left behind on Ctrl-C or failure.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from specdec.serving import wait_healthy


@dataclass
class Service:
    role: str
    proc: subprocess.Popen
    port_file: Path
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Services:
    """A set of service processes started by ``start``; ``stop`` ends them all."""

    def __init__(self, workdir: Path | None = None):
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pearl-"))
        self.all: dict[str, Service] = {}

    def start(self, role: str, args: list[str], cpus: str | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Service:
        """Start ``role``; ``cwd``: run the code of another checkout (its ``pearl`` package)."""
        port_file = self.dir / f"{role}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.dir / f"{role}.log"
        cmd = [sys.executable, "-m", "pearl.cli", "serve", role, "--host", "127.0.0.1",
               "--port", "0", "--port-file", str(port_file), *args]
        if cpus:
            cmd += ["--cpus", cpus]
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                cwd=cwd)
        log.close()
        svc = Service(role, proc, port_file, log_path)
        self.all[role] = svc
        return svc

    def wait(self, role: str, timeout_s: float = 900) -> str:
        """Wait until ``role`` has written its port and answers SERVING; return its address."""
        svc = self.all[role]
        deadline = time.monotonic() + timeout_s
        while not (svc.port_file.exists() and svc.port_file.read_text().strip()):
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{role} service exited with {svc.proc.returncode}:\n"
                                   + tail(svc.log_path))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role} service did not start in {timeout_s:.0f} s:\n"
                                   + tail(svc.log_path))
            time.sleep(0.2)
        wait_healthy(svc.address, max(5.0, deadline - time.monotonic()))
        return svc.address

    def stop(self, grace_s: float = 10) -> None:
        for svc in self.all.values():
            if svc.proc.poll() is None:
                svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for svc in self.all.values():
            try:
                svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def running(workdir: Path | None = None):
    """``with running() as svcs:`` stops every started service on exit, Ctrl-C and SIGTERM."""
    svcs = Services(workdir)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield svcs
    finally:
        svcs.stop()
        signal.signal(signal.SIGTERM, previous)
