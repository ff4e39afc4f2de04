"""The OpenAI-compatible HTTP front (coordinator/openai_http), driven by clients nobody here wrote:
the openai SDK (sync and async, streamed and not), httpx and curl. Tiny float32 models, so greedy
text must equal the gRPC path's and the target's own."""

import asyncio
import copy
import json
import shutil
import ssl
import subprocess
import threading
import time

import grpc
import httpx
import openai
import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from cluster import Cluster
from conftest import cluster_sessions, greedy_reference, wait_until
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.telemetry import Telemetry

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "def f(x):"
N = 16


@pytest.fixture(scope="module")
def chat_pair(tiny_draft, tiny_target):
    """The tiny pair with a chat template (the real pair has one; the tiny tokenizer none)."""
    draft, target = copy.deepcopy(tiny_draft), copy.deepcopy(tiny_target)
    for m in (draft, target):
        m.tokenizer.chat_template = TEMPLATE
    return draft, target


class Http:
    def __init__(self, draft, target, **coordinator_kw):
        self.c = Cluster(draft, target, coordinator_kw={"http_port": 0, **coordinator_kw})
        self.base = f"http://127.0.0.1:{self.c.coordinator.http.port}"
        self.model = target.name

    def sdk(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "none"),
                             max_retries=0, **kw)

    def close(self):
        self.c.close()


@pytest.fixture(scope="module")
def http(chat_pair):
    h = Http(*chat_pair)
    h.memory = InMemorySpanExporter()
    h.registry = CollectorRegistry()
    h.c.coordinator.telemetry = Telemetry(
        "pearl-coordinator", [h.memory], [PrometheusMetricReader(registry=h.registry)], batch=False)
    yield h
    h.close()


def ref_text(target, ids: list[int]) -> str:
    return target.tokenizer.decode(ids, skip_special_tokens=True)


def no_live_sessions(h: Http, within_s: float = 5.0) -> None:
    wait_until(lambda: cluster_sessions(h.c) == (0, 0), within_s, "no live session")


# ---- the SDK, text and usage ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "sd", "pearl"])
def test_completions_equal_grpc_and_the_target_alone(http, chat_pair, mode):
    target = chat_pair[1]
    ids = target.tokenizer.encode(PROMPT)
    ref = greedy_reference(target, ids, N)
    r = http.sdk().completions.create(model=http.model, prompt=PROMPT, max_tokens=N,
                                      extra_body={"mode": mode})
    with Client(http.c.address) as c:
        g = c.complete(PROMPT, mode=mode, max_new_tokens=N)
    assert r.choices[0].text == g.text == ref_text(target, ref)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), N)
    assert r.usage.total_tokens == len(ids) + N
    assert r.model == http.model and r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.model_extra["metrics"]["mode"] == mode


def test_chat_multi_turn_with_a_system_prompt(http, chat_pair):
    target = chat_pair[1]
    messages = [{"role": "system", "content": "Answer in code."},
                {"role": "user", "content": "sum?"},
                {"role": "assistant", "content": "a+b"},
                {"role": "user", "content": "product?"}]
    ids = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    ref = greedy_reference(target, list(ids), N)
    r = http.sdk().chat.completions.create(model=http.model, messages=messages, max_tokens=N)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref_text(target, ref)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == N
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    # the same conversation through gRPC's messages field
    with grpc.insecure_channel(http.c.address) as ch:
        out = list(pearl_pb2_grpc.CoordinatorStub(ch).Generate(pb.GenerateRequest(
            messages=[pb.ChatMessage(**m) for m in messages], max_new_tokens=N)))
    assert [t for o in out for t in o.token_ids] == ref


def test_usage_reports_the_prompt_tokens_the_cache_held(http):
    """A second chat with the same long system prompt: its usage says how many prompt tokens
    the target's prefix cache held, as OpenAI's ``prompt_tokens_details.cached_tokens``."""
    system = {"role": "system", "content": "Answer in code. " * 6}  # > 2 pages of 16 tokens
    sdk = http.sdk()
    first = sdk.chat.completions.create(model=http.model, max_tokens=4, messages=[
        system, {"role": "user", "content": "sum?"}])
    second = sdk.chat.completions.create(model=http.model, max_tokens=4, messages=[
        system, {"role": "user", "content": "product?"}])
    assert first.usage.prompt_tokens > 2 * 16
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 2 * 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0


