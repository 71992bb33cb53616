"""Bad input and failures (issue 11): every case is one ``error: ...`` line and exit status 2
from the CLI, or an EdgePrismError subclass from the API, naming the file or value and the
fix; nothing half-written, the previous output intact, one writer per output, and what a
killed run left behind cleaned up by the next. Tiny synthetic checkpoints throughout."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import edge_prism
from edge_prism import cli
from edge_prism.errors import (ConfigError, CorruptCheckpointError, EdgePrismError, FileAccessError,
                               ModelNotFoundError, OutputBusyError, PrismCheckpointError, TokenizerError)
from edge_prism.refactor import prism as prismlib
from edge_prism.refactor.prism import DENSE, EXPERTS, GATES, MANIFEST, open_prism, output_lock
from edge_prism.refactor.refactor import RefactorConfig, refactor

ONE_SHOT = ["--prompt", "hi", "-n", "2", "-t", "0"]
FAST_KW = dict(calib_tokens=384, rows_per_expert=256, seq_len=128)
FAST = RefactorConfig(**FAST_KW)
REPO = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------------------
def run_main(capsys, *argv) -> tuple[int, str, str]:
    """cli.main in-process; argparse's own errors (SystemExit) count as their exit status."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *names) -> str:
    """Exit 2, exactly one stderr line 'error: ...' naming each of ``names``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def assert_last_line_error(code: int, err: str, *names) -> str:
    """Exit 2 and a last stderr line 'error: ...' naming each of ``names`` after progress bars
    (commands that show progress, like refactor); no traceback."""
    assert "Traceback" not in err
    return assert_one_error_line(code, err.strip().replace("\r", "\n").splitlines()[-1] + "\n", *names)


def assert_option_refused(code: int, err: str, *names) -> str:
    """argparse's refusal of a malformed option value: exit 2, its usage lines, then one line
    '...: error: argument ...' naming each of ``names``; no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: ") and all(line.startswith(" ") for line in lines[1:-1]), err
    assert ": error: argument " in lines[-1], err
    for name in names:
        assert str(name) in lines[-1], f"{name!r} not named in: {lines[-1]}"
    return lines[-1]


