"""The prism checkpoint: a self-contained directory holding a refactored model.

    prism.json            manifest: format version, source and its hash, family + config,
                          sub-experts per expert, gate kinds, default operating point,
                          calibration and solver figures, file sizes and sha256 checksums
    dense.safetensors     every always-resident weight, Hugging Face names; a quantized one as
                          ``NAME.qcodes`` / ``NAME.qsz`` / ``NAME.qmeta`` (quant.QMatrix)
    experts.safetensors   per layer one tensor: each sub-expert one contiguous block, hottest
                          first; float [E*S, 3, n, D] (gate rows, up rows, down columns as
                          [D, n]) or, quantized, bytes [E*S, B] (quant.UnitFormat, recorded
                          in the manifest's "quant" entry); ``layers.L.order`` [E*S] gives
                          the unit id (e*S+s) at each position
    gates.safetensors     per layer: neuron permutation [E, W], sub-expert gates (proxy and
                          linear), activation profile (selection frequency [E*S])
    quality.json          measured perplexity per operating point (written by eval)

Written into a temporary directory beside the target, fsynced, then renamed into place, so a
failed run never leaves a half-written checkpoint and never touches the previous one. One
writer per output at a time (``output_lock``); the next writer cleans up after a killed one.
Opening checks every file's size and sha256 and that the index tensors are permutations.
"""

from __future__ import annotations

import hashlib
import json
import struct
import math
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from edge_prism.quant import QMatrix, UnitFormat
from edge_prism.errors import (ConfigError, CorruptCheckpointError, FileAccessError, OutputBusyError,
                               PrismCheckpointError)
from edge_prism.loaders.safetensors_mmap import SafetensorsFile, SafetensorsSource

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 2: W_down columns stored [D, n] in each block; 3: quantized blocks and weights;
# 4: quantized blocks hold their code tiles k-major (quant.MatrixLayout.codes_view)
MANIFEST = "prism.json"
DENSE, EXPERTS, GATES, QUALITY = "dense.safetensors", "experts.safetensors", "gates.safetensors", "quality.json"


def is_prism(path: Path) -> bool:
    """Whether ``path`` is a prism checkpoint directory."""
    try:
        return path.is_dir() and (path / MANIFEST).exists()
    except OSError:  # not searchable: not known to be one; the loader says why it cannot read it
        return False


def hash_files(files: list[Path]) -> str:
    """sha256 over the names and bytes of ``files`` (order-independent)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def file_checksums(directory: Path, names) -> dict[str, str]:
    """sha256 of each named file in ``directory``, the files hashed in parallel threads
    (hashlib releases the GIL; ~1.6 GB/s per core with SHA extensions)."""
    names = sorted(names)

    def digest(name: str) -> str:
        with open(directory / name, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    if len(names) < 2:
        return {name: digest(name) for name in names}
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(digest, names)))


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and a rename: readers see the
    old file or the new one, never a part."""
    path = Path(path)
    _remove_dead_leftovers(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as e:
        raise FileAccessError(f"{path}: cannot write it ({e.strerror}); make {path.parent} writable "
                              "or free some space") from None


def check_out_dir(out: Path, *, force: bool, need_bytes: int = 0, fix: str = "choose another --out") -> None:
    """Refuse an output that exists (unless forced), is not ours to replace, or cannot be
    written (read-only, or less than ``need_bytes`` free): before any slow work, and again
    under the writer lock right before the rename."""
    if os.path.lexists(out):
        if not force:
            raise ConfigError(f"{out}: already exists; pass --force to replace it, or {fix}")
        if not out.is_dir():
            raise ConfigError(f"{out}: exists and is not a directory; {fix}")
        if any(out.iterdir()) and not (is_prism(out) or any((out / f).exists() for f in (DENSE, EXPERTS, GATES))):
            raise ConfigError(f"{out}: exists and is not a prism checkpoint; refusing to replace it, {fix}")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FileAccessError(f"{parent}: cannot write there ({e.strerror}); {fix}") from None
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        from edge_prism.runtime.sizes import format_size

        raise FileAccessError(f"{parent}: {format_size(free)} free, but the prism checkpoint needs at least "
                              f"{format_size(need_bytes)}; free some space, or {fix}")


def estimate_prism_bytes(source: Path) -> int:
    """A lower bound of a prism checkpoint's size: the source's weight files (a prism stores
    every weight at the source's precision or wider), checked before any slow work."""
    source = Path(source)
    try:
        if source.is_dir():
            return sum(f.stat().st_size for f in source.glob("*.safetensors"))
        return source.stat().st_size
    except OSError:
        return 0  # the loader reports an unreadable source, with its own message


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}


