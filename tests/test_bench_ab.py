"""benchmarks/ab.py: which processes of arm b run another revision's code, and that a process
started so imports that code, not this checkout's."""

import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import ab


class Recorder:
    """Stands in for pearl.procs.Services: records what is started, answers every wait."""

    def __init__(self, arm: str):
        self.arm, self.started = arm, {}

    def start(self, role, args, cpus=None, env=None, cwd=None):
        self.started[role] = {"args": args, "cpus": cpus, "env": env, "cwd": cwd}

    def wait(self, role, timeout_s=900):
        return f"{self.arm}-{role}:1"


def arms_for(*flags: str):
    a = ab.parse([*flags, "--concurrency", "1,8", "--modes", "ar,pearl"])
    arms = {"a": Recorder("a"), "b": Recorder("b")}
    tree = Path("/tmp/some-tree") if a.rev_b else None
    return a, arms, ab.start_arms(a, arms, tree)


def test_whole_runs_every_process_of_arm_b_from_the_worktree():
    a, arms, address = arms_for("--rev-b", "HEAD~1", "--whole")
    assert a.concurrency == [1, 8] and a.modes == ["ar", "pearl"]
    assert set(arms["b"].started) == {"draft", "target", "coordinator"}
    for role, s in arms["b"].started.items():
        assert s["cwd"] == Path("/tmp/some-tree"), role
        assert s["env"] == {"PYTHONPATH": "/tmp/some-tree"}, role
    for role, s in arms["a"].started.items():
        assert s["cwd"] is None and not s["env"], role
    # each arm its own pair, the same flags and cores: only the code differs
    for role in ("draft", "target"):
        assert arms["a"].started[role]["args"] == arms["b"].started[role]["args"]
        assert arms["a"].started[role]["cpus"] == arms["b"].started[role]["cpus"]
    assert arms["b"].started["coordinator"]["args"][:4] == ["--draft", "b-draft:1", "--target",
                                                             "b-target:1"]
    assert address == {"a": "a-coordinator:1", "b": "b-coordinator:1"}
    assert ab.label(a) == "draft, target and coordinator at HEAD~1"


def test_rev_b_alone_runs_only_the_coordinator_from_the_worktree():
    a, arms, address = arms_for("--rev-b", "HEAD~1")
    assert set(arms["b"].started) == {"coordinator"}  # on arm a's draft and target
    coord = arms["b"].started["coordinator"]
    assert coord["cwd"] == Path("/tmp/some-tree") and coord["args"][:4] == [
        "--draft", "a-draft:1", "--target", "a-target:1"]


def test_wait_ms_b_changes_only_the_flag():
    a, arms, _ = arms_for("--wait-ms-b", "0", "--wait-ms", "2")
    for role in ("draft", "target"):
        sa, sb = arms["a"].started[role], arms["b"].started[role]
        assert sb["cwd"] is None and not sb["env"]
        assert sa["args"][sa["args"].index("--max-batch-wait-ms") + 1] == "2.0"
        assert sb["args"][sb["args"].index("--max-batch-wait-ms") + 1] == "0.0"


def test_whole_needs_a_revision():
    with pytest.raises(SystemExit):
        ab.parse(["--wait-ms-b", "0", "--whole"])


def test_a_process_of_arm_b_imports_the_worktree_code(tmp_path):
    """The venv's editable install maps the packages to this checkout; started as arm b's
    processes are, a child finds every package in the tree instead."""
    tree = tmp_path / "tree"
    for name in ab.PACKAGES:
        (tree / name).mkdir(parents=True)
        (tree / name / "__init__.py").write_text("")
    found = ab.check_code(tree)
    assert set(found) == set(ab.PACKAGES)
    assert all(Path(o).is_relative_to(tree) for o in found.values()), found
    (tree / "specdec" / "__init__.py").unlink()
    (tree / "specdec").rmdir()
    with pytest.raises(RuntimeError, match="specdec"):
        ab.check_code(tree)


def test_a_served_process_of_arm_b_runs_the_worktree_code(tmp_path):
    """The same through pearl.procs.Services, as `pearl serve` starts: `python -m pearl.cli` in
    the tree runs the tree's pearl.cli (here a stand-in that writes where it came from)."""
    from pearl.procs import Services

    tree = tmp_path / "tree"
    (tree / "pearl").mkdir(parents=True)
    (tree / "pearl" / "__init__.py").write_text("")
    (tree / "pearl" / "cli.py").write_text(
        "import pathlib, sys\nimport pearl\n"
        "pathlib.Path(sys.argv[sys.argv.index('--port-file') + 1]).write_text(pearl.__file__)\n")
    svcs = Services(tmp_path)
    svc = svcs.start("draft", [], **ab.code_of(tree))
    assert svc.proc.wait(timeout=60) == 0, svc.log_path.read_text()
    assert Path(svc.port_file.read_text()).resolve() == (tree / "pearl" / "__init__.py").resolve()
    assert sys.modules["pearl"].__file__ != svc.port_file.read_text()


def test_cpu_time_per_process_grows_with_work_and_tabulates():
    from types import SimpleNamespace

    from benchmarks.ab import cpu_s, cpu_table

    me = {"coordinator": SimpleNamespace(proc=SimpleNamespace(pid=os.getpid()))}
    before = cpu_s(me)["coordinator"]
    t = time.process_time()
    while time.process_time() - t < 0.3:  # burn 0.3 s of CPU
        sum(range(1000))
    assert cpu_s(me)["coordinator"] - before >= 0.2
    results = [{"arm": arm, "mode": "pearl", "concurrency": 8,
                "cpu_ms_per_token": {"coordinator": ms, "target": 10 * ms}}
               for arm, ms in (("a", 2.0), ("a", 4.0), ("b", 5.0))]
    text = cpu_table(results)
    assert "| pearl | 8 | 3.0 | 5.0 | 30.0 | 50.0 |" in text.splitlines()
