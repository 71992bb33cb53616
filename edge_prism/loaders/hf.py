"""Hugging Face checkpoint directories: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge_prism.errors import (CorruptCheckpointError, FileAccessError, ModelNotFoundError, PrismCheckpointError,
                               UnsupportedModelError)
from edge_prism.loaders.base import RawCheckpoint
from edge_prism.loaders.safetensors_mmap import SafetensorsSource, unreadable

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: Path) -> UnsupportedModelError:
    """The error for pickle-based checkpoints, which can run code when loaded."""
    return UnsupportedModelError(
        f"{path}: pickle-based checkpoints (.bin/.pt) are refused because loading them can run "
        "arbitrary code; convert the model to safetensors (or GGUF) and load that")


def read_json_file(path: Path, *, fix: str) -> object:
    """The JSON value in ``path``; a one-line error for a file that cannot be read or parsed.

    ``fix`` ends the message when the file itself is bad (not valid UTF-8 JSON).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                     f"{e.start}); {fix}") from None
    except OSError as e:
        raise unreadable(path, e) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None


def _check_readable_dir(path: Path) -> None:
    """The directory can be listed and its entries reached (read and execute permission)."""
    try:
        os.listdir(path)
        os.stat(path / "config.json")
    except FileNotFoundError:
        pass
    except PermissionError:
        raise FileAccessError(f"{path}: permission denied reading the model directory; make it readable "
                              f"and searchable (chmod a+rx {path}) or run as a user who can") from None


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        fix = "restore it, or remove it and keep one model.safetensors"
        data = read_json_file(index, fix=fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index}: no 'weight_map' object; not a valid safetensors index; {fix}")
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise CorruptCheckpointError(f"{index}: tensor {tensor!r} maps to {name!r}, not a shard file "
                                             f"name in this directory; {fix}")
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CorruptCheckpointError(f"{f}: listed in {index.name} but missing; "
                                             "download the missing shard")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in sorted(path.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise refuse_pickle(pickles[0])
    raise ModelNotFoundError(f"{path}: no *.safetensors weights in this directory; "
                             "point at a directory holding config.json and model.safetensors")


def _no_config(path: Path) -> Exception:
    from edge_prism.refactor.prism import DENSE, EXPERTS, GATES, MANIFEST

    prism_files = [name for name in (DENSE, EXPERTS, GATES) if (path / name).exists()]
    if prism_files:  # a prism checkpoint that lost its manifest, not an HF directory
        return PrismCheckpointError(f"{path / MANIFEST}: missing, but {path} holds {', '.join(prism_files)} "
                                    "of a prism checkpoint; it is damaged, rebuild it with "
                                    f"`edge-prism refactor --force SOURCE_MODEL --out {path}`")
    return ModelNotFoundError(f"{path}: no config.json; point at a Hugging Face model directory, "
                              "a .gguf file or a prism checkpoint")


def load_hf_dir(path: Path) -> RawCheckpoint:
    """Open an HF checkpoint directory; tensors stay memory-mapped."""
    from edge_prism.tokenizer import Tokenizer

    _check_readable_dir(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise _no_config(path)
    config = read_json_file(cfg_path, fix="fix or re-download it")
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{cfg_path}: expected a JSON object; fix or re-download it")
    files = _shards(path)
    source = SafetensorsSource(files)
    tokenizer = Tokenizer.from_hf_dir(path)
    extra = [p for p in (cfg_path, path / "tokenizer.json", path / "tokenizer_config.json") if p.exists()]
    return RawCheckpoint(path=path, config=config, tensors=source, tokenizer=tokenizer,
                         files=extra + files)
