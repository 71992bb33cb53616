"""Hugging Face checkpoint directories: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from edge_prism.errors import CorruptCheckpointError, ModelNotFoundError, UnsupportedModelError
from edge_prism.loaders.base import RawCheckpoint
from edge_prism.loaders.safetensors_mmap import SafetensorsSource

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: Path) -> UnsupportedModelError:
    """The error for pickle-based checkpoints, which can run code when loaded."""
    return UnsupportedModelError(
        f"{path}: pickle-based checkpoints (.bin/.pt) are refused because loading them can run "
        "arbitrary code; convert the model to safetensors (or GGUF) and load that")


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorruptCheckpointError(f"{index}: not a valid safetensors index; "
                                         "restore it or remove it and keep one model.safetensors") from None
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


def load_hf_dir(path: Path) -> RawCheckpoint:
    """Open an HF checkpoint directory; tensors stay memory-mapped."""
    from edge_prism.tokenizer import Tokenizer

    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{path}: no config.json; point at a Hugging Face model directory, "
                                 "a .gguf file or a prism checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno}); "
                                     "fix or re-download it") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{cfg_path}: expected a JSON object; fix or re-download it")
    files = _shards(path)
    source = SafetensorsSource(files)
    tokenizer = Tokenizer.from_hf_dir(path)
    extra = [p for p in (cfg_path, path / "tokenizer.json", path / "tokenizer_config.json") if p.exists()]
    return RawCheckpoint(path=path, config=config, tensors=source, tokenizer=tokenizer,
                         files=extra + files)
