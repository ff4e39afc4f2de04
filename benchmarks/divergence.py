"""Greedy outputs that differ: where, the target's logit margin there, and the text that reports
them. In bf16 another order of the same arithmetic (a batch, a window, a cached prefix) can turn
a near-tie of the target's logits the other way; a divergence that is not a near-tie is a bug.
"""

from __future__ import annotations

NEAR_TIE = ("the target's logits at the first difference, recomputed in this process over the "
            "common prefix; near-tie: a margin within twice the noise between a full pass and a "
            "KV-cached step there, or two ulp")


def first_difference(a, b) -> int | None:
    """The first index where two sequences (token ids or texts) differ; the shorter one's length
    where one is a prefix of the other; None where they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def margin(target, prompt_ids: list[int], prefix: list[int], reference_id: int,
           other_id: int) -> dict:
    """The target's logits of two candidate tokens after ``prompt_ids + prefix`` (``target``: a
    loaded model in this process, the dtype of the run), and whether their gap is within the
    rounding noise of the dtype: a near-tie, where another order of the same arithmetic (a
    KV-cached pass, another window length) may pick either.

    The noise is measured at the same position: the largest difference, over the 20 most
    likely tokens, between the logits of one pass over the whole sequence and of a pass that
    feeds the last token alone on top of a KV cache (the two paths the services take). A gap
    within twice that noise (or two units in the last place of the top logit) is a near-tie.
    """
    import math

    import torch
    from transformers import DynamicCache

    seq = prompt_ids + prefix
    x = torch.tensor([seq], device=target.device)
    with torch.inference_mode():
        full = target.model(x, logits_to_keep=1).logits[0, -1].float()
        cache = DynamicCache(config=target.model.config)
        target.model(x[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        step = target.model(x[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1].float()
    top = full.topk(20).indices
    noise = float((full[top] - step[top]).abs().max())
    ref, other = float(full[reference_id]), float(full[other_id])
    biggest = max(abs(ref), abs(other), 1e-30)
    dtype = target.model.dtype
    mantissa = {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23)
    ulp = 2.0 ** (math.floor(math.log2(biggest)) - mantissa)
    return {"reference_id": reference_id, "other_id": other_id, "reference_logit": ref,
            "other_logit": other, "margin": ref - other, "ulp": ulp, "noise": noise,
            "cached_margin": float(step[reference_id] - step[other_id]),
            "near_tie": abs(ref - other) <= max(2 * ulp, 2 * noise), "dtype": str(dtype)}


def weighed(v: dict, reference: str) -> str:
    """One divergence in words: the two tokens' logits and the margin, or why it was not weighed
    (``near_tie`` None: ``note`` says)."""
    if v.get("near_tie") is None:
        return v["note"]
    cached = f" (cached step {v['cached_margin']:.4f})" if "cached_margin" in v else ""
    return (f"{reference} {v['reference_id']} logit {v['reference_logit']:.4f}, this "
            f"{v['other_id']} logit {v['other_logit']:.4f}, margin {v['margin']:.4f}{cached}, "
            f"noise {v['noise']:.4f}, ulp {v['ulp']:.4f}")


def divergence_text(head: str, found: list[tuple[str, dict]], reference: str) -> str:
    """``head``, then every divergence (``found``: where, in words, and its :func:`margin` dict),
    and loudly the ones that are not near-ties."""
    lines, loud = [head], []
    for where, v in found:
        what, tie = weighed(v, reference), v.get("near_tie") is True
        lines.append(f"  {where}: {what}: {'near-tie' if tie else 'NOT a near-tie'}")
        if not tie:
            loud.append(f"!!! {where}: {what}")
    if loud:
        bar = "!" * 100
        lines += [bar, f"!!! {len(loud)} divergence(s) NOT a near-tie: the tokens differ where "
                       "the target's choice is clear, not by rounding", *loud, bar]
    return "\n".join(lines)
