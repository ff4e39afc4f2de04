"""The prefix cache on the real pair, measured side by side: two stacks of services on loopback,
``--prefix-cache on`` and ``off`` (same models, same cores), driven in turns.

1. Shared prefix: one warm request, then 8 at once, every request a chat that shares one long
   system prompt (HumanEval prompts, ~1,000 tokens) and asks its own question. Time to first
   token p50 with the cache on and off, and whether every request's tokens are the same.
2. Second turn: conversations whose history (system prompt, question, the first answer) grows;
   the time to first token of the second turn with the cache on and off.

    .venv/bin/python -m benchmarks.prefix_cache --json docs/data/bench-prefix-cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.divergence import first_difference, margin
from benchmarks.services import start_coordinator, start_pair
from pearl.client import Client, Result
from pearl.demo import humaneval_prompt
from pearl.procs import running
from specdec.defaults import DEFAULT_MODELS

QUESTIONS = ["Which of these functions is the shortest?", "Name one function that sorts.",
             "Which function uses recursion?", "Which one returns a string?",
             "Summarise the first function.", "Which function takes a list?",
             "What does the last function return?", "Which function is the hardest?",
             "Which function checks a condition?", "List two function names."]


def system_prompt(chars: int) -> str:
    """HumanEval prompts, one after another, up to ``chars`` characters."""
    text, i = "", 0
    while len(text) < chars:
        text += humaneval_prompt(i) + "\n"
        i += 1
    return "You answer questions about this code.\n\n" + text[:chars]


def timed(client: Client, messages: list[dict], mode: str, m: int) -> dict:
    """One streamed request: its time to first token, tokens and statistics."""
    t0 = time.perf_counter()
    first = None
    for part in client.generate(messages, mode=mode, max_new_tokens=m):
        if first is None and part.token_ids:
            first = time.perf_counter() - t0
        if isinstance(part, Result):
            return {"ttft_s": first, "wall_s": time.perf_counter() - t0, "text": part.text,
                    "token_ids": part.token_ids, "prompt_tokens": part.stats["prompt_tokens"],
                    "cached": part.stats.get("cached_prompt_tokens", 0)}
    raise RuntimeError("no result")


def chat(system: str, q: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": q}]


def shared_prefix(address: str, system: str, mode: str, m: int, users: int) -> dict:
    with Client(address, timeout_s=600) as c:
        warm = timed(c, chat(system, "Say hello."), mode, m)
        with ThreadPoolExecutor(users) as pool:
            recs = list(pool.map(lambda q: timed(c, chat(system, q), mode, m),
                                 QUESTIONS[:users]))
    return {"warm": warm, "requests": recs,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in recs)}


def second_turn(address: str, chars: int, mode: str, m: int) -> dict:
    system = system_prompt(chars)
    with Client(address, timeout_s=600) as c:
        turn = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}]
        one = timed(c, turn, mode, m)
        turn += [{"role": "assistant", "content": one["text"]},
                 {"role": "user", "content": QUESTIONS[1]}]
        two = timed(c, turn, mode, m)
    return {"history_tokens": one["prompt_tokens"] + len(one["token_ids"]),
            "prompt_tokens": two["prompt_tokens"], "cached": two["cached"],
            "turn1_ttft_s": one["ttft_s"], "turn2_ttft_s": two["ttft_s"],
            "token_ids": one["token_ids"] + two["token_ids"]}


def stack(svcs, cache: str, a) -> str:
    """Draft (first core), target (last core), as every bench starts them, and a coordinator;
    the coordinator's address."""
    start_pair(svcs, a.draft_model, a.target_model, "cpu", a.dtype, ["--prefix-cache", cache])
    return start_coordinator(svcs, svcs.wait("draft"), svcs.wait("target"))


