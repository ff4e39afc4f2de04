"""The `pearl` command stays light: building its parser (every subcommand and flag, as
`pearl --help` does) loads neither torch nor transformers, nor the benchmarks (imported only when
`pearl bench` runs); the defaults come from specdec/defaults.py, which imports nothing."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "matplotlib", "benchmarks")

PROBE = f"""
import sys
import pearl.cli
try:
    pearl.cli.main(["--help"])
except SystemExit:
    pass
print("loaded:", ",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_pearl_help_imports_no_model_library():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: pearl" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), proc.stdout[-500:]
    assert last == "loaded:", f"`pearl --help` imported {last[7:]}"


def test_serve_flags_take_their_defaults_from_the_core(monkeypatch):
    import pearl.cli as cli
    from specdec import defaults

    for name in ("GAMMA", "GAMMA_MAX", "TREE_NODES", "DRAFT_TIMEOUT_S", "MAX_SESSIONS"):
        monkeypatch.delenv(f"PEARL_{name}", raising=False)
    seen = {}
    monkeypatch.setattr(cli, "cmd_serve", lambda a: seen.update(vars(a)))
    cli.main(["serve", "coordinator", "--target", "localhost:1"])
    assert seen["gamma"] == defaults.DEFAULT_GAMMA
    assert seen["gamma_max"] == defaults.DEFAULT_GAMMA_MAX
    assert seen["tree_nodes"] == defaults.DEFAULT_TREE_NODES
    assert seen["draft_timeout"] == defaults.DEFAULT_DRAFT_TIMEOUT_S
    assert seen["max_sessions"] == defaults.DEFAULT_MAX_SESSIONS


def test_bench_help_reaches_the_benchmarks_without_models():
    """`pearl bench SUBCOMMAND --help` is the benchmarks' own parser, still without torch."""
    probe = PROBE.replace('["--help"]', '["bench", "load", "--help"]')
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: pearl bench load" in proc.stdout and "--concurrency" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "loaded: benchmarks", proc.stdout[-500:]