class StreamedSafetensors:
    """A safetensors file written tensor by tensor, in a fixed order, so a refactoring of a
    model larger than memory never holds more than one layer's blocks.

    The header (every name, dtype and shape, known before the first block exists) is written
    first; each ``write`` appends the next tensor's bytes. The result is the format
    safetensors itself writes: the same inputs give the same bytes.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape)))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor, *, rows: torch.Tensor | None = None,
              chunk_bytes: int = 64 << 20) -> None:
        """Append ``name``, which must be the next entry, with its declared dtype and shape:
        ``tensor``, or ``tensor[rows]`` (its first dimension in that order), gathered and
        written ``chunk_bytes`` at a time, never as a whole reordered copy."""
        want, dtype, shape = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want, dtype, shape):
            raise ValueError(f"expected {want} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if rows is not None and tensor.numel():
            step = max(1, chunk_bytes // max(tensor[0].numel() * tensor.element_size(), 1))
            for i in range(0, rows.shape[0], step):
                self._append(tensor[rows[i:i + step]])
        elif tensor.numel():
            self._append(tensor.contiguous())
        self._next += 1

    def _append(self, tensor: torch.Tensor) -> None:
        self._file.write(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))  # no bytes copy

    def close(self) -> Path:
        """Flush to disk (every entry must have been written)."""
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.path

    def abort(self) -> None:
        """Close and delete a file that will not be finished."""
        self._file.close()
        self.path.unlink(missing_ok=True)


def streamed_experts_path(out: Path, kind: str = "experts") -> Path:
    """Where a refactoring streams experts.safetensors (``kind`` "gates": gates.safetensors)
    before the checkpoint is assembled (named like the writer's temporary files, so that the
    next writer cleans it up after a kill)."""
    return Path(out).parent / f".{Path(out).name}.tmp-{os.getpid()}-{kind}"


def write_prism(out: Path, *, manifest: dict, dense: dict[str, torch.Tensor],
                experts: dict[str, torch.Tensor] | Path, gates: dict[str, torch.Tensor] | Path, force: bool,
                extra: Callable[[Path], None] | None = None,
                finish: Callable[[Path], dict] | None = None) -> None:
    """Write a prism checkpoint atomically (same inputs give the same bytes).

    ``experts``, ``gates``: the tensors, or a file already written (StreamedSafetensors),
    moved into the checkpoint. ``extra(dir)`` writes further files (the tokenizer) into the
    directory before it is renamed into place. ``finish(dir)``: then, entries for the manifest
    measured on the written checkpoint (it is loaded from ``dir``); a failure there replaces
    nothing. Every file listed in ``file_sizes`` gets its sha256 in ``file_sha256``.
    """
    out = Path(out)
    with output_lock(out):
        check_out_dir(out, force=force)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
            files = {DENSE: dense, EXPERTS: experts, GATES: gates}
            for name, tensors in files.items():
                if isinstance(tensors, Path):
                    os.replace(tensors, tmp / name)
                    continue
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
                          metadata={"format": "pt"})
            manifest = dict(manifest, format_version=FORMAT_VERSION,
                            file_sizes={name: (tmp / name).stat().st_size for name in files})
            manifest["file_sha256"] = file_checksums(tmp, manifest["file_sizes"])
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            if extra is not None:
                extra(tmp)
            if finish is not None:
                manifest.update(finish(tmp))
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            _settle(tmp)
            _swap_in(tmp, out, force=force)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, SafetensorError)):
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise FileAccessError(f"{out}: writing the prism checkpoint failed ({why}); nothing was "
                                      "replaced; free some space or choose another --out") from e
            raise


def _swap_in(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out`` (under the writer lock); a replaced ``out`` is
    renamed aside first and deleted last, so a crash in between leaves it for ``_recover``."""
    parent = out.parent
    if os.path.lexists(out):
        if not force:  # appeared while we worked (not from an edge-prism writer: they hold the lock)
            raise ConfigError(f"{out}: already exists; pass --force to replace it, or choose another --out")
        old = parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        _fsync_dir(parent)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, out)
    _fsync_dir(parent)


