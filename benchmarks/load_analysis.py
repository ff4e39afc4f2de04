"""The load bench's figures (`pearl bench load`): each phase's (contender x concurrency)
summary, greedy tokens against the reference's on the same prompt and the target's margin where
they differ, the goals, and the services' KV bytes per token.

Definitions: aggregate tok/s = all new tokens / the phase's wall time; latency = end - start of a
request; TTFT = first token - start; TPOT = (end - first token) / (tokens - 1).
"""

from __future__ import annotations

import statistics

from benchmarks.closed_loop import HTTP
from benchmarks.divergence import first_difference
from benchmarks.stats import pct

DRAFTING = ("sd", "pearl", "hidden-transfer", *HTTP)  # whose acceptance means something
HTTP_GOAL = 0.98  # pearl-http / pearl aggregate tok/s at the highest concurrency


# -- aggregation ----------------------------------------------------------------------------------


def summarize(recs: list[dict]) -> dict:
    """One phase (contender x concurrency): aggregate rate and request latencies."""
    wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    new = sum(r["new_tokens"] for r in recs)
    lat = [r["latency_s"] for r in recs]
    ttft = [r["ttft_s"] for r in recs if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in recs if r.get("tpot_s") is not None]
    s = {"requests": len(recs), "new_tokens": new, "wall_s": wall,
         "tokens_per_s": new / wall if wall > 0 else 0.0,
         "latency_p50_s": pct(lat, .5), "latency_p99_s": pct(lat, .99),
         "latency_mean_s": statistics.mean(lat), "ttft_p50_s": pct(ttft, .5),
         "ttft_p99_s": pct(ttft, .99), "tpot_p50_s": pct(tpot, .5), "tpot_p99_s": pct(tpot, .99),
         "per_request_tokens_per_s": statistics.mean(r["new_tokens"] / r["latency_s"]
                                                     for r in recs if r["latency_s"] > 0)}
    if any(r.get("identical") is not None for r in recs):
        same = [r["identical"] for r in recs if r.get("identical") is not None]
        s["identical_share"] = sum(same) / len(same)
    if recs[0]["contender"] in DRAFTING and any(r.get("acceptance_rate") is not None
                                                for r in recs):
        s["acceptance_rate_mean"] = statistics.mean(r["acceptance_rate"] or 0 for r in recs)
    for key, name in (("queue_wait_s", "queue_wait_mean_s"),
                      ("mean_target_batch", "mean_target_batch")):
        vals = [r[key] for r in recs if r.get(key) is not None]
        if vals:
            s[name] = statistics.mean(vals)
    return s


def references(records: list[dict], reference: str | None) -> dict[int, dict]:
    """Per prompt, the reference contender's record to compare with: its first request with
    that prompt at the lowest concurrency that ran it (alone, at concurrency 1, where the run
    has the prompt there)."""
    ref: dict[int, dict] = {}
    for r in records:
        if r["contender"] == reference:
            best = ref.get(r["prompt"])
            if best is None or r["concurrency"] < best["concurrency"]:
                ref[r["prompt"]] = r
    return ref


def mark_identical(records: list[dict], reference: str | None, decode=None) -> None:
    """Greedy tokens (every request of the load phases is greedy) against the reference's on the
    same prompt (:func:`references`; the reference's own batched requests are compared with it
    alone too): ``identical`` and ``first_difference``, None where there is nothing to compare
    with. A record with text and no ids (HTTP) is identical when its text equals ``decode`` of
    the reference's ids and it has as many tokens; its ``first_difference`` is a character."""
    ref = references(records, reference)
    for r in records:
        base = ref.get(r["prompt"])
        if base is None or base is r:
            r["identical"] = r["first_difference"] = None
        elif r["token_ids"] is None:
            theirs = decode(base["token_ids"])
            r["identical"] = r["text"] == theirs and r["new_tokens"] == base["new_tokens"]
            at = first_difference(r["text"], theirs)  # None: the same text, not as many tokens
            r["first_difference"] = (None if r["identical"] else
                                     len(theirs) if at is None else at)
        else:
            r["identical"] = r["token_ids"] == base["token_ids"]
            r["first_difference"] = first_difference(r["token_ids"], base["token_ids"])


