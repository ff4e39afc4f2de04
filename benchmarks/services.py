"""The service processes a bench starts (pearl/procs.py) and the modes they serve as contenders.

On a CPU the draft runs on the first core and the target on the last, one torch thread each; on
a GPU both share it, one torch thread each too (more only spin against the other processes'
launch threads). The coordinator is unpinned.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.hardware import ALL_CPUS

SERVICE = ("ar", "sd", "pearl", "hidden-transfer")  # the coordinator's modes


def start_pair(svcs, draft_model: str, target_model: str, device: str, dtype: str,
               serve_args: Sequence[str] = (), extra_draft: Sequence[str] = (), **code) -> None:
    """Start the draft and target services (they load while the caller loads what it needs);
    ``serve_args``: more `pearl serve` flags for both, ``extra_draft`` for the draft alone;
    ``code``: the ``cwd`` and ``env`` of another checkout whose code they run."""
    gpu = device == "cuda"
    common = ["--device", device, "--dtype", dtype, "--threads", "1", *serve_args]
    svcs.start("draft", ["--model", draft_model, *common, *extra_draft],
               cpus=None if gpu else str(ALL_CPUS[0]), **code)
    svcs.start("target", ["--model", target_model, *common],
               cpus=None if gpu else str(ALL_CPUS[-1]), **code)


def start_coordinator(svcs, draft: str, target: str, args: Sequence[str] = (), **code) -> str:
    """Start a coordinator over ``draft`` and ``target`` (addresses) and wait for it; its
    address. Its HTTP front, where ``args`` ask for one, starts before its port file."""
    svcs.start("coordinator", ["--draft", draft, "--target", target, *args], **code)
    return svcs.wait("coordinator", 120)