def test_streamed_equals_not_streamed_and_reports_usage(http):
    sdk = http.sdk()
    msgs = [{"role": "user", "content": "def g(y):"}]
    whole = sdk.chat.completions.create(model=http.model, messages=msgs, max_tokens=N)
    chunks = list(sdk.chat.completions.create(model=http.model, messages=msgs, max_tokens=N,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model=http.model, prompt=PROMPT, max_tokens=N, stream=True))
    assert streamed == sdk.completions.create(model=http.model, prompt=PROMPT,
                                              max_tokens=N).choices[0].text


def test_async_sdk_streams_and_answers(http):
    async def go():
        sdk = openai.AsyncOpenAI(base_url=http.base + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "x"}]
        whole = await sdk.chat.completions.create(model=http.model, messages=msgs, max_tokens=N)
        parts = []
        async for c in await sdk.chat.completions.create(model=http.model, messages=msgs,
                                                          max_tokens=N, stream=True):
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
        await sdk.close()
        return whole.choices[0].message.content, "".join(parts)
    whole, streamed = asyncio.run(go())
    assert whole == streamed and whole


def test_a_seed_repeats_under_sampling(http):
    kw = dict(model=http.model, prompt=PROMPT, max_tokens=N, temperature=0.9, top_p=0.95)
    a = http.sdk().completions.create(seed=11, **kw).choices[0].text
    b = http.sdk().completions.create(seed=11, **kw).choices[0].text
    others = {http.sdk().completions.create(seed=s, **kw).choices[0].text for s in (12, 13, 14)}
    assert a == b
    assert others != {a}, "three other seeds all gave the same text"


def test_stop_strings_and_eos_end_with_stop(http):
    sdk = http.sdk()
    full = sdk.completions.create(model=http.model, prompt=PROMPT, max_tokens=N).choices[0].text
    stop = full[5:8]
    r = sdk.completions.create(model=http.model, prompt=PROMPT, max_tokens=N, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.index(stop)]


def test_models_and_health(http):
    models = http.sdk().models.list()
    assert [m.id for m in models.data] == [http.model]
    assert http.sdk().models.retrieve(http.model).id == http.model
    assert httpx.get(http.base + "/health").json() == {"status": "ok"}


# ---- logprobs over HTTP ------------------------------------------------------------------------