def mark_divergences(records: list[dict], reference: str | None,
                     prompt_ids: dict[int, list[int]], margin) -> dict:
    """Where a record's greedy tokens differ from the reference's on its prompt, the target's
    logit margin at the first difference (``divergence``: ``margin(prompt_ids, common_prefix,
    reference_token, this_token)``, :func:`benchmarks.divergence.margin` in the bench), and a
    summary: how many records were compared, how many differ, how many of those are near-ties
    of the dtype. Where one output is a prefix of the other (no differing token to weigh), the
    divergence has ``near_tie`` None: not a measured near-tie. After :func:`mark_identical`."""
    ref = references(records, reference)
    compared = alone = 0
    for r in records:
        base = ref.get(r["prompt"])
        if base is None or base is r:
            continue
        compared += 1
        alone += base["concurrency"] == 1
        d = r.get("first_difference")
        if d is None:
            continue
        mine, theirs = r["token_ids"], base["token_ids"]
        where = {"position": d, "reference": reference,
                 "reference_concurrency": base["concurrency"]}
        if mine is None:  # HTTP: text, no ids to weigh
            where.update(near_tie=None, margin=None, noise=None,
                         note=f"text over HTTP differs at character {d} ({r['new_tokens']} vs "
                              f"{len(theirs)} tokens); no token ids to weigh")
        elif d < min(len(mine), len(theirs)):
            where.update(margin(prompt_ids[r["prompt"]], mine[:d], theirs[d], mine[d]))
        else:
            where.update(near_tie=None, margin=None, noise=None,
                         note=f"one output is a prefix of the other ({len(mine)} vs "
                              f"{len(theirs)} tokens)")
        r["divergence"] = where
    div = [r["divergence"] for r in records if r.get("divergence")]
    return {"reference": reference, "compared": compared, "against_alone": alone,
            "divergences": len(div), "near_ties": sum(v["near_tie"] is True for v in div)}


def divergence_goal(summary: dict, dtype: str) -> dict:
    """Every greedy divergence from the reference is a measured near-tie."""
    name = f"{'bf16' if dtype == 'bfloat16' else dtype} divergences are near-ties"
    n, ties, ref = summary["divergences"], summary["near_ties"], summary["reference"]
    if not summary["compared"]:
        return {"goal": name, "value": None, "target": 0, "at_most": True, "met": None,
                "figures": f"needs {ref or 'ar'} and another contender", "unit": "count"}
    return {"goal": name, "value": n - ties, "target": 0, "at_most": True, "met": n == ties,
            "figures": f"{n} of {summary['compared']} greedy requests differ from {ref}'s "
                       f"tokens, {ties} of them near-ties", "unit": "count"}


class Margins:
    """The target's logit margin at a divergence (:func:`benchmarks.divergence.margin`), with the
    target in this process: the one the bench already holds, else loaded on the first call, on
    the services' device and dtype."""

    def __init__(self, held, name: str, device: str, dtype: str):
        self.target = held if getattr(held, "model", None) is not None else None
        self.name, self.device, self.dtype = name, device, dtype

    def __call__(self, prompt_ids: list[int], prefix: list[int], reference_id: int,
                 other_id: int) -> dict:
        from benchmarks.divergence import margin
        from specdec.models import load_model

        if self.target is None:
            print(f"loading {self.name} ({self.dtype}) in this process to weigh divergences ...",
                  flush=True)
            self.target = load_model(self.name, self.device, self.dtype)
        return margin(self.target, prompt_ids, prefix, reference_id, other_id)


# -- goals ----------------------------------------------------------------------------------------


def rate(phases: dict, contender: str, c: int) -> float | None:
    return phases.get(contender, {}).get(c, {}).get("tokens_per_s")


