"""Model loading for the services: real models by name, and tiny random ones for tests.

`load_model` resolves a name through `model_store` (registry model, local folder or Hugging Face id)
and returns the model, its tokenizer, device and dtype together. `tiny_model` builds a small random
Qwen2 from a config in code; two seeds give a draft and a target that share one vocabulary, and
`tiny_loaded` pairs it with a character-level tokenizer built in code (no download).
"""

from __future__ import annotations

import copy
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from specdec import model_store

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")
UNK = "<unk>"

log = logging.getLogger("pearl.models")


@dataclass
class LoadedModel:
    """A model ready for inference, with what the services need to know about it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def parse_device(device: str) -> torch.device:
    """`cpu` or `cuda` (`cuda:N` too); CUDA must be available."""
    dev = torch.device(device)
    if dev.type not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


def parse_dtype(dtype: str) -> torch.dtype:
    """One of `bfloat16`, `float32`, `float16`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads; one inter-op thread unless it was already fixed."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has already started
        pass


RANDOM = "random:"  # model names `random:<shape>`: random weights in a real model's shape
# The shapes of real models (their config.json), for timing runs on machines that cannot hold the
# real weights (docs/design.md section 8). One vocabulary, the Qwen2.5 tokenizer's embedding size
# (the 7B and 14B pad theirs to 152,064), so that any two make a draft/target pair.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    # not a real model: the same code path in seconds on a CPU (scripts/gpu_check.sh --cpu-dry-run)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def tokenizer_folder(name: str) -> Path | str:
    """Where ``name``'s tokenizer is: for ``random:<shape>`` the Qwen2.5 one
    (``$PEARL_RANDOM_TOKENIZER``, a folder, or the registry draft's), else the model's own."""
    import os

    if name.startswith(RANDOM):
        return os.environ.get("PEARL_RANDOM_TOKENIZER") or model_store.resolve(
            "qwen2.5-coder-0.5b-instruct")
    return model_store.resolve(name)


def random_model(name: str, dev: torch.device, dt: torch.dtype, seed: int = 0) -> LoadedModel:
    """``random:<shape>``: a Qwen2 of that shape with random weights fixed by ``seed`` (the same
    in every process on the same device) and no end-of-sequence token. Its tokenizer is the
    Qwen2.5 one: ``$PEARL_RANDOM_TOKENIZER`` (a folder) or the registry draft's.

    The weights are random but *decisive*: the embeddings are scaled up, the layers' output
    projections down, and the LM head is tied to the embeddings, so the residual stream keeps the
    token's own embedding and greedy decoding picks it again with a margin far above rounding.
    Plain random weights give near-flat logits whose argmax flips between code paths (a window
    of 4 tokens against one at a time, in bfloat16); then the services and the references
    disagree and a replaying draft (draft_service/replay.py) cannot supply the acceptance asked
    of it. Forward times do not depend on the values of the weights.
    """
    shape = name.removeprefix(RANDOM)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in {name!r}; known: {sorted(SHAPES)}")
    config = Qwen2Config(vocab_size=151_936, max_position_embeddings=32_768, rope_theta=1e6,
                         rms_norm_eps=1e-6, use_sliding_window=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
                         **SHAPES[shape])
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=dt).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # pre-norm layers' outputs do not grow with it
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(name))
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=dt)


def load_model(
    name: str,
    device: str = "cpu",
    dtype: str = "bfloat16",
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `name` (registry model, local folder, Hugging Face id, or `random:<shape>`) in eval
    mode on `device`."""
    dev, dt = parse_device(device), parse_dtype(dtype)
    set_threads(threads)
    if name.startswith(RANDOM):
        return random_model(name, dev, dt)
    path = model_store.resolve(name, cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    model = model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    beyond = beyond_vocab(tokenizer, model.config.vocab_size)
    if beyond:  # e.g. an eos_token missing from the vocabulary, added by transformers at the end
        log.warning("%s: the tokenizer has %d token(s) beyond the model's vocabulary of %d, which "
                    "the model has no embedding for: %s; a prompt that tokenizes to them is "
                    "refused", name, len(beyond), model.config.vocab_size,
                    ", ".join(f"{i} {t!r}" for i, t in list(beyond.items())[:10]))
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=dt)


def beyond_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[int, str]:
    """The tokenizer's ids (added tokens included) that the model's vocabulary lacks, by id."""
    return {i: t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            if i >= vocab_size}


def tiny_config(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> Qwen2Config:
    """A small Qwen2 config with no special tokens, so generation never stops early."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )


def tiny_model(seed: int, **shape: int) -> Qwen2ForCausalLM:
    """A random float32 Qwen2 in eval mode, its weights fixed by `seed`; `shape` as `tiny_config`."""
    config = tiny_config(**shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    gc = model.generation_config
    gc.bos_token_id = gc.eos_token_id = gc.pad_token_id = None
    return model


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A character-level tokenizer of exactly `vocab_size` ids, built in code.

    Id 0 is `<unk>`; then the printable ASCII characters (space first) one id each; the remaining
    ids are pieces `<i>` that only decode (text never encodes to them). Text round-trips through
    encode/decode when it uses only characters in the vocabulary; anything else encodes to `<unk>`.
    Its `backend_tokenizer.to_str()` is self-contained: `Tokenizer.from_str` of it works alone.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    chars = [" "] + [c for c in string.printable if not c.isspace()] + ["\n", "\t"]
    pieces = [UNK, *chars][:vocab_size]
    pieces += [f"<{i}>" for i in range(len(pieces), vocab_size)]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([UNK])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, clean_up_tokenization_spaces=False)


def tiny_loaded(seed: int, **kw: Any) -> LoadedModel:
    """`tiny_model(seed, **kw)` with a matching `tiny_tokenizer`, on CPU in float32."""
    model = tiny_model(seed, **kw)
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    return LoadedModel(
        name=f"tiny-{seed}", model=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32
    )


def noisy_copy(loaded: LoadedModel, seed: int, scale: float) -> LoadedModel:
    """A draft that agrees with ``loaded`` often but not always: its weights plus noise."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return LoadedModel(f"{loaded.name}-noisy{seed}", model, loaded.tokenizer, loaded.device,
                       loaded.dtype)
