"""Sharded safetensors checkpoints load memory-mapped and exactly; the chat REPL on a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import edge_prism
from edge_prism.errors import CorruptCheckpointError
from edge_prism.loaders.safetensors_mmap import SafetensorsFile

PROMPT = list(range(40, 64))


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("qwen2_moe")
    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


def test_sharded_checkpoint_matches_the_single_file(sharded, tiny_engines):
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    torch.testing.assert_close(edge_prism.load(sharded).logits(PROMPT), tiny_engines("qwen2_moe").logits(PROMPT),
                               rtol=0, atol=0)


def test_missing_shard_names_the_file(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (broken / victim).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{victim}.*missing"):
        edge_prism.load(broken)


def test_tensors_are_views_on_the_mapping_not_copies(tiny_checkpoint):
    f = SafetensorsFile(tiny_checkpoint("llama") / "model.safetensors")
    name = f.names()[0]
    a, b = f.get(name), f.get(name)
    assert a.data_ptr() == b.data_ptr()  # both view the same mapped page, nothing was read into RAM


def _run_repl(args: list[str], lines: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run the console script on a pseudo-terminal, typing ``lines`` one per prompt."""
    exe = Path(sys.executable).with_name("edge-prism")
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(exe), *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out, pending, deadline = b"", list(lines), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if pending and out.rstrip().endswith(b">"):
                os.write(master, (pending.pop(0) + "\n").encode())
                out += b"\n"
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_repl_chats_resets_and_exits(tiny_checkpoint):
    code, out = _run_repl(["chat", "-m", str(tiny_checkpoint("llama")), "-n", "4", "-t", "0"],
                          ["hello", "/reset", "again", "/exit"])
    assert code == 0, out
    assert "/reset starts over" in out  # the banner of the interactive mode
    assert "(conversation cleared)" in out
    assert out.count("tokens/s") == 2  # one summary line per reply