def goals(phases: dict, concurrency: list[int], rss: dict | None) -> list[dict]:
    """The load bench's goals, each with its figures; ``met`` None where the run lacks the data."""
    out = []

    def goal(name: str, value: float | None, target: float, figures: str, need: str,
             at_most: bool = False) -> None:
        met = None if value is None else (value <= target if at_most else value >= target)
        out.append({"goal": name, "value": value, "target": target, "at_most": at_most,
                    "met": met, "figures": figures if value is not None else need})

    one = rate(phases, "pearl", 1)
    for c, x in ((4, 3.0), (8, 5.0)):
        r = rate(phases, "pearl", c)
        goal(f"pearl at {c} concurrent / pearl one at a time", r / one if r and one else None, x,
             f"{r or 0:.2f} / {one or 0:.2f} tok/s", f"needs pearl at concurrency 1 and {c}")
    for c in (4, 8):
        for hf, x in (("hf-padded-1t", 1.5), ("hf-padded-all", 1.2)):
            r, h = rate(phases, "pearl", c), rate(phases, hf, c)
            goal(f"pearl / {hf} at {c} concurrent", r / h if r and h else None, x,
                 f"{r or 0:.2f} / {h or 0:.2f} tok/s", f"needs pearl and {hf} at concurrency {c}")
    for c in concurrency:
        r, a = rate(phases, "pearl", c), rate(phases, "ar", c)
        goal(f"pearl / ar (same services) at {c} concurrent", r / a if r and a else None, 1.0,
             f"{r or 0:.2f} / {a or 0:.2f} tok/s", f"needs pearl and ar at concurrency {c}")
    alone = phases.get("pearl", {}).get(1, {}).get("latency_p50_s")
    p99 = phases.get("pearl", {}).get(8, {}).get("latency_p99_s")
    goal("pearl p99 latency at 8 concurrent / one request alone (p50 at 1)",
         p99 / alone if p99 and alone else None, 3.0, f"{p99 or 0:.2f} s / {alone or 0:.2f} s",
         "needs pearl at concurrency 1 and 8", at_most=True)
    if "pearl" in phases and "pearl-http" in phases and concurrency:
        hi = max(concurrency)
        h, r = rate(phases, "pearl-http", hi), rate(phases, "pearl", hi)
        goal(f"pearl-http / pearl (HTTP against gRPC) at {hi} concurrent",
             h / r if h and r else None, HTTP_GOAL, f"{h or 0:.2f} / {r or 0:.2f} tok/s",
             f"needs pearl and pearl-http at concurrency {hi}")
    if rss and rss.get("growth"):
        worst = max(rss["growth"], key=lambda k: rss["growth"][k])
        figs = ", ".join(f"{k} {rss['after_first_mb'][k]:.0f} -> {rss['at_end_mb'][k]:.0f} MB"
                         for k in rss["growth"])
        goal(f"RSS growth over a {rss['requests']}-request mixed load (worst: {worst})",
             rss["growth"][worst], 0.10, figs, "", at_most=True)
    else:
        goal("RSS growth over a 200-request mixed load", None, 0.10, "",
             "run with --rss-check", at_most=True)
    return out


# -- KV bytes per token ---------------------------------------------------------------------------


def kv_from_config(config, dtype: str) -> int:
    """Bytes of K and V per token of a model with ``config`` in ``dtype``: the engine's own figure
    (``KVStore.bytes_per_token``) for a store of that shape, made on the meta device (no
    memory)."""
    import torch

    from specdec.batch_forward import head_dim
    from specdec.kv_store import KVStore
    from specdec.models import parse_dtype

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    store = KVStore(cfg.num_hidden_layers, kv_heads, head_dim(cfg), 1, parse_dtype(dtype),
                    torch.device("meta"))
    return store.bytes_per_token


def kv_bytes(role: str, address: str | None, config, dtype: str) -> dict:
    """From the service's GetModelInfo where the service runs and reports it, else from the
    model config (:func:`kv_from_config`)."""
    if address:
        import grpc

        from protos.v1 import pearl_pb2 as pb
        from protos.v1 import pearl_pb2_grpc
        from specdec.serving import CHANNEL_OPTIONS

        stub = (pearl_pb2_grpc.TargetServiceStub if role == "target"
                else pearl_pb2_grpc.DraftServiceStub)
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
            info = stub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        if info.kv_bytes_per_token:
            return {"bytes": int(info.kv_bytes_per_token), "source": "GetModelInfo"}
    if config is None:
        return {"bytes": None, "source": "unknown (no config)"}
    return {"bytes": kv_from_config(config, dtype),
            "source": "the engine's KV store for the model config (GetModelInfo did not say)"}