def test_logprobs_are_the_targets_own(http, chat_pair):
    import torch

    target = chat_pair[1]
    messages = [{"role": "user", "content": "lp"}]
    r = http.sdk().chat.completions.create(model=http.model, messages=messages, max_tokens=8,
                                           logprobs=True, top_logprobs=3,
                                           extra_body={"mode": "pearl"})
    ids = list(target.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
    new = greedy_reference(target, ids, 8)
    with torch.no_grad():
        logits = target.model(torch.tensor([ids + new])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(ids) - 1:-1]
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for i, (entry, tok) in enumerate(zip(content, new)):
        assert entry.token == target.tokenizer.decode([tok])
        assert abs(entry.logprob - want[i, tok].item()) < 1e-4
        top = torch.topk(want[i], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                         abs=1e-4)
    c = http.sdk().completions.create(model=http.model, prompt=PROMPT, max_tokens=4, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


# ---- bad input ---------------------------------------------------------------------------------

def chat(**kw):
    return {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


BAD = [  # (name, path, body or raw bytes, content type, status, param or None)
    ("invalid JSON", "/v1/chat/completions", b"{nope", "application/json", 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", "application/json", 400, None),
    ("wrong content type", "/v1/chat/completions", b"model=x", "text/plain", 400, None),
    ("no content type", "/v1/completions", b"{}", "", 400, None),
    ("no model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None,
     400, "model"),
    ("wrong model", "/v1/chat/completions", {**chat(), "model": "gpt-9"}, None, 404, "model"),
    ("no messages", "/v1/chat/completions", chat(messages=[]), None, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", chat(messages="hi"), None, 400, "messages"),
    ("unknown role", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]),
     None, 400, None),
    ("negative max_tokens", "/v1/chat/completions", chat(max_tokens=-3), None, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", {"model": "MODEL", "prompt": "x", "max_tokens": 0},
     None, 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", chat(max_tokens=10**9), None, 400, None),
    ("max_tokens a string", "/v1/chat/completions", chat(max_tokens="lots"), None, 400,
     "max_tokens"),
    ("temperature too high", "/v1/chat/completions", chat(temperature=7), None, 400,
     "temperature"),
    ("top_p zero", "/v1/chat/completions", chat(top_p=0), None, 400, "top_p"),
    ("n=2", "/v1/chat/completions", chat(n=2), None, 400, "n"),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]),
     None, 400, "tools"),
    ("response_format", "/v1/chat/completions", chat(response_format={"type": "json_object"}),
     None, 400, "response_format"),
    ("top_logprobs 9", "/v1/chat/completions", chat(logprobs=True, top_logprobs=9), None, 400,
     "top_logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", chat(top_logprobs=2), None, 400,
     "top_logprobs"),
    ("prompt over the context", "/v1/completions",
     {"model": "MODEL", "prompt": "ab" * 700, "max_tokens": 4}, None, 400, None),
    ("prompt ids outside the vocabulary", "/v1/completions",
     {"model": "MODEL", "prompt": [1, 2, 10**6], "max_tokens": 4}, None, 400, None),
    ("empty prompt", "/v1/completions", {"model": "MODEL", "prompt": "", "max_tokens": 4}, None,
     400, None),
    ("unknown mode", "/v1/completions", {"model": "MODEL", "prompt": "x", "mode": "fast"}, None,
     400, "mode"),
    ("gamma out of range", "/v1/completions", {"model": "MODEL", "prompt": "x", "gamma": 99},
     None, 400, "gamma"),
    ("echo", "/v1/completions", {"model": "MODEL", "prompt": "x", "echo": True}, None, 400,
     "echo"),
    ("stop not strings", "/v1/completions", {"model": "MODEL", "prompt": "x", "stop": [1, 2]},
     None, 400, "stop"),
    ("content of a wrong type", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": 42}]), None, 400, None),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_clear_4xx(http, case):
    name, path, body, kind, status, param = case
    if isinstance(body, dict):
        raw = json.dumps(body).replace("MODEL", http.model).encode()
        kind = "application/json"
    else:
        raw = body
    headers = {"content-type": kind} if kind else {}
    r = httpx.post(http.base + path, content=raw, headers=headers)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param or (err["param"] or "").startswith(param), err
    # healthy after it, nothing leaked
    assert httpx.get(http.base + "/health").status_code == 200
    no_live_sessions(http)


def test_bad_input_leaves_the_server_serving(http):
    r = http.sdk().completions.create(model=http.model, prompt=PROMPT, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_unknown_fields_are_accepted(http):
    r = httpx.post(http.base + "/v1/completions", json={
        "model": http.model, "prompt": PROMPT, "max_tokens": 4, "frequency_penalty": 0,
        "some_future_field": {"a": 1}})
    assert r.status_code == 200, r.text


# ---- disconnects, load, curl, deadlines, traces, metrics ---------------------------------------

def test_a_client_that_disconnects_frees_its_sessions(http):
    """Streamed and not: the client goes away mid-request; both services hold no session of it
    within 2 s."""
    body = {"model": http.model, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True,
            "mode": "pearl"}
    with httpx.Client(timeout=30) as cl:
        with cl.stream("POST", http.base + "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            wait_until(lambda: cluster_sessions(http.c) != (0, 0), 5, "sessions open")
        t0 = time.monotonic()  # the response is closed: the connection is gone
    no_live_sessions(http, 2.0)
    print(f"\nstreamed: freed in {time.monotonic() - t0:.2f} s")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(http.base + "/v1/completions", json=body, timeout=1.0)
    t0 = time.monotonic()
    no_live_sessions(http, 2.0)
    print(f"not streamed: freed in {time.monotonic() - t0:.2f} s")


def test_64_streaming_clients_some_leaving_early(http, chat_pair):
    target = chat_pair[1]
    prompts = [f"p{i}:" for i in range(8)]
    refs = {p: ref_text(target, greedy_reference(target, target.tokenizer.encode(p), N))
            for p in prompts}
    results, errors = {}, []

    def one(i: int) -> None:
        p = prompts[i % len(prompts)]
        leave = i % 8 == 3  # one in eight goes away after its first delta
        try:
            stream = http.sdk(timeout=300).completions.create(
                model=http.model, prompt=p, max_tokens=N, stream=True,
                extra_body={"mode": ["pearl", "sd", "ar"][i % 3]})
            text = []
            for c in stream:
                text.append(c.choices[0].text)
                if leave and text:
                    stream.close()
                    return
            results[i] = (p, "".join(text))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert len(results) == 56
    for i, (p, text) in results.items():
        assert text == refs[p], f"client {i}"
    no_live_sessions(http, 5.0)


def test_curl_streams_as_a_user_types_it(http):
    curl = shutil.which("curl")
    assert curl, "curl is not installed"
    out = subprocess.run(
        [curl, "-sS", "-N", f"{http.base}/v1/chat/completions", "-H",
         "Content-Type: application/json", "-d",
         json.dumps({"model": http.model, "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 8, "stream": True})],
        capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_traceparent_and_deadline_reach_the_requests_trace(http):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    r = httpx.post(http.base + "/v1/completions",
                   json={"model": http.model, "prompt": PROMPT, "max_tokens": 4, "timeout": 30},
                   headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200
    spans = [s for s in http.memory.get_finished_spans() if s.name == "pearl.generate"
             and format(s.context.trace_id, "032x") == trace_id]
    assert len(spans) == 1, "no request span in the caller's trace"
    span = spans[0]
    assert format(span.parent.span_id, "016x") == parent
    assert 25 < span.attributes["pearl.deadline_s"] <= 31  # gRPC rounds the timeout it sends


def test_a_deadline_that_passes_is_a_504(http):
    r = httpx.post(http.base + "/v1/completions", json={
        "model": http.model, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True,
        "timeout": 0.2}, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    no_live_sessions(http)


def test_prometheus_counts_http_requests_by_route_and_status(http):
    httpx.get(http.base + "/v1/models")
    httpx.post(http.base + "/v1/completions", content=b"{", headers={"content-type": "application/json"})

    def count(route: str, status: str) -> float:
        return sum(s.value for m in http.registry.collect() for s in m.samples
                   if s.name == "pearl_http_requests_total" and s.labels.get("route") == route
                   and s.labels.get("status") == status)

    assert count("/v1/models", "200") >= 1
    assert count("/v1/completions", "400") >= 1


# ---- auth and TLS ------------------------------------------------------------------------------

def test_bearer_token_and_tls_apply_to_http(chat_pair, tmp_path):
    from test_security import Pki

    pki = Pki(tmp_path, "http")
    cert, key = pki.issue("server", server=True)
    from specdec.security import ServerTLS

    h = Http(*chat_pair, tls=ServerTLS(cert, key), auth_token="tok3n")
    try:
        base = h.base.replace("http://", "https://")
        tls = httpx.Client(verify=ssl.create_default_context(cafile=pki.ca))
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="tok3n", http_client=tls, max_retries=0)
        r = sdk.completions.create(model=h.model, prompt=PROMPT, max_tokens=4)
        assert r.usage.completion_tokens == 4
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", http_client=tls,
                            max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model=h.model, prompt=PROMPT, max_tokens=4)
        assert e.value.body["type"] == "authentication_error"
        missing = tls.post(base + "/v1/completions", json={"model": h.model, "prompt": PROMPT})
        assert missing.status_code == 401 and "missing" in missing.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", http_client=tls,
                          max_retries=0).models.list()
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):  # plaintext vs TLS
            httpx.get(h.base + "/health", timeout=5)
        assert tls.get(base + "/health").status_code == 200  # health stays open
    finally:
        h.close()


def test_the_listening_socket_sends_small_chunks_at_once():
    """TCP_NODELAY on the listening socket (accepted ones inherit it): without it a kept-alive
    connection's first SSE chunks waited ~40 ms for Nagle's algorithm."""
    import socket

    from coordinator.openai_http.server import bind

    with bind("127.0.0.1", 0) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection(sock.getsockname()) as client:
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_failure_mid_stream_is_an_error_event_then_done(http):
    """The deadline passes after the stream began (status 200 already sent): an `error` event with
    OpenAI's body, then [DONE]; the SDK raises it."""
    body = {"model": http.model, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True,
            "stream": True, "timeout": 0.5}
    with httpx.stream("POST", http.base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert lines[-3] == "event: error", lines[-4:]
    err = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert err["code"] == "deadline_exceeded" and err["type"] == "timeout"
    assert any(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-3]
               if ln.startswith("data: {")), "nothing streamed before the failure"
    with pytest.raises(openai.APIError, match="Deadline"):
        for _ in http.sdk().completions.create(model=http.model, prompt=PROMPT, max_tokens=1000,
                                               stream=True, extra_body={"ignore_eos": True,
                                                                        "timeout": 0.5}):
            pass
    no_live_sessions(http)


def test_a_full_coordinator_is_a_429_with_retry_after(chat_pair):
    h = Http(*chat_pair, max_sessions=1)
    try:
        body = {"model": h.model, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
        with httpx.stream("POST", h.base + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the one session is held
            r = httpx.post(h.base + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                h.sdk().completions.create(model=h.model, prompt=PROMPT, max_tokens=4)
        wait_until(lambda: cluster_sessions(h.c) == (0, 0), 5, "the first session freed")
        assert h.sdk().completions.create(model=h.model, prompt=PROMPT,
                                          max_tokens=4).usage.completion_tokens == 4
    finally:
        h.close()
