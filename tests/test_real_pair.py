"""The real default pair (Qwen2.5-Coder 0.5B drafting for 1.5B) through real service processes
on loopback. Float32, where greedy equality with transformers is exact
(docs/design.md section 5)."""

import gc
import queue
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest
import grpc
import torch

from conftest import free_port
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
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
        http_port = free_port()
        svcs.start("coordinator", ["--draft", draft, "--target", target,
                                   "--http-port", str(http_port)])
        yield SimpleNamespace(coordinator=svcs.wait("coordinator", 120), draft=draft,
                              target=target, http=f"http://127.0.0.1:{http_port}/v1")


@pytest.mark.parametrize("mode", ["ar", "sd", "pearl", "hidden-transfer"])
def test_real_pair_is_lossless(services, references, mode):
    prompts, refs = references
    with Client(services.coordinator) as c:
        for prompt, ref in zip(prompts, refs):
            r = c.complete(prompt, mode=mode, max_new_tokens=N, gamma=3 if mode == "sd" else 0)
            assert r.token_ids == ref[: len(r.token_ids)], f"{mode} diverged from the target"
            assert len(r.token_ids) == N or r.stats["finish_reason"] == "eos"
            if mode in ("sd", "pearl"):
                assert not r.stats["fell_back"], r.stats["fallback_reason"]
                assert r.stats["acceptance_rate"] > 0.5, "the pair agrees on most code tokens"
            if mode == "hidden-transfer":  # the shipped transfer layers draft usefully
                assert r.stats["tokens_per_target_forward"] > 1.2, r.stats
            if mode == "pearl":
                assert r.stats["overlap_ratio"] > 0.1 and r.stats["both_busy_s"] > 0


def test_real_pair_batched_equals_alone(services, references):
    """Eight requests at once (all four modes on both prompts) through the batching engine:
    every one gives the target's own float32 greedy tokens, as it does alone, and the target's
    engine did batch them (docs/design.md section 12)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts, refs = references
    jobs = [(m, i) for m in ("ar", "sd", "pearl", "hidden-transfer") for i in range(len(prompts))]

    def run(job):
        mode, i = job
        with Client(services.coordinator) as c:
            return c.complete(prompts[i], mode=mode, max_new_tokens=N,
                              gamma=3 if mode == "sd" else 0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (mode, i), r in zip(jobs, results):
        assert r.token_ids == refs[i][: len(r.token_ids)], f"{mode} on prompt {i}, batched"
        assert len(r.token_ids) == N or r.stats["finish_reason"] == "eos"
    assert max(r.stats["mean_target_batch"] for r in results) > 1.5, "nothing was batched"


def test_generate_cli_json(services, references):
    prompts, refs = references
    out = subprocess.run(
        [sys.executable, "-m", "pearl.cli", "generate", prompts[0],
         "--coordinator", services.coordinator,
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


def test_openai_chat_on_the_real_pair(services):
    """The openai SDK's chat through the coordinator's HTTP front on the real pair: Qwen's own
    chat template, a system prompt and an earlier turn; pearl over HTTP gives exactly the text of
    ar (the target alone) over gRPC's messages field, streamed or not."""
    import openai

    messages = [{"role": "system", "content": "You write short Python."},
                {"role": "user", "content": "Add two numbers."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                {"role": "user", "content": "Now multiply them."}]
    sdk = openai.OpenAI(base_url=services.http, api_key="none", max_retries=0, timeout=600)
    model = sdk.models.list().data[0].id
    assert model == TARGET
    r = sdk.chat.completions.create(model=model, messages=messages, max_tokens=N,
                                    extra_body={"mode": "pearl"})
    with Client(services.coordinator) as c:
        alone = c.complete(messages, mode="ar", max_new_tokens=N)
    assert r.choices[0].message.content == alone.text
    assert r.usage.prompt_tokens == alone.stats["prompt_tokens"]
    assert r.model_extra["metrics"]["accepted_tokens"] > 0
    streamed = "".join(ch.choices[0].delta.content or "" for ch in sdk.chat.completions.create(
        model=model, messages=messages, max_tokens=N, stream=True) if ch.choices)
    assert streamed == alone.text


def test_demo_runs(services):
    """`pearl demo` (what `make run` runs), short: three modes and a table, clean exit."""
    out = subprocess.run([sys.executable, "-m", "pearl.cli", "demo", "--max-new-tokens", "12"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("| ar ", "| sd ", "| pearl ", "| hidden-transfer "):
        assert row in out.stdout
    assert "tokens identical across modes: yes" in out.stdout  # the demo's verdict, not its label
    logs = re.search(r"logs in (\S+)\)", out.stdout).group(1)
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if logs in " ".join(p.info["cmdline"] or [])]
    assert not left, f"demo left service processes behind: {left}"


def test_real_pair_sampling(services, references):
    """A sampled run completes, reports its acceptance, and repeats exactly with its seed."""
    prompt = references[0][0]
    acceptance = {}
    with Client(services.coordinator) as c:
        for t in (0.0, 0.7):
            r = c.complete(prompt, mode="pearl", max_new_tokens=N, temperature=t, seed=7)
            assert r.stats["new_tokens"] > 0 and r.stats["draft_tokens"] > 0
            acceptance[t] = r.stats["acceptance_rate"]
        again = c.complete(prompt, mode="pearl", max_new_tokens=N, temperature=0.7, seed=7)
        assert again.token_ids == r.token_ids
    print(f"\nreal pair acceptance, pearl: temperature 0: {acceptance[0.0]:.3f}, "
          f"temperature 0.7: {acceptance[0.7]:.3f}")
    assert 0 < acceptance[0.7] <= 1


def proposal_bytes(address: str, prompt_ids: list[int], sampling: pb.SamplingParams,
                   n: int = 16) -> float:
    """Mean serialized size of a DraftResponse for one drafted token."""
    q: queue.Queue = queue.Queue()
    with grpc.insecure_channel(address) as ch:
        responses = pearl_pb2_grpc.DraftServiceStub(ch).Draft(iter(q.get, None), timeout=300)
        q.put(pb.DraftRequest(start=pb.DraftStart(prompt_ids=prompt_ids, sampling=sampling,
                                                  window_id=1,
                                                  draft_until=len(prompt_ids) + n)))
        sizes = [next(responses).ByteSize() for _ in range(n)]
        q.put(None)
    return sum(sizes) / n


def test_bytes_per_drafted_token(services, references):
    """What q costs on the wire for the default pair (reported in the README)."""
    from transformers import AutoTokenizer

    from specdec.model_store import resolve

    ids = AutoTokenizer.from_pretrained(resolve(DRAFT))(references[0][0]).input_ids
    greedy = proposal_bytes(services.draft, ids, pb.SamplingParams())
    dense = proposal_bytes(services.draft, ids, pb.SamplingParams(temperature=0.7, seed=1))
    trunc = proposal_bytes(services.draft, ids, pb.SamplingParams(temperature=0.7, top_k=50,
                                                                  top_p=0.9, seed=1))
    full = 2 * 151_936
    print(f"\nbytes per drafted token: greedy {greedy:.0f}, T=0.7 {dense:.0f}, "
          f"T=0.7 top-k 50 top-p 0.9 {trunc:.0f} (a full float16 vocabulary: {full})")
    assert greedy < 64 and trunc < dense < full
