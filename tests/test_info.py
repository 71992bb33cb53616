"""`edge-prism info MODEL`: sizes, minimum and hot-set budgets and a speed estimate, before
anything is built."""

from __future__ import annotations

from edge_prism import cli
from edge_prism.info import describe, model_info
from edge_prism.runtime.sizes import format_size


def test_prism_info_matches_what_loading_needs(prism_of, min_budget):
    path = prism_of("qwen2_moe")
    info = model_info(path)
    assert info.prism and info.minimum_budget == min_budget(path)
    assert info.expert_bytes == (path / "experts.safetensors").stat().st_size - _non_block_bytes(path)
    assert info.hot_bytes is not None and 0 < info.hot_bytes <= info.expert_bytes
    assert 0 < info.hit_rate_of(info.hot_bytes) <= 1
    lines = describe(path, measure=False)
    assert any(format_size(min_budget(path)) in line and "minimum" in line for line in lines)


def _non_block_bytes(path) -> int:
    from edge_prism.refactor.prism import open_prism

    pc = open_prism(path)
    blocks = sum(pc.block_range(layer)[1] for layer in range(len(pc.parts)))
    return (path / "experts.safetensors").stat().st_size - blocks


def test_plain_checkpoint_is_sized_as_its_prism_would_store_it(tiny_checkpoint, prism_of):
    plain = model_info(tiny_checkpoint("olmoe"))
    assert not plain.prism and plain.hot_bytes is None
    built = model_info(prism_of("olmoe", quant="auto"))
    assert [lb.block_bytes for lb in plain.layers] == [lb.block_bytes for lb in built.layers]
    assert plain.minimum_budget == built.minimum_budget


def test_info_model_on_the_command_line(tiny_checkpoint, capsys):
    code = cli.main(["info", str(tiny_checkpoint("qwen3_moe")), "--memory-budget", "30%", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "minimum memory budget" in out and "expected decode tokens/s" in out and "30%:" in out
