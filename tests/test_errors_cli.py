"""The ``edge-prism`` command: bad inputs give one ``error: ...`` line and exit status 2 (no
traceback); chat one-shot and piped; info. Mostly in-process through ``cli.main``, with a
few runs of the installed console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edge_prism
from edge_prism import cli

SCRIPT = Path(sys.executable).parent / "edge-prism"
# "[5 tokens, 20.7 tokens/s, time to first token 0.14 s]", possibly with more figures before "]".
SUMMARY = re.compile(r"^\[(\d+) tokens, [\d.]+ tokens/s, time to first token [\d.]+ s(, [^\]]*)?\]$")
ONE_SHOT = ["--prompt", "hi", "-n", "5", "-t", "0"]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (progress bars while building checkpoints)
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_script(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The console script as a user runs it; output kept as bytes-exact UTF-8 text."""
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed at {SCRIPT}")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([str(SCRIPT), *map(str, argv)], input=None if stdin is None else stdin.encode(),
                          capture_output=True, env=env, timeout=120)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


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


# -- damaged or unusable checkpoints ------------------------------------------------------------
@pytest.fixture
def tiny_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private, damageable copy of the tiny llama checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "model"))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_missing_path(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, out, err = run_main(capsys, "chat", "-m", missing, *ONE_SHOT)
    assert_one_error_line(code, err, missing)
    assert out == ""


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_main(capsys, "chat", "-m", tmp_path, *ONE_SHOT)
    assert_one_error_line(code, err, tmp_path, "config.json")


def test_unknown_model_type(capsys, tiny_copy):
    _edit_config(tiny_copy, model_type="gpt_neox")
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, tiny_copy / "config.json", "gpt_neox")


def test_truncated_safetensors(capsys, tiny_copy):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, weights)


@pytest.mark.parametrize("garbage", [
    os.urandom(4096),
    (64).to_bytes(8, "little") + b"\xff\xfe not json at all " * 10,
    (40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4]}}   ',
], ids=["random-bytes", "header-not-json", "header-entry-incomplete"])
def test_corrupt_safetensors_header(capsys, tiny_copy, garbage):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(garbage)
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, weights)


def test_config_disagrees_with_tensors(capsys, tiny_copy):
    _edit_config(tiny_copy, hidden_size=128)
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    line = assert_one_error_line(code, err, tiny_copy)
    assert "shape" in line and "config" in line


@pytest.mark.parametrize("header", [b"[]", b'"x"'], ids=["list", "string"])
def test_safetensors_header_that_is_not_an_object(capsys, tiny_copy, header):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, weights)


@pytest.mark.parametrize("change", [dict(hidden_size="abc"), dict(hidden_size=None), dict(eos_token_id="x")],
                         ids=["hidden_size=abc", "hidden_size=null", "eos_token_id=x"])
def test_config_value_of_the_wrong_type(capsys, tiny_copy, change):
    _edit_config(tiny_copy, **change)
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, tiny_copy / "config.json", next(iter(change)))


@pytest.mark.parametrize("layers", [1, -1])
def test_config_with_fewer_layers_than_the_tensors(capsys, tiny_copy, layers):
    _edit_config(tiny_copy, num_hidden_layers=layers)
    code, _, err = run_main(capsys, "chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(code, err, tiny_copy)


@pytest.mark.parametrize("layout", ["dir-with-bin", "lone-pt"])
def test_pickle_checkpoints_are_refused(capsys, tiny_copy, tmp_path, layout):
    if layout == "dir-with-bin":
        (tiny_copy / "model.safetensors").unlink()
        target = pickle_file = tiny_copy / "pytorch_model.bin"
    else:
        target = pickle_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle_file)
    code, _, err = run_main(capsys, "chat", "-m", target if layout == "lone-pt" else tiny_copy, *ONE_SHOT)
    line = assert_one_error_line(code, err, pickle_file)
    assert "pickle" in line


