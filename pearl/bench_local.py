"""The in-process side of `pearl bench`: transformers' own generation as contenders, the draft's
teacher-forced agreement and the target's logit margins, and the tiny models that `--tiny` uses.

Contenders here run in the bench process itself with torch's intra-op threads and the CPU affinity
of the calling thread set per run (one core for ``-1t``, all cores for ``-all``). The torch thread
pool is created once with all cores allowed (``warm_pool``) before any pinning, so that the worker
threads of the ``-all`` runs are not stuck on the core a ``-1t`` run pinned.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from specdec.models import LoadedModel, load_model, noisy_copy, tiny_loaded

ALL_CPUS = sorted(os.sched_getaffinity(0))


def pin(cpus) -> None:
    """Pin the calling thread (Linux: pid 0 is the calling thread) to ``cpus``."""
    os.sched_setaffinity(0, set(cpus))


def warm_pool(model) -> None:
    """Run one forward with all cores and threads so torch's pool threads start unpinned."""
    pin(ALL_CPUS)
    torch.set_num_threads(len(ALL_CPUS))
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]], device=next(model.parameters()).device))


# -- tiny models (for --tiny and the CI test) -----------------------------------------------------


def load_pair(draft: str, target: str, dtype: str, tiny: bool,
              device: str = "cpu") -> tuple[LoadedModel, LoadedModel]:
    if tiny:
        t = tiny_loaded(2)
        return noisy_copy(t, 7, 0.08), t
    return load_model(draft, device, dtype), load_model(target, device, dtype)


def sync(model) -> None:
    """Wait for the GPU (a timer must not stop while kernels are still queued)."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -- transformers contenders ----------------------------------------------------------------------


class Counter:
    """Counts forward calls of a module with a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


@dataclass
class LocalRun:
    token_ids: list[int]
    wall_s: float
    target_forwards: int
    draft_forwards: int
    extra: dict = field(default_factory=dict)


class Local:
    """The target (and draft) loaded in this process; runs `generate` as a contender."""

    def __init__(self, draft: LoadedModel, target: LoadedModel, window: int):
        self.draft, self.target, self.window = draft, target, window
        self.tcount = Counter(target.model)
        self.dcount = Counter(draft.model)
        eos = target.model.generation_config.eos_token_id
        self.pad = target.model.generation_config.pad_token_id
        if self.pad is None:
            self.pad = (eos[0] if isinstance(eos, list) else eos) or 0
        self.device = target.device
        warm_pool(target.model)

    def configure_assistant(self, setting: str) -> dict:
        """transformers reads the assisted-generation settings only from the assistant's
        ``generation_config`` (passed to ``generate()`` they are silently ignored)."""
        gc = self.draft.model.generation_config
        if setting == "default":  # unset: transformers' own defaults apply (20, constant, 0.4)
            gc.num_assistant_tokens = None
            gc.num_assistant_tokens_schedule = None
            gc.assistant_confidence_threshold = None
        else:
            gc.num_assistant_tokens = self.window
            gc.num_assistant_tokens_schedule = "constant"
            gc.assistant_confidence_threshold = 0.0
        return {"num_assistant_tokens": gc.num_assistant_tokens,
                "num_assistant_tokens_schedule": gc.num_assistant_tokens_schedule,
                "assistant_confidence_threshold": gc.assistant_confidence_threshold}

    def run(self, prompt_ids: list[int], max_new_tokens: int, threads: str,
            assisted: str | None = None) -> LocalRun:
        """``threads``: '1t' (one thread on one core) or 'all'; ``assisted``: None (plain greedy
        generation of the target), 'default' or 'fixed'."""
        cpus = ALL_CPUS[-1:] if threads == "1t" else ALL_CPUS
        pin(cpus)
        torch.set_num_threads(len(cpus))
        kw = {}
        extra = {"cpus": cpus, "torch_threads": len(cpus)}
        if assisted:
            extra["assistant_config"] = self.configure_assistant(assisted)
            kw["assistant_model"] = self.draft.model
        ids = torch.tensor([prompt_ids], device=self.device)
        t0, d0 = self.tcount.n, self.dcount.n
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.target.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=self.pad, **kw)
        sync(self.target.model)
        wall = time.perf_counter() - start
        pin(ALL_CPUS)
        new = out[0, len(prompt_ids):].tolist()
        return LocalRun(new, wall, self.tcount.n - t0, self.dcount.n - d0, extra)

    def agreement(self, prompt_ids: list[int], target_ids: list[int]) -> tuple[int, int]:
        """Teacher-forced per-token agreement: at how many of the target's greedy positions the
        draft's argmax is the target's token (one draft forward over prompt + target tokens)."""
        if not target_ids:
            return 0, 0
        seq = torch.tensor([prompt_ids + target_ids], device=self.device)
        with torch.inference_mode():
            logits = self.draft.model(seq).logits[0]
        n = len(prompt_ids)
        guess = logits[n - 1: n - 1 + len(target_ids)].argmax(-1).tolist()
        return sum(g == t for g, t in zip(guess, target_ids)), len(target_ids)


    def margin(self, prompt_ids: list[int], prefix: list[int], reference_id: int,
               other_id: int) -> dict:
        """The target's logit margin at a differing position: :func:`margin`."""
        return margin(self.target, prompt_ids, prefix, reference_id, other_id)


def margin(target: LoadedModel, prompt_ids: list[int], prefix: list[int], reference_id: int,
           other_id: int) -> dict:
    """The target's logits of two candidate tokens after ``prompt_ids + prefix`` (in this
    process, the dtype of the run), and whether their gap is within the rounding noise of the
    dtype: a near-tie, where another order of the same arithmetic (a KV-cached pass, another
    window length) may pick either.

    The noise is measured at the same position: the largest difference, over the 20 most
    likely tokens, between the logits of one pass over the whole sequence and of a pass that
    feeds the last token alone on top of a KV cache (the two paths the services take). A gap
    within twice that noise (or two units in the last place of the top logit) is a near-tie.
    """
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
