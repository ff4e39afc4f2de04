"""The engine's coalescing wait (specdec/engine.py ``Engine._coalesce``, docs/design.md section
12): sessions that take turns, each sending its next forward a few ms after its last one came back
(a round trip through the coordinator), share steps with the wait and alternate without it; a
lone session never waits; a session that stops coming back is waited for once.

Steps are slowed to ~100 ms by a sleep in the first layer (the wait is at most a quarter of the
recent step time), so the few-ms "round trip" is small against it even on a loaded machine; the
assertions count steps, not time.
"""

import threading
import time

import pytest
import torch

from specdec.engine import Engine

GAP_S = 0.003  # a session's "round trip" between its result and its next forward
STEP_S = 0.1  # the sleep that stands in for a slow forward
ROUNDS = 12


@pytest.fixture
def slow_model(tiny_target):
    model = tiny_target.model
    hook = model.model.layers[0].mlp.register_forward_hook(lambda *a: time.sleep(STEP_S))
    yield model
    hook.remove()


def take_turns(engine: Engine, prompts: list[list[int]], rounds: list[int]) -> list[torch.Tensor]:
    """Session i decodes ``rounds[i]`` tokens (its argmax), GAP_S after each result; returns each
    session's last logits. Session i starts i half-steps after the first, so that they are out of
    step from the start (in step, both coming back at the same moment, they would share steps
    by chance until the first jitter; out of step, without the wait, they stay so)."""
    seqs = [engine.sequence(p) for p in prompts]
    last: list[torch.Tensor | None] = [None] * len(seqs)
    errors: list[BaseException] = []
    def run(i: int) -> None:
        try:
            time.sleep(i * STEP_S / 2)
            for _ in range(rounds[i]):
                f = seqs[i].forward()
                last[i] = f.logits[-1]
                seqs[i].extend([int(f.logits[-1].argmax())])
                time.sleep(GAP_S)
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for s in seqs:
        s.close()
    return last


@torch.inference_mode()
def test_sessions_taking_turns_share_steps_with_the_wait(slow_model):
    prompts = [[5, 9, 11, 3], [7, 2, 8]]
    runs = {}
    for wait_ms in (0.0, 500.0):  # 500: the cap never binds; a quarter of the step does
        engine = Engine(slow_model, 1024, max_batch_wait_ms=wait_ms)
        try:
            logits = take_turns(engine, prompts, [ROUNDS, ROUNDS])
            runs[wait_ms] = (engine.steps_by_sessions.copy(), engine.waits, logits)
        finally:
            engine.close()
    (off, off_waits, off_logits), (on, on_waits, on_logits) = runs[0.0], runs[500.0]
    # without the wait they alternate: after the shared prefill, each step holds one session
    assert off_waits == 0
    assert off[2] <= ROUNDS // 4, f"without the wait they should alternate: {dict(off)}"
    # with it, most steps hold both
    assert on[2] >= ROUNDS // 2 + 1, f"with the wait they should share steps: {dict(on)}"
    assert sum(on.values()) < sum(off.values())
    for a, b in zip(off_logits, on_logits):  # batch-mates change nothing (float32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_lone_session_never_waits(slow_model):
    engine = Engine(slow_model, 1024, max_batch_wait_ms=500.0)
    try:
        take_turns(engine, [[5, 9, 11, 3]], [6])
        assert engine.steps == 6 and engine.waits == 0 and engine.wait_ns == 0
    finally:
        engine.close()


@torch.inference_mode()
def test_a_session_that_stops_coming_back_is_waited_for_once(slow_model):
    """B decodes 3 tokens and goes silent without closing (its request ended upstream); A goes
    on for 9: the engine waits for B once, not at every step of A."""
    engine = Engine(slow_model, 1024, max_batch_wait_ms=500.0)
    try:
        take_turns(engine, [[5, 9, 11, 3], [7, 2, 8]], [9, 3])
        assert engine.steps_by_sessions[2] >= 2, dict(engine.steps_by_sessions)  # they did share steps
        budget_s = 0.25 * STEP_S * 2  # a quarter of the step, with room for a slow machine
        # waits for B while it still came back take ~GAP_S; the one for a silent B is timed out
        # (waiting at each of A's 6 steps alone would take 6 budgets)
        assert engine.wait_ns / 1e9 < 1.5 * budget_s, (engine.waits, engine.wait_ns / 1e9)
    finally:
        engine.close()