def _settle(directory: Path) -> None:
    """Give the written files the mode the umask implies and put them on disk before a rename
    makes them visible (a crash must not leave a renamed directory of empty files)."""
    mode = 0o666 & ~_umask()
    for f in directory.iterdir():
        os.chmod(f, mode)  # safetensors writes 0600 through a temporary file
        fd = os.open(f, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without setting it where the OS allows (os.umask is process-wide
    and racy in threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- one writer per output -------------------------------------------------------------------
_held = threading.local()  # paths whose lock this thread holds -> depth (the lock is re-entrant)


@contextmanager
def output_lock(out: Path, *, wait: bool = False, fix: str = "choose another --out") -> Iterator[None]:
    """Hold the one-writer lock of output ``out`` for the body: ``.<name>.lock`` beside it
    (flock on POSIX, msvcrt on Windows, a lock directory where neither works).

    A second writer, in this process or another, fails fast with OutputBusyError; with
    ``wait`` it blocks until the first is done instead (a default prism's first use, which
    then reuses what the first built). Re-entrant in the holding thread. On taking the lock,
    what killed writers left beside ``out`` is cleaned up (``_recover``).
    """
    out = Path(os.path.abspath(out))
    held = _held.__dict__.setdefault("depth", {})
    key = str(out)
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileAccessError(f"{out.parent}: cannot create it ({e.strerror}); {fix}") from None
    release = _acquire(out, wait=wait, fix=fix)
    held[key] = 1
    try:
        _recover(out)
        yield
    finally:
        del held[key]
        release()


def _who(pid: int | None) -> str:
    return f"another edge-prism process (pid {pid})" if pid else "another edge-prism process"


def _busy(out: Path, pid: int | None, fix: str) -> OutputBusyError:
    return OutputBusyError(f"{out}: {_who(pid)} is writing it right now; wait for it to finish, or {fix}")


def _acquire(out: Path, *, wait: bool, fix: str) -> Callable[[], None]:
    """Take the lock file of ``out``; the function that gives it back."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise FileAccessError(f"{out.parent}: cannot create the lock file {path.name} ({e.strerror}); "
                                  f"{fix}") from None
        try:
            got = _lock_fd(fd, blocking=False)
            if not got and wait:
                log.warning("%s: waiting for %s to finish writing it", out, _who(_read_pid(fd)))
                got = _lock_fd(fd, blocking=True)
        except OSError:  # no byte-range or flock locks on this file system (some NFS, SMB)
            os.close(fd)
            path.unlink(missing_ok=True)
            return _acquire_dir(out, wait=wait, fix=fix)
        if not got:
            pid = _read_pid(fd)
            os.close(fd)
            raise _busy(out, pid, fix)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            _write_pid(fd)
            return lambda: _release(fd, path)
        os.close(fd)  # the holder we waited for removed this file as it let go: lock the new one


def _lock_fd(fd: int, *, blocking: bool) -> bool:
    """Lock ``fd`` exclusively; False when another holder has it (and not ``blocking``)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False
    while True:  # Windows: msvcrt's blocking mode gives up after 10 s, so poll
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except PermissionError:
            if not blocking:
                return False
            time.sleep(0.2)


def _release(fd: int, path: Path) -> None:
    try:
        path.unlink()  # while still locked, so a waiter sees the file is gone and retries
    except OSError:
        pass  # Windows cannot remove an open file; the next holder reuses it
    finally:
        if fcntl is None:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            except OSError:
                pass
        os.close(fd)  # releases a flock


def _write_pid(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is for messages only


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _acquire_dir(out: Path, *, wait: bool, fix: str) -> Callable[[], None]:
    """Fallback lock: a directory made with mkdir (atomic everywhere), holding the pid."""
    import psutil

    path = out.parent / f".{out.name}.lock.d"
    while True:
        try:
            os.mkdir(path)
        except FileExistsError:
            try:
                pid = int((path / "pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                continue
            if (pid is not None and not psutil.pid_exists(pid)) or (pid is None and age > 60):
                shutil.rmtree(path, ignore_errors=True)  # its holder died
                continue
            if not wait:
                raise _busy(out, pid, fix) from None
            time.sleep(0.5)
            continue
        except OSError as e:
            raise FileAccessError(f"{out.parent}: cannot create the lock {path.name} ({e.strerror}); {fix}") from None
        (path / "pid").write_text(f"{os.getpid()}\n")
        return lambda: shutil.rmtree(path, ignore_errors=True)


def _leftovers(out: Path) -> list[tuple[Path, str, int]]:
    """(path, 'tmp' | 'old', pid) of what writers of ``out`` leave beside it while they work."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)(-[A-Za-z0-9_]+)?$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = pattern.match(p.name)
        if m:
            found.append((p, m.group(1), int(m.group(2))))
    return found


def _recover(out: Path) -> None:
    """Clean up after writers of ``out`` that were killed (the caller holds the lock, so none
    of them is still writing): a previous copy renamed aside by an interrupted replace goes
    back to ``out`` when nothing took its place; temporary and aside copies are deleted."""
    found = _leftovers(out)
    olds = sorted((p for p, kind, _ in found if kind == "old"), key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not os.path.lexists(out) and is_prism(olds[0]):
        os.rename(olds[0], out)
        _fsync_dir(out.parent)
        log.warning("%s: restored the previous checkpoint from %s, left by a replace that was interrupted",
                    out, olds[0].name)
        found = [f for f in found if f[0] != olds[0]]
    for p, _, pid in found:
        log.warning("%s: removing %s, left by a writer that was killed (pid %d)", out, p.name, pid)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _remove_dead_leftovers(path: Path) -> None:
    """Delete temporary files of ``path`` whose writer process is gone (no lock guards these
    small files: their writes are atomic renames)."""
    import psutil

    for p, kind, pid in _leftovers(path):
        if kind == "tmp" and pid != os.getpid() and not psutil.pid_exists(pid):
            p.unlink(missing_ok=True)


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

    def unit_format(self, layer: int) -> UnitFormat | None:
        """How ``layer``'s quantized blocks are laid out (None: float blocks)."""
        rec = (self.manifest.get("quant") or {}).get("layers") or []
        return UnitFormat.from_record(rec[layer]) if layer < len(rec) and rec[layer] else None

    @property
    def dense_source(self) -> "QuantizedDenseSource":
        """The always-resident weights as a TensorSource that also yields quantized ones."""
        return QuantizedDenseSource(self.dense)

    def unit_matrices(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every sub-expert's W_gate rows [U, n, D], W_up rows [U, n, D] and W_down columns
        [U, D, n] as float32, in unit-id order (quantized blocks dequantized)."""
        blocks, order = self.blocks(layer), self.order(layer).long()
        fmt = self.unit_format(layer)
        U = order.numel()
        pos = torch.empty(U, dtype=torch.long)
        pos[order] = torch.arange(U)
        if fmt is None:
            b = blocks[pos].float()  # [U, 3, n, D]
            n, D = b.shape[2], b.shape[3]
            return b[:, 0], b[:, 1], b[:, 2].reshape(U, D, n)
        gate, up, down = [], [], []
        for p in pos.tolist():
            gu, dn = fmt.split(blocks[p])
            w = gu.dequantize()  # [2n, D]
            gate.append(w[: fmt.n])
            up.append(w[fmt.n:])
            down.append(dn.dequantize())  # [D, n]
        return torch.stack(gate), torch.stack(up), torch.stack(down)


def qmatrix_tensors(name: str, qm: QMatrix) -> dict[str, torch.Tensor]:
    """The tensors a quantized always-resident weight is stored as in dense.safetensors."""
    return {f"{name}.qcodes": qm.codes, f"{name}.qsz": qm.sz,
            f"{name}.qmeta": torch.tensor([qm.rows, qm.planes], dtype=torch.int64)}


class QuantizedDenseSource:
    """dense.safetensors as a TensorSource under Hugging Face names: quantized weights are
    found by ``quantized(name)`` and read as floats (dequantized) by ``get(name)``."""

    def __init__(self, source: SafetensorsSource):
        self.source = source
        self._q = {n[: -len(".qcodes")] for n in source.names() if n.endswith(".qcodes")}

    def names(self) -> list[str]:
        """All weight names (quantized ones without their suffixes)."""
        return [n for n in self.source.names() if not n.endswith((".qcodes", ".qsz", ".qmeta"))] + sorted(self._q)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` as the model sees it."""
        if name in self._q:
            rows = int(self.source.get(f"{name}.qmeta")[0])
            return (rows, self.source.shape(f"{name}.qcodes")[2])
        return self.source.shape(name)

    def quantized(self, name: str) -> QMatrix | None:
        """``name`` in storage form (views on the mapping), or None for a float weight."""
        if name not in self._q:
            return None
        rows, planes = (int(v) for v in self.source.get(f"{name}.qmeta"))
        return QMatrix(self.source.get(f"{name}.qcodes"), self.source.get(f"{name}.qsz"), rows, planes)

    def get(self, name: str) -> torch.Tensor:
        """``name`` as a float tensor (quantized weights dequantized)."""
        q = self.quantized(name)
        return q.dequantize() if q is not None else self.source.get(name)

def open_prism(path: Path, *, check_source: bool = True) -> PrismCheckpoint:
    """Open and check a prism checkpoint; clear errors for damaged, foreign or stale ones.

    Checks the manifest's structure, every file's size and sha256 (hashed once per process
    while the file is unchanged) and that the index tensors are permutations, so damage is a
    PrismCheckpointError here, never NaN logits or an IndexError later.
    """
    man_path = path / MANIFEST
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrismCheckpointError(f"{man_path}: missing; the prism checkpoint is damaged, rebuild it with "
                                   "edge-prism refactor --force") from None
    except PermissionError:
        raise FileAccessError(f"{man_path}: cannot read it (permission denied); make the checkpoint readable "
                              f"(chmod -R a+rX {path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise PrismCheckpointError(f"{man_path}: unreadable manifest; the prism checkpoint is damaged, "
                                   "rebuild it with edge-prism refactor --force") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION or isinstance(version, bool):
        shown = "no format version" if version is None else f"format version {version!r}"
        raise PrismCheckpointError(f"{man_path}: {shown}, this edge-prism reads {FORMAT_VERSION}; "
                                   "rebuild it with edge-prism refactor --force")
    rebuild = _rebuild_hint(path, manifest)
    _check_manifest(man_path, manifest, rebuild)
    _verify_files(path, manifest, rebuild)
    if check_source:
        _check_source(path, manifest)
    try:
        pc = PrismCheckpoint(path=path, manifest=manifest,
                             dense=SafetensorsSource([path / DENSE], fix=rebuild),
                             experts=SafetensorsFile(path / EXPERTS, fix=rebuild),
                             gates=SafetensorsFile(path / GATES, fix=rebuild))
    except CorruptCheckpointError as e:
        raise PrismCheckpointError(str(e)) from None
    _check_indices(pc, rebuild)
    return pc


def _rebuild_hint(path: Path, manifest: dict) -> str:
    src = manifest.get("source")
    src = src.get("path") if isinstance(src, dict) and isinstance(src.get("path"), str) else "SOURCE_MODEL"
    return f"the prism checkpoint is damaged; rebuild it with `edge-prism refactor --force {src} --out {path}`"


def _check_manifest(man_path: Path, manifest: dict, rebuild: str) -> None:
    """The manifest entries the loader relies on are there, with the right types."""
    def bad(key: str, want: str) -> PrismCheckpointError:
        have = "missing" if key not in manifest else f"{manifest[key]!r:.60}"
        return PrismCheckpointError(f"{man_path}: '{key}' is {have}, expected {want}; {rebuild}")

    def whole(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not isinstance(manifest.get("config"), dict):
        raise bad("config", "the model's config object")
    parts = manifest.get("sub_experts")
    if not isinstance(parts, list) or not parts or not all(whole(s, 1) for s in parts):
        raise bad("sub_experts", "a list of sub-experts per expert, one positive number per layer")
    layers = manifest["config"].get("num_hidden_layers")
    if whole(layers, 1) and len(parts) != layers:
        raise bad("sub_experts", f"one entry per layer ({layers})")
    gates = manifest.get("gates")
    if not isinstance(gates, dict) or not isinstance(gates.get("default"), str):
        raise bad("gates", "an object naming the default gate")
    k = manifest.get("default_operating_point")
    if k is not None and not whole(k, 1):
        raise bad("default_operating_point", "null or a positive number")
    if "source" in manifest and not isinstance(manifest["source"], dict):
        raise bad("source", "an object")
    sizes = manifest.get("file_sizes")
    if (not isinstance(sizes, dict) or not {DENSE, EXPERTS, GATES} <= set(sizes)
            or not all(whole(v, 0) and _plain_name(n) for n, v in sizes.items())):
        raise bad("file_sizes", f"the byte size of each file ({DENSE}, {EXPERTS}, {GATES}, ...)")
    sums = manifest.get("file_sha256")
    if (not isinstance(sums, dict) or set(sums) != set(sizes)
            or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sums.values())):
        raise bad("file_sha256", "the sha256 of each file in file_sizes (written by edge-prism refactor)")


def _plain_name(name: str) -> bool:
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")


_verified: dict[tuple, str] = {}  # (dev, inode, size, mtime, ctime) -> sha256 checked in this process
_verified_lock = threading.Lock()


def _verify_files(path: Path, manifest: dict, rebuild: str) -> None:
    """Every listed file has its recorded size and sha256."""
    keys, todo = {}, []
    for name, size in sorted(manifest["file_sizes"].items()):
        f = path / name
        try:
            st = f.stat()
        except FileNotFoundError:
            raise PrismCheckpointError(f"{f}: missing; {rebuild}") from None
        except OSError as e:
            raise FileAccessError(f"{f}: cannot read it ({e.strerror}); make the checkpoint readable "
                                  f"(chmod -R a+rX {path})") from None
        if st.st_size != size:
            raise PrismCheckpointError(f"{f}: expected {size} bytes, found {st.st_size}; {rebuild}")
        keys[name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _verified_lock:
            if _verified.get(keys[name]) != manifest["file_sha256"][name]:
                todo.append(name)
    try:
        digests = file_checksums(path, todo)
    except OSError as e:
        raise FileAccessError(f"{path}: cannot read the checkpoint ({e.strerror}); make it readable "
                              f"(chmod -R a+rX {path})") from None
    for name in todo:
        want = manifest["file_sha256"][name]
        if digests[name] != want:
            raise PrismCheckpointError(f"{path / name}: checksum mismatch (sha256 {digests[name][:12]}..., "
                                       f"prism.json records {want[:12]}...), the file was changed or damaged; "
                                       f"{rebuild}")
        with _verified_lock:
            _verified[keys[name]] = want


def _check_indices(pc: PrismCheckpoint, rebuild: str) -> None:
    """The index tensors are permutations: ``layers.L.order`` of 0..E*S-1 and each row of
    ``layers.L.perm`` of 0..W-1 (an out-of-range index would fail deep in a forward)."""
    def damaged(f: SafetensorsFile, why: str) -> PrismCheckpointError:
        return PrismCheckpointError(f"{f.path}: {why}; {rebuild}")

    for layer, parts in enumerate(pc.parts):
        order_name, perm_name = f"layers.{layer}.order", f"layers.{layer}.perm"
        for f, name in ((pc.experts, order_name), (pc.gates, perm_name)):
            if name not in f.names():
                raise damaged(f, f"tensor {name} is missing")
            if f.dtype(name).is_floating_point or f.dtype(name) == torch.bool:
                raise damaged(f, f"tensor {name} is {f.dtype(name)}, expected integers")
        perm = pc.gates.get(perm_name)  # [E, W]
        order = pc.experts.get(order_name)  # [E*S]
        if perm.dim() != 2:
            raise damaged(pc.gates, f"tensor {perm_name} has shape {list(perm.shape)}, expected [experts, width]")
        units = perm.shape[0] * parts
        if list(order.shape) != [units]:
            raise damaged(pc.experts, f"tensor {order_name} has shape {list(order.shape)}, expected [{units}] "
                                      f"({perm.shape[0]} experts x {parts} sub-experts)")
        blocks = f"layers.{layer}.blocks"
        if blocks in pc.experts.names() and pc.experts.shape(blocks)[0] != units:
            raise damaged(pc.experts, f"tensor {blocks} has {pc.experts.shape(blocks)[0]} blocks, expected {units}")
        for f, name, t in ((pc.experts, order_name, order[None]), (pc.gates, perm_name, perm)):
            where = _not_a_permutation(t)
            if where is not None:
                (row, col), value = where
                at = f"[{col}]" if f is pc.experts else f"[{row}, {col}]"
                raise damaged(f, f"tensor {name} is not a permutation of 0..{t.shape[1] - 1} "
                                 f"(value {value} at {at})")


def _not_a_permutation(t: torch.Tensor) -> tuple[tuple[int, int], int] | None:
    """((row, column), value) of the first entry that breaks row-wise permutation of
    0..N-1 in ``t`` [R, N] (out of range, or a repeat); None when every row is one."""
    n = t.shape[1]
    t = t.long()
    if bool((t.sort(dim=1).values == torch.arange(n)).all()):
        return None
    out = ((t < 0) | (t >= n)).nonzero()
    if len(out) == 0:  # all in range, so some value repeats: find its second occurrence
        seen = torch.zeros_like(t).scatter_add_(1, t, torch.ones_like(t))  # [R, N] counts
        row = int((seen != 1).any(dim=1).nonzero()[0])
        value = int((seen[row] > 1).nonzero()[0])
        out = [(row, int((t[row] == value).nonzero()[1]))]
    row, col = (int(x) for x in out[0])
    return (row, col), int(t[row, col])


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
