"""Closed-loop clients (`pearl bench load`): each sends its next request when its last one is done,
through the coordinator's gRPC API or its OpenAI-compatible HTTP front, and one record per
request.

HTTP streams text, not token ids: its records hold the text and the count the usage chunk gives
(``token_ids`` None).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HTTP = {"pearl-http": "pearl"}  # contenders through the coordinator's HTTP front: their mode
# GenerateStats fields each service record keeps (queue_wait_s: seconds the request's forward
# passes waited in the services' engine queues; mean_target_batch: sessions per target step)
SERVICE_STATS = ("acceptance_rate", "target_forwards", "overlap_ratio", "finish_reason",
                 "fell_back", "queue_wait_s", "mean_target_batch", "gamma_history")


# -- request plans and records --------------------------------------------------------------------


def plan(c: int, client: int, n_prompts: int, per_client: int, deadline: float | None):
    """The prompt indices client ``client`` of ``c`` sends, one after the other: its j-th
    request takes prompt (j*c + client) mod n, so every request of a phase has its own prompt and
    the first prompts recur at every concurrency. With a deadline it sends until then."""
    j = 0
    while (j < per_client) if deadline is None else (time.perf_counter() < deadline):
        yield (j * c + client) % n_prompts
        j += 1


def record(contender: str, c: int, client: int, prompt: dict, tokens: list[int] | int,
           start: float, first: float | None, end: float, **extra) -> dict:
    """``tokens``: the new token ids, or their count where only text came back (HTTP; then
    ``token_ids`` is None). TPOT: the time per new token after the first."""
    n = tokens if isinstance(tokens, int) else len(tokens)
    return {"contender": contender, "concurrency": c, "client": client, "prompt": prompt["index"],
            "prompt_tokens": len(prompt["ids"]), "new_tokens": n,
            "token_ids": None if isinstance(tokens, int) else tokens,
            "start": start, "end": end, "latency_s": end - start,
            "ttft_s": None if first is None else first - start,
            "tpot_s": None if first is None or n < 2 else (end - first) / (n - 1), **extra}


# -- through gRPC ---------------------------------------------------------------------------------


def closed_loop(clients: list, prompts: list[dict], per_client: int, duration: float | None,
                one) -> list[dict]:
    """``len(clients)`` closed-loop clients started together, each sending its next request when
    the last ended; ``one(client, i, prompt)`` runs one request of client i and returns its
    record. The clients are closed at the end."""
    c = len(clients)
    barrier = threading.Barrier(c)

    def run(i: int) -> list[dict]:
        barrier.wait()
        deadline = None if duration is None else time.perf_counter() + duration
        return [one(clients[i], i, prompts[k])
                for k in plan(c, i, len(prompts), per_client, deadline)]

    try:
        with ThreadPoolExecutor(c) as ex:
            return [r for rs in ex.map(run, range(c)) for r in rs]
    finally:
        for cl in clients:
            cl.close()


def service_phase(address: str, mode: str, c: int, prompts: list[dict], m: int, gamma: int,
                  per_client: int, duration: float | None) -> list[dict]:
    from pearl.client import Client, Delta

    g = gamma if mode == "sd" else 0

    def one(client, i: int, p: dict) -> dict:
        first, stats, ids, text = None, {}, [], []
        start = time.perf_counter()
        for part in client.generate(p["ids"], mode=mode, max_new_tokens=m, gamma=g):
            if isinstance(part, Delta):
                if part.token_ids and first is None:
                    first = time.perf_counter()
                ids += part.token_ids
                text.append(part.text)
            else:
                stats = part.stats
        return record(mode, c, i, p, ids, start, first, time.perf_counter(),
                      text="".join(text), **{k: stats.get(k) for k in SERVICE_STATS})

    return closed_loop([Client(address) for _ in range(c)], prompts, per_client, duration, one)


# -- through HTTP ---------------------------------------------------------------------------------


def free_port() -> int:
    """A port free now, for the coordinator's --http-port (its port file holds the gRPC port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_client(url: str):
    import httpx

    return httpx.Client(base_url=url, timeout=httpx.Timeout(900.0), trust_env=False)


def http_model(url: str) -> str:
    """The model name the HTTP front serves (GET /v1/models)."""
    with http_client(url) as cl:
        return cl.get("/v1/models").raise_for_status().json()["data"][0]["id"]


def http_completion(cl, body: dict) -> tuple[str, float | None, dict]:
    """One streamed /v1/completions: the text, when its first text came (the front sends no
    chunk for ids whose text it holds back, an incomplete UTF-8 character) and the last chunks'
    finish_reason, usage and metrics."""
    text, first, tail, event = [], None, {}, None
    with cl.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if event == "error":
                raise RuntimeError(f"HTTP stream error: {line[len('data: '):]}")
            chunk = json.loads(line[len("data: "):])
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter()
                text.append(choice["text"])
                tail["finish_reason"] = choice["finish_reason"] or tail.get("finish_reason")
            tail.update({k: chunk[k] for k in ("usage", "metrics") if k in chunk})
    return "".join(text), first, tail


def http_phase(url: str, model: str, name: str, c: int, prompts: list[dict], m: int,
               per_client: int, duration: float | None) -> list[dict]:
    """As :func:`service_phase`, through the HTTP front: the same prompt ids and settings, greedy,
    no logprobs (they would add work to the target's steps); each client its own connection."""

    def one(client, i: int, p: dict) -> dict:
        body = {"model": model, "prompt": p["ids"], "max_tokens": m, "stream": True,
                "mode": HTTP[name], "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        text, first, tail = http_completion(client, body)
        stats = {**tail.get("metrics", {}), "finish_reason": tail.get("finish_reason")}
        return record(name, c, i, p, tail["usage"]["completion_tokens"], start, first,
                      time.perf_counter(), text=text, **{k: stats.get(k) for k in SERVICE_STATS})

    return closed_loop([http_client(url) for _ in range(c)], prompts, per_client, duration, one)