def run_cli(*argv, stdin: bytes | None = None, env: dict | None = None, restricted: bool = False,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m edge_prism.cli ARGV`` in a child process (stdout/stderr as text).

    ``restricted``: file permissions apply to the child even when the tests run as root (its
    capabilities to override them are dropped with setpriv), so a chmod is a real denial.
    """
    cmd = [sys.executable, "-m", "edge_prism.cli", *map(str, argv)]
    if restricted:
        if os.name != "posix":
            pytest.skip("POSIX file permissions")
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: a chmod does not deny root")
            drop = "-dac_override,-dac_read_search"
            cmd = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *cmd]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    if restricted and err.startswith("setpriv:"):
        pytest.skip(f"cannot drop capabilities here: {err.strip()}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def child(code: str, *args: str) -> subprocess.Popen:
    """A Python child running ``code`` (sys.argv[1:] = args), stdin and stdout as pipes."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 120) -> None:
    """Block until the child prints ``expected`` (a child that dies first fails the test)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or result[0].strip() != expected:
        proc.kill()
        pytest.fail(f"child did not print {expected!r}: {result} / {proc.stderr.read()[-2000:]}")


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def tensor_offset(path: Path, tensor: str) -> int:
    """The file offset of the middle of ``tensor``'s data."""
    from edge_prism.loaders.safetensors_mmap import SafetensorsFile

    start, nbytes = SafetensorsFile(path).byte_range(tensor)
    return start + nbytes // 2


def rewrite_tensor(prism: Path, file: str, name: str, change) -> None:
    """Replace one tensor by ``change(tensor)`` and record the file's new size and sha256, as a
    buggy writer would: only the range checks can catch this."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(prism / file)
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(prism / file), metadata={"format": "pt"})
    man = json.loads((prism / MANIFEST).read_text())
    man["file_sizes"][file] = (prism / file).stat().st_size
    man["file_sha256"][file] = hashlib.sha256((prism / file).read_bytes()).hexdigest()
    (prism / MANIFEST).write_text(json.dumps(man))


@pytest.fixture
def prism_copy(prism_of, tmp_path):
    """``prism_copy(family='olmoe')`` -> a private, damageable copy of a tiny prism checkpoint."""
    def make(family: str = "olmoe") -> Path:
        return Path(shutil.copytree(prism_of(family), tmp_path / f"{family}.prism"))

    return make


@pytest.fixture
def tiny_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private, damageable copy of the tiny llama checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "model"))


@pytest.fixture
def tiny_default(monkeypatch, tmp_path, tiny_checkpoint) -> list:
    """default_prism() over the tiny llama checkpoint with a fast refactor and a private cache;
    the returned list records each build."""
    import edge_prism.loaders.default as default
    import edge_prism.refactor.refactor as rr

    monkeypatch.setenv("EDGE_PRISM_CACHE", str(tmp_path / "cache"))
    src = tiny_checkpoint("llama")
    monkeypatch.setattr(default, "default_model_path", lambda: src)
    monkeypatch.setattr(rr, "RefactorConfig", functools.partial(rr.RefactorConfig, **FAST_KW))
    builds: list = []
    real = rr.refactor

    def counted(*args, **kwargs):
        builds.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(rr, "refactor", counted)
    return builds


# == A. prism corruption ==========================================================================
@pytest.mark.parametrize("file,tensor", [
    (DENSE, "model.embed_tokens.weight"),
    (EXPERTS, "layers.1.blocks"),
    (EXPERTS, "layers.0.order"),
    (GATES, "layers.0.linear.weight"),
    (GATES, "layers.1.perm"),
], ids=["dense", "experts-block", "experts-order", "gates", "gates-perm"])
def test_a_flipped_byte_is_refused_at_open(capsys, prism_copy, file, tensor):
    path = prism_copy()
    flip_byte(path / file, tensor_offset(path / file, tensor))
    with pytest.raises(PrismCheckpointError, match=rf"{file}: checksum mismatch.*refactor --force"):
        edge_prism.load(path)
    code, out, err = run_main(capsys, "chat", "-m", path, *ONE_SHOT)
    assert_one_error_line(code, err, path / file, "checksum")
    assert out == ""


def test_a_flipped_byte_in_a_safetensors_header_is_refused(prism_copy):
    path = prism_copy()
    flip_byte(path / EXPERTS, 20)  # inside the JSON header
    with pytest.raises(PrismCheckpointError, match=EXPERTS):
        open_prism(path)


def _order_out_of_range(t):
    t[3] = 10**6
    return t


def _order_repeat(t):
    t[1] = t[0]
    return t


def _perm_negative(t):
    t[0, 5] = -1
    return t


def _perm_repeat(t):
    t[2, 7] = t[2, 0]
    return t


@pytest.mark.parametrize("file,tensor,change,expect", [
    (EXPERTS, "layers.0.order", _order_out_of_range, r"layers\.0\.order is not a permutation.*value 1000000 at \[3\]"),
    (EXPERTS, "layers.0.order", _order_repeat, r"layers\.0\.order is not a permutation"),
    (EXPERTS, "layers.1.order", lambda t: t[:-1], r"layers\.1\.order has shape \[63\], expected \[64\]"),
    (EXPERTS, "layers.1.order", lambda t: t.float(), r"layers\.1\.order is torch\.float32, expected integers"),
    (GATES, "layers.1.perm", _perm_negative, r"layers\.1\.perm is not a permutation.*value -1 at \[0, 5\]"),
    (GATES, "layers.0.perm", _perm_repeat, r"layers\.0\.perm is not a permutation.*at \[2, 7\]"),
], ids=["order-out-of-range", "order-repeat", "order-short", "order-float", "perm-negative", "perm-repeat"])
def test_a_index_tensors_must_be_permutations(prism_copy, file, tensor, change, expect):
    # olmoe: 8 experts x 8 sub-experts (64 units) per layer, 128 neurons per expert.
    path = prism_copy()
    rewrite_tensor(path, file, tensor, change)
    with pytest.raises(PrismCheckpointError, match=f"{file}: tensor {expect}"):
        open_prism(path)


def _drop(key):
    def change(man):
        del man[key]
    return change


def _set(key, value):
    def change(man):
        man[key] = value
    return change


@pytest.mark.parametrize("change,expect", [
    (_drop("sub_experts"), "'sub_experts' is missing"),
    (_set("sub_experts", "8"), "'sub_experts' is '8'"),
    (_set("sub_experts", [2]), "'sub_experts' is \\[2\\], expected one entry per layer"),
    (_set("sub_experts", [2, True]), "'sub_experts'"),
    (_drop("config"), "'config' is missing"),
    (_drop("gates"), "'gates' is missing"),
    (_set("default_operating_point", 2.5), "'default_operating_point' is 2.5"),
    (_drop("file_sha256"), "'file_sha256' is missing"),
    (lambda man: man["file_sha256"].update({DENSE: "0" * 12}), "'file_sha256'"),
    (lambda man: man["file_sizes"].update({"../../x": 1}), "'file_sizes'"),
    (_set("source", "somewhere"), "'source' is 'somewhere'"),
], ids=["no-sub_experts", "sub_experts-string", "sub_experts-short", "sub_experts-bool", "no-config",
        "no-gates", "operating-point-float", "no-checksums", "short-checksum", "path-in-file_sizes",
        "source-string"])
def test_a_manifest_entries_are_checked(capsys, prism_copy, change, expect):
    path = prism_copy()
    man = json.loads((path / MANIFEST).read_text())
    change(man)
    (path / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(PrismCheckpointError, match=f"prism.json: {expect}"):
        edge_prism.load(path)
    code, _, err = run_main(capsys, "chat", "-m", path, *ONE_SHOT)
    assert_one_error_line(code, err, path / MANIFEST)


@pytest.mark.parametrize("version,shown", [("2", "format version '2'"), (None, "no format version"),
                                           (999, "format version 999"), (True, "format version True")])
def test_a_format_version_message_tells_what_it_found(prism_copy, version, shown):
    path = prism_copy()
    man = json.loads((path / MANIFEST).read_text())
    man["format_version"] = version
    (path / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(PrismCheckpointError) as info:
        open_prism(path)
    assert f"{shown}, this edge-prism reads {prismlib.FORMAT_VERSION}" in str(info.value)


def test_a_missing_manifest_is_named_not_config_json(capsys, prism_copy):
    path = prism_copy()
    (path / MANIFEST).unlink()
    code, _, err = run_main(capsys, "chat", "-m", path, *ONE_SHOT)
    line = assert_one_error_line(code, err, path / MANIFEST, "rebuild")
    assert "config.json" not in line


def test_a_checksums_are_hashed_once_per_process(prism_copy, monkeypatch):
    path = prism_copy()
    open_prism(path)
    hashed = []
    real = prismlib.file_checksums
    monkeypatch.setattr(prismlib, "file_checksums", lambda d, names: hashed.extend(names) or real(d, names))
    open_prism(path)
    assert hashed == []  # unchanged files (same inode, size, times) are not read again


def _damage_flip(path: Path) -> None:
    flip_byte(path / EXPERTS, tensor_offset(path / EXPERTS, "layers.0.blocks"))


def _damage_order(path: Path) -> None:
    rewrite_tensor(path, EXPERTS, "layers.1.order", _order_out_of_range)


def _damage_manifest(path: Path) -> None:
    man = json.loads((path / MANIFEST).read_text())
    del man["sub_experts"]
    (path / MANIFEST).write_text(json.dumps(man))


@pytest.mark.parametrize("damage", [_damage_flip, _damage_order, _damage_manifest,
                                    lambda p: (p / MANIFEST).unlink(), lambda p: (p / DENSE).unlink()],
                         ids=["flipped-byte", "bad-order", "manifest-entry", "no-manifest", "no-dense"])
def test_a_damaged_default_prism_is_rebuilt(tiny_default, damage):
    from edge_prism.api import default_prism

    out = default_prism(progress=False)
    damage(out)
    assert default_prism(progress=False) == out
    assert len(tiny_default) == 2
    open_prism(out)
    assert default_prism(progress=False) == out and len(tiny_default) == 2  # now reused
    # No leftovers of the rebuild beside it (calibration/ is the cache of generated calibration text).
    assert [p.name for p in out.parent.iterdir() if p.name != "calibration"] == [out.name]


# == B. one writer per output, atomic, recoverable =================================================
def test_b_second_writer_fails_fast_while_another_process_writes(capsys, tiny_checkpoint, tmp_path):
    out = tmp_path / "x.prism"
    holder = child("""
        import sys
        from pathlib import Path
        from edge_prism.refactor.prism import output_lock
        with output_lock(Path(sys.argv[1])):
            print("locked", flush=True)
            sys.stdin.read()
    """, out)
    try:
        wait_for_line(holder, "locked")
        start = time.perf_counter()
        code, _, err = run_main(capsys, "refactor", tiny_checkpoint("llama"), "--out", out, "--calib-tokens", "384")
        line = assert_one_error_line(code, err, out, f"pid {holder.pid}")
        assert "another edge-prism process" in line and time.perf_counter() - start < 10
    finally:
        holder.communicate("", timeout=60)
    assert not out.exists()
    refactor(tiny_checkpoint("llama"), out, FAST, progress=False)  # the lock went with its holder
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]


def test_b_second_writer_in_another_thread_fails_fast(tiny_checkpoint, tmp_path):
    out = tmp_path / "x.prism"
    locked, done = threading.Event(), threading.Event()

    def hold():
        with output_lock(out):
            locked.set()
            done.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        locked.wait(60)
        with pytest.raises(OutputBusyError, match="another edge-prism process"):
            refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
    finally:
        done.set()
        t.join()


def test_b_two_refactors_to_one_output_one_wins(tiny_checkpoint, tmp_path):
    out = tmp_path / "x.prism"
    argv = [sys.executable, "-m", "edge_prism.cli", "refactor", str(tiny_checkpoint("llama")), "--out", str(out),
            "--calib-tokens", "384"]
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert_last_line_error(2, loser, out)
    assert "another edge-prism process" in loser or "already exists" in loser
    open_prism(out)
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]


def test_b_output_that_appears_during_the_run_is_not_replaced(prism_of, tiny_checkpoint, tmp_path, monkeypatch):
    out, theirs = tmp_path / "x.prism", prism_of("llama")
    real = prismlib.save_file

    def someone_else_writes_out(*args, **kwargs):
        if not out.exists():
            shutil.copytree(theirs, out)
        return real(*args, **kwargs)

    monkeypatch.setattr(prismlib, "save_file", someone_else_writes_out)
    with pytest.raises(ConfigError, match="already exists"):
        refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
    assert contents(out) == contents(theirs)
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    "safetensors",
], ids=["oserror", "safetensors-error"])
def test_b_disk_full_while_writing_keeps_the_previous_output(capsys, prism_of, tiny_checkpoint, tmp_path,
                                                             monkeypatch, error):
    from safetensors import SafetensorError

    out = tmp_path / "x.prism"
    shutil.copytree(prism_of("llama"), out)
    before = contents(out)
    real = prismlib.save_file
    calls = []

    def fill_up(*args, **kwargs):
        # The dense weights: written whole after the streamed experts and gates.
        calls.append(1)
        if len(calls) == 1:
            raise error if isinstance(error, OSError) else SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(prismlib, "save_file", fill_up)
    code, _, err = run_main(capsys, "refactor", tiny_checkpoint("llama"), "--out", out, "--force",
                            "--calib-tokens", "384")
    line = assert_last_line_error(code, err, out, "No space left on device")
    assert "nothing was replaced" in line
    assert contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]


_KILL_AT_SWAP = """
    import os, signal, sys
    from pathlib import Path
    from edge_prism.refactor.refactor import RefactorConfig, refactor
    out = Path(sys.argv[2])
    real = os.rename
    def rename(src, dst):
        if Path(dst) == out and Path(src).name.startswith(f".{out.name}.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)  # after the old copy was moved aside
        return real(src, dst)
    os.rename = rename
    refactor(sys.argv[1], out, RefactorConfig(calib_tokens=384, rows_per_expert=256, seq_len=128),
             force=True, progress=False)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_b_crash_between_the_renames_is_recovered(prism_of, tiny_checkpoint, tmp_path):
    out = tmp_path / "x.prism"
    shutil.copytree(prism_of("llama"), out)
    before = contents(out)
    proc = child(_KILL_AT_SWAP, tiny_checkpoint("llama"), out)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert any(p.name.startswith(".x.prism.old-") for p in tmp_path.iterdir())
    # The next writer puts the previous copy back before anything else (and this one is not forced).
    with pytest.raises(ConfigError, match="already exists"):
        refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
    assert contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]


_HANG_MID_WRITE = """
    import sys, time
    from pathlib import Path
    import edge_prism.refactor.prism as prism
    from edge_prism.refactor.refactor import RefactorConfig, refactor
    real = prism.save_file
    def save_then_hang(*args, **kwargs):
        real(*args, **kwargs)
        print("written", flush=True)
        time.sleep(300)
    prism.save_file = save_then_hang
    refactor(sys.argv[1], Path(sys.argv[2]), RefactorConfig(calib_tokens=384, rows_per_expert=256, seq_len=128),
             progress=False)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_b_leftovers_of_a_killed_writer_are_removed_by_the_next(tiny_checkpoint, tmp_path):
    out = tmp_path / "x.prism"
    proc = child(_HANG_MID_WRITE, tiny_checkpoint("llama"), out)
    wait_for_line(proc, "written")
    proc.kill()
    proc.communicate(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith(".x.prism.tmp-") for name in left), left
    refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x.prism"]
    open_prism(out)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_b_files_and_directories_are_fsynced_before_the_rename(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "x.prism"
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
    swap = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f"-> {out}"))
    tmp = events[swap][1].split(" -> ")[0]
    synced_before = {what for kind, what in events[:swap] if kind == "fsync"}
    assert {f"{tmp}/{p.name}" for p in out.iterdir()} | {tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in events[swap + 1:]  # the rename itself is made durable


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_b_written_files_follow_the_umask(tiny_checkpoint, tmp_path, umask):
    out = tmp_path / "x.prism"
    old = os.umask(umask)
    try:
        refactor(tiny_checkpoint("llama"), out, FAST, progress=False)
        from edge_prism.refactor.prism import write_json_atomic

        write_json_atomic(out / "quality.json", [])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_b_quality_json_leftovers_of_dead_writers_are_removed(prism_copy):
    from edge_prism.refactor.prism import write_json_atomic

    path = prism_copy("llama")
    dead = path / ".quality.json.tmp-999999999-abc123"  # no such process
    alive = path / f".quality.json.tmp-{os.getppid()}-abc123"  # a live process
    dead.write_text("{")
    alive.write_text("{")
    write_json_atomic(path / "quality.json", [{"k": 1}])
    assert json.loads((path / "quality.json").read_text()) == [{"k": 1}]
    assert not dead.exists() and alive.exists()


def test_b_lock_directory_where_flock_does_not_work(tmp_path, monkeypatch):
    import errno

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(prismlib.fcntl, "flock", no_flock)
    out = tmp_path / "x.prism"
    lock_dir = tmp_path / ".x.prism.lock.d"
    lock_dir.mkdir()
    (lock_dir / "pid").write_text("999999999\n")  # left by a holder that died
    with output_lock(out):
        assert (lock_dir / "pid").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
            # Another thread is another writer.
            errors = []
            t = threading.Thread(target=lambda: _try_lock(out, errors))
            t.start()
            t.join()
            raise errors[0]
    assert [p.name for p in tmp_path.iterdir()] == []


def _try_lock(out: Path, errors: list) -> None:
    try:
        with output_lock(out):
            pass
    except OutputBusyError as e:
        errors.append(e)


def test_b_default_prism_first_use_is_built_once(tiny_default, caplog):
    from edge_prism.api import default_prism

    from edge_prism.loaders.default import default_model_path

    out = Path(os.environ["EDGE_PRISM_CACHE"]) / f"{default_model_path().stem}.prism"
    results: list = []
    # Hold the build lock so both first uses find no checkpoint and queue behind it.
    with output_lock(out):
        threads = [threading.Thread(target=lambda: results.append(default_prism(progress=False)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert results == []  # both wait
    for t in threads:
        t.join(300)
    assert results == [out, out]
    assert len(tiny_default) == 1  # the second reused what the first built
    assert "waiting for another edge-prism process" in caplog.text


def test_b_full_cache_is_refused_before_building(tiny_default, monkeypatch):
    from edge_prism.api import default_prism

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(FileAccessError, match="4.0 KiB free.*EDGE_PRISM_CACHE"):
        default_prism(progress=False)
    assert tiny_default == []  # no work wasted


@pytest.mark.parametrize("where", ["cache-dir", "cache-parent"])
def test_b_read_only_cache_is_refused_before_building(tmp_path, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    cache = ro if where == "cache-dir" else ro / "sub" / "edge-prism"
    ro.chmod(0o555)
    try:
        start = time.perf_counter()
        proc = run_cli("chat", *ONE_SHOT, env={"EDGE_PRISM_CACHE": str(cache)}, restricted=True)
    finally:
        ro.chmod(0o755)
    line = assert_one_error_line(proc.returncode, proc.stderr, "EDGE_PRISM_CACHE", "Permission denied")
    assert str(ro) in line
    assert time.perf_counter() - start < 60  # refused up front, not after a build


# == C. one line, not a traceback =================================================================
def _config_not_utf8(model: Path) -> None:
    (model / "config.json").write_bytes(b'{"model_type": "ll\xe9ama"}')


def _config_is_a_directory(model: Path) -> None:
    (model / "config.json").unlink()
    (model / "config.json").mkdir()


def _index_with_a_number(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 5}}))


def _index_not_an_object(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text("[1, 2]")


def _rope_scaling_string(model: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "rope_scaling": "linear"}))


@pytest.mark.parametrize("damage,file,words", [
    (_config_not_utf8, "config.json", ["not UTF-8", "0xe9"]),
    (_config_is_a_directory, "config.json", ["is a directory"]),
    (_index_with_a_number, "model.safetensors.index.json", ["lm_head.weight", "5"]),
    (_index_not_an_object, "model.safetensors.index.json", ["weight_map"]),
    (_rope_scaling_string, "config.json", ["wrong type"]),
], ids=["config-not-utf8", "config-directory", "index-number-shard", "index-list", "rope_scaling-string"])
def test_c_unusable_model_files(capsys, tiny_copy, damage, file, words):
    damage(tiny_copy)
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, tiny_copy / file, *words)


@pytest.mark.parametrize("what,mode,words", [
    ("config.json", 0o000, ["permission denied", "chmod"]),
    ("model.safetensors", 0o000, ["permission denied", "chmod"]),
    ("", 0o644, ["permission denied", "chmod a+rx"]),  # the directory cannot be searched
    ("", 0o311, ["permission denied", "chmod a+rx"]),  # nor listed
], ids=["config-unreadable", "weights-unreadable", "dir-no-x", "dir-no-r"])
def test_c_permission_denied_says_so(tiny_copy, what, mode, words):
    target = tiny_copy / what if what else tiny_copy
    target.chmod(mode)
    try:
        proc = run_cli("chat", "-m", tiny_copy, *ONE_SHOT, restricted=True)
    finally:
        target.chmod(0o755 if target.is_dir() else 0o644)
    line = assert_one_error_line(proc.returncode, proc.stderr, target, *words)
    assert "corrupt" not in line and "download" not in line and "no config.json" not in line


@pytest.mark.parametrize("argv,value", [
    (["-t", "nan"], "nan"),
    (["-t", "inf"], "inf"),
    (["--top-p", "nan"], "nan"),
    (["--seed", "1180591620717411303424"], "1180591620717411303424"),
    (["--seed", "-9223372036854775809"], "-9223372036854775809"),
    (["--token-latency-ms", "nan"], "nan"),
    (["--token-latency-ms=-inf"], "-inf"),
], ids=["temperature-nan", "temperature-inf", "top-p-nan", "seed-huge", "seed-too-negative",
        "latency-nan", "latency-minus-inf"])
def test_c_malformed_numbers_are_refused_by_the_parser(capsys, tiny_checkpoint, argv, value):
    code, out, err = run_main(capsys, "chat", "-m", tiny_checkpoint("llama"), "--prompt", "hi", "-n", "2", *argv)
    assert_option_refused(code, err, argv[0].split("=")[0], value)
    assert out == ""


def test_c_largest_seed_is_accepted(tiny_engines):
    engine = tiny_engines("llama")
    assert len(engine.generate_ids([40, 41], max_new_tokens=2, temperature=1.0, seed=2**64 - 1)) <= 2


@pytest.mark.parametrize("argv,value", [(["--token-latency-ms", "0"], "0"), (["-t", "-1"], "-1")],
                         ids=["latency-zero", "temperature-negative"])
def test_c_out_of_range_numbers_are_one_line(capsys, tiny_checkpoint, argv, value):
    code, _, err = run_main(capsys, "chat", "-m", tiny_checkpoint("llama"), "--prompt", "hi", "-n", "2", *argv)
    assert_one_error_line(code, err, value)


@pytest.mark.parametrize("template,words", [
    ("{{ 1 / 0 }}", ["ZeroDivisionError"]),
    ("{{ messages[0]['content'] + 1 }}", ["TypeError"]),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", ["recursed"]),
    ("{{ raise_exception('only user and assistant roles') }}", ["only user and assistant roles"]),
    ("{% for %}", ["does not parse"]),
], ids=["zero-division", "type-error", "recursion", "raise_exception", "syntax"])
def test_c_failing_chat_templates_are_one_line(capsys, tiny_copy, template, words):
    cfg_path = tiny_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": template}))
    with pytest.raises(TokenizerError, match="chat template"):
        edge_prism.load(tiny_copy).chat([{"role": "user", "content": "hi"}], max_new_tokens=1)
    code, out, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, "chat template", *words)
    assert out == ""


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "utf-8"}, {"LC_ALL": "C", "PYTHONIOENCODING": ""}],
                         ids=["utf8-strict", "c-locale-surrogateescape"])
def test_c_invalid_utf8_on_stdin(tiny_checkpoint, env):
    proc = run_cli("chat", "-m", tiny_checkpoint("llama"), "-n", "2", stdin=b"caf\xe9 \xff\n", env=env)
    assert_one_error_line(proc.returncode, proc.stderr, "stdin", "UTF-8", "0xe9")
    assert proc.stdout == ""


# == D. smaller ==================================================================================
@pytest.mark.parametrize("option", [
    dict(operating_point=2.5), dict(operating_point=True), dict(operating_point="3"), dict(operating_point=0),
    dict(token_latency_ms=math.nan), dict(token_latency_ms=math.inf), dict(token_latency_ms=0),
    dict(token_latency_ms=-5), dict(token_latency_ms="80"),
    dict(policy="bogus"),
    dict(memory_budget=1.5), dict(memory_budget=True), dict(memory_budget=-1), dict(memory_budget=["1GiB"]),
], ids=lambda o: f"{next(iter(o))}={next(iter(o.values()))!r}")
def test_d_runtime_options_are_checked_before_loading(prism_of, option):
    from edge_prism.api import RuntimeConfig

    name, value = next(iter(option.items()))
    with pytest.raises(ConfigError) as info:
        RuntimeConfig(**option)
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    with pytest.raises(ConfigError):
        edge_prism.load(prism_of("olmoe"), **option)


@pytest.mark.parametrize("call", [
    lambda e: e.generate(""), lambda e: e.stream(""), lambda e: e.generate_ids([]), lambda e: e.logits([]),
    lambda e: e.generate(None),
], ids=["generate-empty", "stream-empty", "generate_ids-empty", "logits-empty", "generate-None"])
def test_d_empty_prompts_are_config_errors(tiny_engines, call):
    with pytest.raises(ConfigError):
        call(tiny_engines("llama"))


def test_d_symlink_loop_is_not_no_such_file(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    code, _, err = run_main(capsys, "chat", "-m", a, *ONE_SHOT)
    line = assert_one_error_line(code, err, a, "loop")
    assert "no such file" not in line


def test_d_dangling_symlink_names_its_target(capsys, tmp_path):
    link = tmp_path / "model"
    link.symlink_to(tmp_path / "gone")
    code, _, err = run_main(capsys, "chat", "-m", link, *ONE_SHOT)
    assert_one_error_line(code, err, link, tmp_path / "gone")


def test_d_no_chat_template_names_only_real_options(capsys, tiny_copy):
    import re

    cfg_path = tiny_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    line = assert_one_error_line(code, err, "no chat template", "generate()")
    parser, _ = cli.build_parser()
    chat = parser._subparsers._group_actions[0].choices["chat"]
    known = {opt for action in chat._actions for opt in action.option_strings}
    for flag in re.findall(r"--[a-z][a-z-]*", line):
        assert flag in known, f"{flag} in {line!r} is not a chat option"


def test_d_api_errors_are_edge_prism_errors():
    # The classes the CLI maps to 'error:' and exit 2.
    for cls in (FileAccessError, OutputBusyError, PrismCheckpointError, CorruptCheckpointError, ModelNotFoundError):
        assert issubclass(cls, EdgePrismError)


# == E. info without NVML ============================================================================
def test_e_info_lists_cuda_devices_without_nvml(capsys, monkeypatch):
    import edge_prism.runtime.device as device

    orin = SimpleNamespace(name="Orin", total_memory=30 * 2**30, is_integrated=1)
    monkeypatch.setattr(device, "gpu_info", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: orin)
    # Other lines of `info` would probe kernels on the (fake) device.
    monkeypatch.setattr(cli, "kernel_paths", lambda: "not probed", raising=False)
    code, out, _ = run_main(capsys, "info")
    assert code == 0
    assert "GPU Orin: 30.00 GiB total, integrated (shares host RAM)" in out
    assert "none found" not in out


def test_e_info_without_any_gpu(capsys, monkeypatch):
    import edge_prism.runtime.device as device

    monkeypatch.setattr(device, "gpu_info", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, _ = run_main(capsys, "info")
    assert code == 0 and "GPU: none found" in out