def test_truncated_gguf(capsys, tmp_path, default_model_path):
    half = tmp_path / "half.gguf"
    with open(default_model_path, "rb") as src:
        half.write_bytes(src.read(default_model_path.stat().st_size // 2))
    code, _, err = run_main(capsys, "chat", "-m", half, *ONE_SHOT)
    assert_one_error_line(code, err, half)


def test_gguf_with_garbage_is_refused(capsys, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + os.urandom(1000))
    code, _, err = run_main(capsys, "chat", "-m", fake, *ONE_SHOT)
    assert_one_error_line(code, err, fake)


# -- bad requests -----------------------------------------------------------------------------
def test_prompt_longer_than_the_context(capsys, tiny_checkpoint):
    code, _, err = run_main(capsys, "chat", "-m", tiny_checkpoint("llama"), "--prompt", "x" * 300,
                            "-n", "4", "-t", "0")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the prompt is 319 tokens but the context holds 256")


def test_prompt_longer_than_the_context_prints_only_the_error(capsys, tiny_checkpoint):
    code, out, err = run_main(capsys, "chat", "-m", tiny_checkpoint("llama"), "--prompt", "x" * 300,
                              "-n", "4", "-t", "0")
    assert_one_error_line(code, err, "256")
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, tiny_checkpoint):
    code, _, err = run_main(capsys, "chat", "-m", tiny_checkpoint("llama"), "--device", "cuda", *ONE_SHOT)
    assert_one_error_line(code, err, "cuda", "--device cpu")


@pytest.mark.parametrize("option", [["-t", "-1"], ["--top-p", "0"]], ids=["temperature<0", "top_p=0"])
def test_bad_sampling_option(capsys, tiny_checkpoint, option):
    code, _, err = run_main(capsys, "chat", "-m", tiny_checkpoint("llama"), "--prompt", "hi", "-n", "2", *option)
    assert_one_error_line(code, err, option[1])


def test_console_script_reports_missing_model(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_script("chat", "-m", missing, *ONE_SHOT)
    assert_one_error_line(proc.returncode, proc.stderr, missing)
    assert proc.stdout == ""


def test_console_script_reports_truncated_safetensors(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_script("chat", "-m", tiny_copy, *ONE_SHOT)
    assert_one_error_line(proc.returncode, proc.stderr, weights)


# -- working commands -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reply(tiny_checkpoint) -> tuple[Path, str, int]:
    """(checkpoint, the greedy 5-token reply to 'hi', its token count), computed in-process."""
    path = tiny_checkpoint("llama")
    engine = edge_prism.load(path)
    reply = engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=5, temperature=0)
    return path, reply, engine.stats["generated_tokens"]


def test_chat_one_shot_in_process(capsys, tiny_reply):
    path, reply, count = tiny_reply
    code, out, err = run_main(capsys, "chat", "-m", path, *ONE_SHOT)
    assert code == 0, err
    assert out == reply + "\n"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), err
    assert int(SUMMARY.match(lines[0]).group(1)) == count


@pytest.mark.parametrize("how", ["--prompt", "stdin"])
def test_chat_one_shot_console_script(tiny_reply, how):
    path, reply, count = tiny_reply
    if how == "--prompt":
        proc = run_script("chat", "-m", path, *ONE_SHOT)
    else:
        proc = run_script("chat", "-m", path, "-n", "5", "-t", "0", stdin="hi")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reply + "\n"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), proc.stderr
    assert int(SUMMARY.match(lines[0]).group(1)) == count


def test_chat_with_empty_stdin_is_an_error(tiny_checkpoint):
    proc = run_script("chat", "-m", tiny_checkpoint("llama"), "-n", "2", stdin="  \n")
    assert_one_error_line(proc.returncode, proc.stderr, "stdin")


def test_info(default_model_path):
    proc = run_script("info")
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout
    assert "host RAM" in proc.stdout
    assert str(default_model_path) in proc.stdout


def test_default_model_answers_in_process(capsys, monkeypatch, default_engine):
    # The shared engine stands in for a second ~8 s load; the parsing, streaming and output
    # are the command's own.
    # The command closes its engine on the way out; the shared one must stay open for later
    # tests, so its close is recorded here instead of run.
    monkeypatch.setattr(cli, "load_engine", lambda args: default_engine)
    closed = []
    monkeypatch.setattr(default_engine, "close", lambda: closed.append(True))
    code, out, err = run_main(capsys, "chat", "--prompt", "What is 2+2?", "-n", "16", "-t", "0")
    assert code == 0, err
    assert "4" in out
    assert SUMMARY.match(err.strip())
    assert closed == [True]


@pytest.mark.slow
def test_default_model_answers_console_script():
    proc = run_script("chat", "--prompt", "What is 2+2?", "-n", "16", "-t", "0")
    assert proc.returncode == 0, proc.stderr
    assert "4" in proc.stdout
    assert SUMMARY.match(proc.stderr.strip().splitlines()[-1])
