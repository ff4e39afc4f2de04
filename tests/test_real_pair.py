"""The real default pair (Qwen2.5-Coder 0.5B drafting for 1.5B) through real service processes
on loopback. Float32, where greedy equality with transformers is exact (DESIGN.md section 5)."""

import gc
import json
import re
import subprocess
import sys

import psutil
import pytest
import torch

from pearl.client import Client
from pearl.demo import humaneval_prompt
from pearl.procs import running
from specdec.models import load_model

pytestmark = pytest.mark.slow

DRAFT, TARGET = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
N = 32


@pytest.fixture(scope="module")
def references():
    """Prompts and transformers' greedy continuations of the target alone, in float32."""
    loaded = load_model(TARGET, dtype="float32", threads=2)
    prompts = [humaneval_prompt(i) for i in (2, 11)]
    refs = []
    for p in prompts:
        ids = loaded.tokenizer(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = loaded.model.generate(ids, max_new_tokens=N, do_sample=False)
        refs.append(out[0, ids.shape[1]:].tolist())
    del loaded
    gc.collect()
    return prompts, refs


@pytest.fixture(scope="module")
def services(references):
    with running() as svcs:
        common = ["--dtype", "float32", "--threads", "1"]
        svcs.start("draft", ["--model", DRAFT, *common], cpus="0")
        svcs.start("target", ["--model", TARGET, *common], cpus="1")
        draft, target = svcs.wait("draft"), svcs.wait("target")
        svcs.start("coordinator", ["--draft", draft, "--target", target])
        yield svcs.wait("coordinator", 120)


@pytest.mark.parametrize("mode", ["ar", "sd", "pearl"])
def test_real_pair_is_lossless(services, references, mode):
    prompts, refs = references
    with Client(services) as c:
        for prompt, ref in zip(prompts, refs):
            r = c.complete(prompt, mode=mode, max_new_tokens=N, gamma=3 if mode == "sd" else 0)
            assert r.token_ids == ref[: len(r.token_ids)], f"{mode} diverged from the target"
            assert len(r.token_ids) == N or r.stats["finish_reason"] == "eos"
            if mode != "ar":
                assert r.stats["acceptance_rate"] > 0.5, "the pair agrees on most code tokens"
            if mode == "pearl":
                assert r.stats["overlap_ratio"] > 0.1 and r.stats["both_busy_s"] > 0


def test_generate_cli_json(services, references):
    prompts, refs = references
    out = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "generate", prompts[0], "--coordinator", services,
         "--mode", "pearl", "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, check=True, timeout=300)
    d = json.loads(out.stdout)
    assert d["token_ids"] == refs[0][:12] and d["mode"] == "pearl"
    for name in ("text", "new_tokens", "wall_s", "tokens_per_s", "speedup", "draft_tokens",
                 "accepted_tokens", "acceptance_rate", "target_forwards", "draft_forwards",
                 "tokens_per_target_forward", "mean_accepted_tokens", "per_position_acceptance",
                 "gamma_history", "draft_length_histogram", "both_busy_s", "target_idle_s",
                 "draft_idle_s", "overlap_ratio"):
        assert name in d, name


def test_demo_runs(services):
    """`pearl demo` (what `make run` runs), short: three modes and a table, clean exit."""
    out = subprocess.run([sys.executable, "-m", "pearl.cli", "demo", "--max-new-tokens", "12"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("| ar ", "| sd ", "| pearl "):
        assert row in out.stdout
    assert "tokens identical across modes" in out.stdout
    logs = re.search(r"logs in (\S+)\)", out.stdout).group(1)
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if logs in " ".join(p.info["cmdline"] or [])]
    assert not left, f"demo left service processes behind: {left}"
