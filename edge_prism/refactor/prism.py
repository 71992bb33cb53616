"""The prism checkpoint: a self-contained directory holding a refactored model.

    prism.json            manifest: format version, source and its hash, family + config,
                          sub-experts per expert, gate kinds, default operating point,
                          calibration and solver figures, file sizes
    dense.safetensors     every always-resident weight, Hugging Face names
    experts.safetensors   per layer one tensor [E*S, 3, n, D]: each sub-expert one contiguous
                          block (gate rows, up rows, down columns as [D, n]), hottest first;
                          ``layers.L.order`` [E*S] gives the unit id (e*S+s) at each position
    gates.safetensors     per layer: neuron permutation [E, W], sub-expert gates (proxy and
                          linear), activation profile (selection frequency [E*S])
    quality.json          measured perplexity per operating point (written by eval)

Written into a temporary directory beside the target, then renamed into place, so a
failed run never leaves a half-written checkpoint and never touches the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from edge_prism.errors import ConfigError, PrismCheckpointError
from edge_prism.loaders.safetensors_mmap import SafetensorsFile, SafetensorsSource

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: W_down columns stored [D, n] in each block
MANIFEST = "prism.json"
DENSE, EXPERTS, GATES, QUALITY = "dense.safetensors", "experts.safetensors", "gates.safetensors", "quality.json"


def is_prism(path: Path) -> bool:
    """Whether ``path`` is a prism checkpoint directory."""
    return path.is_dir() and (path / MANIFEST).exists()


def hash_files(files: list[Path]) -> str:
    """sha256 over the names and bytes of ``files`` (order-independent)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_out_dir(out: Path, *, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced (before any slow work)."""
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not is_prism(out):
        raise ConfigError(f"{out}: exists and is not a prism checkpoint; refusing to replace it, "
                          "choose another --out")


def write_prism(out: Path, *, manifest: dict, dense: dict[str, torch.Tensor],
                experts: dict[str, torch.Tensor], gates: dict[str, torch.Tensor], force: bool,
                extra: Callable[[Path], None] | None = None) -> None:
    """Write a prism checkpoint atomically (same inputs give the same bytes).

    ``extra(dir)`` writes further files (the tokenizer) into the directory before it is
    renamed into place.
    """
    check_out_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        files = {DENSE: dense, EXPERTS: experts, GATES: gates}
        for name, tensors in files.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
                      metadata={"format": "pt"})
        manifest = dict(manifest, format_version=FORMAT_VERSION,
                        file_sizes={name: (tmp / name).stat().st_size for name in files})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class PrismCheckpoint:
    """An opened prism checkpoint: manifest plus memory-mapped files."""

    path: Path
    manifest: dict
    dense: SafetensorsSource
    experts: SafetensorsFile
    gates: SafetensorsFile

    @property
    def config(self) -> dict:
        """The source model's Hugging Face config dict."""
        return self.manifest["config"]

    @property
    def parts(self) -> list[int]:
        """Sub-experts per expert, per layer."""
        return list(self.manifest["sub_experts"])

    def order(self, layer: int) -> torch.Tensor:
        """Unit id (e*S+s) at each storage position of ``layer`` [E*S]."""
        return self.experts.get(f"layers.{layer}.order")

    def blocks(self, layer: int) -> torch.Tensor:
        """The layer's blocks in storage order [E*S, 3, n, D] (mmap view)."""
        return self.experts.get(f"layers.{layer}.blocks")

    def block_range(self, layer: int) -> tuple[int, int]:
        """(offset, nbytes) of ``layer``'s block tensor in experts.safetensors."""
        return self.experts.byte_range(f"layers.{layer}.blocks")

    def gate_tensor(self, name: str) -> torch.Tensor:
        """A tensor of gates.safetensors."""
        return self.gates.get(name)

    def quality(self) -> list[dict]:
        """Measured quality curve rows, [] when none was measured."""
        q = self.path / QUALITY
        if not q.exists():
            return []
        try:
            return json.loads(q.read_text())
        except json.JSONDecodeError:
            raise PrismCheckpointError(f"{q}: not valid JSON; delete it and run edge-prism eval again") from None


def open_prism(path: Path, *, check_source: bool = True) -> PrismCheckpoint:
    """Open and check a prism checkpoint; clear errors for damaged, foreign or stale ones."""
    man_path = path / MANIFEST
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise PrismCheckpointError(f"{man_path}: unreadable manifest; the prism checkpoint is damaged, "
                                   "rebuild it with edge-prism refactor --force") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise PrismCheckpointError(f"{man_path}: format version {version}, this edge-prism reads "
                                   f"{FORMAT_VERSION}; rebuild it with edge-prism refactor --force")
    for name, size in manifest.get("file_sizes", {}).items():
        f = path / name
        if not f.exists() or f.stat().st_size != size:
            have = f.stat().st_size if f.exists() else "missing"
            raise PrismCheckpointError(f"{f}: expected {size} bytes, found {have}; the prism checkpoint "
                                       "is damaged, rebuild it with edge-prism refactor --force")
    if check_source:
        _check_source(path, manifest)
    return PrismCheckpoint(path=path, manifest=manifest, dense=SafetensorsSource([path / DENSE]),
                           experts=SafetensorsFile(path / EXPERTS), gates=SafetensorsFile(path / GATES))


def file_stats(files: list[Path]) -> list[list[int]]:
    """(size, mtime_ns) of each file: a cheap test before re-hashing a large source."""
    return [[f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _check_source(path: Path, manifest: dict) -> None:
    src = manifest.get("source", {})
    files = [Path(p) for p in src.get("files", [])]
    # The checkpoint is self-contained: a source that is gone is fine, one that changed is stale.
    if not files or not all(f.exists() for f in files) or file_stats(files) == src.get("stats"):
        return
    if hash_files(files) != src.get("sha256"):
        raise PrismCheckpointError(
            f"{path}: stale, its source model {src.get('path')} changed since it was refactored; "
            f"rebuild it with edge-prism refactor {src.get('path')} --out {path} --force")
