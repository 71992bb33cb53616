"""Loaders: a model name or path -> RawCheckpoint (HF-style config, lazy tensors, tokenizer)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from edge_prism.errors import ModelNotFoundError
from edge_prism.loaders.base import RawCheckpoint, TensorSource
from edge_prism.loaders.hf import load_hf_dir, refuse_pickle
from edge_prism.loaders.safetensors_mmap import unreadable

DEFAULT_MODEL = "default"

__all__ = ["RawCheckpoint", "TensorSource", "resolve_model", "open_checkpoint", "DEFAULT_MODEL"]


def resolve_model(model: str | Path | None) -> Path:
    """The path a model argument names; ``None`` or ``'default'`` is the bundled default model."""
    if model is None or str(model) == DEFAULT_MODEL:
        from edge_prism.loaders.default import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ModelNotFoundError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; "
                                     "fix the link or give the model's real path") from None
        raise ModelNotFoundError(f"{path}: no such file or directory; give a Hugging Face model "
                                 "directory, a .gguf file, a prism checkpoint, or 'default'") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModelNotFoundError(f"{path}: a loop of symbolic links (it leads back to itself); fix the "
                                     "link or give the model's real path") from None
        raise unreadable(path, e) from None
    return path


def open_checkpoint(path: Path) -> RawCheckpoint:
    """Open a plain checkpoint (HF directory or GGUF file) at ``path``."""
    if path.is_dir():
        return load_hf_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from edge_prism.loaders.gguf import load_gguf

        return load_gguf(path)
    if suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise refuse_pickle(path)
    if suffix == ".safetensors":
        raise ModelNotFoundError(f"{path}: a lone safetensors file has no config; "
                                 "point at the directory holding it and its config.json")
    raise ModelNotFoundError(f"{path}: not a model; give a Hugging Face model directory, "
                             "a .gguf file, a prism checkpoint, or 'default'")
