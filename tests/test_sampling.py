"""SamplingConfig validation and Sampler behaviour on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from edge_prism.errors import ConfigError
from edge_prism.sampling import Sampler, SamplingConfig

# Token 3 is the likeliest, then 1, then 4; softmax mass: 3 ~0.64, 1 ~0.24, 4 ~0.09, rest ~0.03.
LOGITS = torch.tensor([-1.0, 2.0, -2.0, 3.0, 1.0, -3.0])
DRAWS = 400


def draws(cfg: SamplingConfig, logits: torch.Tensor = LOGITS, n: int = DRAWS) -> list[int]:
    sampler = Sampler(cfg)
    return [sampler(logits) for _ in range(n)]


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2), dict(top_k=-1),
    dict(max_new_tokens=-5),
], ids=["temperature<0", "top_p=0", "top_p>1", "top_p<0", "top_k<0", "max_new_tokens<0"])
def test_invalid_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


def test_valid_edges_are_accepted():
    SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=0)
    SamplingConfig(temperature=2.0, top_p=1e-9, top_k=1)


def test_greedy_is_argmax_and_ignores_the_seed():
    assert draws(SamplingConfig(temperature=0.0), n=5) == [3] * 5
    assert Sampler(SamplingConfig(temperature=0.0, seed=7))(torch.tensor([0.5, 0.1, 0.9])) == 2


def test_top_k_restricts_the_support():
    assert set(draws(SamplingConfig(temperature=1.0, top_k=2, seed=0))) == {1, 3}
    assert set(draws(SamplingConfig(temperature=1.0, top_k=1, seed=0))) == {3}


def test_without_cuts_every_token_can_be_drawn():
    flat = torch.zeros(6)
    assert set(draws(SamplingConfig(temperature=1.0, seed=0), logits=flat)) == set(range(6))


@pytest.mark.parametrize("top_p, support", [(0.5, {3}), (0.8, {1, 3}), (0.95, {1, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, support):
    assert set(draws(SamplingConfig(temperature=1.0, top_p=top_p, seed=0))) == support


def test_top_k_and_top_p_combine():
    # top_k=3 keeps {3, 1, 4}; renormalised, 3 holds ~0.67, so top_p=0.6 leaves it alone.
    assert set(draws(SamplingConfig(temperature=1.0, top_k=3, top_p=0.6, seed=0))) == {3}


def test_low_temperature_concentrates_on_the_argmax():
    assert set(draws(SamplingConfig(temperature=0.05, seed=0))) == {3}


def test_same_seed_same_draws_other_seed_differs():
    cfg = dict(temperature=1.0, top_k=0, top_p=1.0)
    first = draws(SamplingConfig(seed=123, **cfg), n=50)
    assert draws(SamplingConfig(seed=123, **cfg), n=50) == first
    assert draws(SamplingConfig(seed=124, **cfg), n=50) != first


def test_sampling_frequencies_follow_the_softmax():
    counts = torch.bincount(torch.tensor(draws(SamplingConfig(temperature=1.0, seed=0), n=4000)),
                            minlength=6).float()
    torch.testing.assert_close(counts / counts.sum(), torch.softmax(LOGITS, -1), rtol=0, atol=0.03)
