"""The models in the bench process: transformers' own generation as the latency bench's
contenders, the draft's teacher-forced agreement, the target's logit margins, the tiny models
that `--tiny` uses, and a model's tokenizer or config alone.

Contenders here run in the bench process itself with torch's intra-op threads and the CPU affinity
of the calling thread set per run (one core for ``-1t``, all cores for ``-all``). The torch thread
pool is created once with all cores allowed (``warm_pool``) before any pinning, so that the worker
threads of the ``-all`` runs are not stuck on the core a ``-1t`` run pinned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from benchmarks.divergence import margin
from benchmarks.hardware import ALL_CPUS, pin
from specdec.models import LoadedModel, load_model, noisy_copy, tiny_loaded


def warm_pool(model) -> None:
    """Run one forward with all cores and threads so torch's pool threads start unpinned."""
    pin(ALL_CPUS)
    torch.set_num_threads(len(ALL_CPUS))
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]], device=next(model.parameters()).device))


# -- the pair, tiny models (for --tiny and the CI test), a tokenizer or config alone ---------------


def load_pair(draft: str, target: str, dtype: str, tiny: bool,
              device: str = "cpu") -> tuple[LoadedModel, LoadedModel]:
    if tiny:
        t = tiny_loaded(2)
        return noisy_copy(t, 7, 0.08), t
    return load_model(draft, device, dtype), load_model(target, device, dtype)


def untrained(loaded):
    """Copy-forward transfer layers for --tiny (a harness check: the mode runs, drafts poorly)."""
    from target_service.hidden_transfer.layers import Transfer, TransferLayers

    cfg = loaded.model.config
    layers = TransferLayers(cfg.hidden_size, cfg.num_hidden_layers // 2, 3, 8)
    return Transfer(layers, loaded.name)


def tokenizer_only(name: str):
    """A stand-in for a loaded model when only its tokenizer is needed."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from specdec.models import tokenizer_folder

    return SimpleNamespace(model=None, tokenizer=AutoTokenizer.from_pretrained(
        tokenizer_folder(name)))


def model_config(name: str):
    """``name``'s transformers config, or None where it cannot be had."""
    try:
        from transformers import AutoConfig

        from specdec import model_store

        return AutoConfig.from_pretrained(model_store.resolve(name, progress=False))
    except Exception:
        return None


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
        """The target's logit margin at a differing position (benchmarks/divergence.py)."""
        return margin(self.target, prompt_ids, prefix, reference_id, other_id)