def ready(address: str, within_s: float = 120) -> None:
    """Wait until the coordinator serves a request (its replicas may still be checked after
    the other stack's load starved them)."""
    deadline = time.monotonic() + within_s
    with Client(address, timeout_s=120) as c:
        while True:
            try:
                c.complete("Hi", mode="ar", max_new_tokens=1)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--draft-model", default=DEFAULT_MODELS["draft"])
    p.add_argument("--target-model", default=DEFAULT_MODELS["target"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--mode", default="pearl")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--system-chars", type=int, default=3600, help="~1,000 tokens")
    p.add_argument("--turn-chars", default="800,1800,3600,7200")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    out: dict = {"command": " ".join(sys.argv), "mode": a.mode, "dtype": a.dtype}
    with running() as on, running() as off:
        addr = {"on": stack(on, "on", a), "off": stack(off, "off", a)}
        for address in addr.values():
            ready(address)
        system = system_prompt(a.system_chars)
        out["shared"] = {c: shared_prefix(addr[c], system, a.mode, a.max_new_tokens, a.users)
                         for c in ("off", "on")}
        out["turns"] = {c: [] for c in ("on", "off")}
        for chars in map(int, a.turn_chars.split(",")):
            for c in ("off", "on"):
                out["turns"][c].append(second_turn(addr[c], chars, a.mode, a.max_new_tokens))
    weigh(out, a)
    report(out)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


def weigh(out: dict, a) -> None:
    """Where the cache's tokens differ from the uncached run's (bf16: another order of the same
    arithmetic), the target's logit margin at the first difference (benchmarks/divergence.py):
    a near-tie of the dtype, or not."""
    from specdec.models import load_model

    system = system_prompt(a.system_chars)
    pairs = [(chat(system, q), x, y) for q, x, y in zip(
        QUESTIONS, out["shared"]["on"]["requests"], out["shared"]["off"]["requests"])]
    target = None
    for messages, on, off in pairs:
        d = first_difference(on["token_ids"], off["token_ids"])
        if d is None or d >= min(len(on["token_ids"]), len(off["token_ids"])):
            continue
        if target is None:
            target = load_model(a.target_model, "cpu", a.dtype)
        ids = list(target.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        on["divergence"] = {"position": d, **margin(target, ids, on["token_ids"][:d],
                                                    off["token_ids"][d], on["token_ids"][d])}


def report(out: dict) -> None:
    on, off = out["shared"]["on"], out["shared"]["off"]
    same = all(x["token_ids"] == y["token_ids"] for x, y in zip(on["requests"], off["requests"]))
    ratio = off["ttft_p50_s"] / on["ttft_p50_s"]
    prompt = on["requests"][0]["prompt_tokens"]
    print(f"{len(on['requests'])} requests at once sharing a {prompt}-token prompt's prefix "
          f"({out['mode']}, {out['dtype']}): TTFT p50 off {off['ttft_p50_s']:.2f} s, on "
          f"{on['ttft_p50_s']:.2f} s ({ratio:.1f}x; goal 5x: {'met' if ratio >= 5 else 'MISSED'}); "
          f"cached per request {statistics.median(r['cached'] for r in on['requests']):.0f} "
          f"tokens; tokens the same: {same}")
    for i, r in enumerate(on["requests"]):
        if "divergence" in r:
            d = r["divergence"]
            print(f"  request {i} differs at token {d['position']}: margin {d['margin']:.4g}, "
                  f"noise {d['noise']:.4g}, near-tie: {d['near_tie']}")
    out["goal_shared"] = {"ratio": ratio, "met": ratio >= 5, "tokens_same": same}
    print("second turn: history tokens | turn-2 prompt | cached (on) | TTFT off | TTFT on")
    for x, y in zip(out["turns"]["off"], out["turns"]["on"]):
        print(f"  {y['history_tokens']:6d} | {y['prompt_tokens']:6d} | {y['cached']:6d} | "
              f"{x['turn2_ttft_s']:6.2f} s | {y['turn2_ttft_s']:6.2f} s"
              + ("" if x["token_ids"] == y["token_ids"] else "  (tokens differ)"))


if __name__ == "__main__":
    main()
