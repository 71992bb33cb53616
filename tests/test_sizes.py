"""Sizes as users type them on the command line and in the API."""

from __future__ import annotations

import pytest

from edge_prism.errors import ConfigError
from edge_prism.runtime.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", 123),
        ("0", 0),
        ("64KiB", 64 * 2**10),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("1TiB", 2**40),
        ("2GB", 2 * 10**9),
        ("300mb", 300 * 10**6),
        ("4kb", 4000),
        ("512 MiB", 512 * 2**20),
        (" 1.5 gib ", 3 * 2**29),
        ("512mib", 512 * 2**20),
        ("96B", 96),
        (".5KiB", 512),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_common_spellings(text, expected):
    assert parse_size(text) == expected


def test_parse_size_percent_of_total():
    assert parse_size("25%", total=8 * 2**30) == 2 * 2**30
    assert parse_size("100 %", total=1000) == 1000
    assert parse_size("12.5%", total=800) == 100


def test_parse_size_percent_needs_total():
    with pytest.raises(ConfigError, match="percentage"):
        parse_size("25%", what="--memory-budget")


@pytest.mark.parametrize("text", ["", "abc", "12 apples", "1.5.2GiB", "-5MiB", "GiB", "2G", "150%", "nan", -1, True, 1.5])
def test_parse_size_rejects_garbage_with_a_helpful_message(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text, total=100, what="--memory-budget")
    message = str(info.value)
    assert "--memory-budget" in message
    assert str(text) in message


def test_parse_size_error_says_what_to_use():
    with pytest.raises(ConfigError, match=r"use a byte count, 512MiB, 1\.5GiB or 25%"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (96, "96 B"),
        (1023, "1023 B"),
        (64 * 2**10, "64.0 KiB"),
        (512 * 2**20, "512.0 MiB"),
        (3 * 2**29, "1.50 GiB"),
        (2**40, "1.00 TiB"),
        (-2 * 2**20, "-2.0 MiB"),
    ],
)
def test_format_size(n, expected):
    assert format_size(n) == expected


def test_format_then_parse_round_trips_within_rounding():
    for n in (1, 4095, 10**6, 123_456_789, 5 * 2**30 + 17):
        text = format_size(n).replace(" ", "")
        assert abs(parse_size(text) - n) <= max(1, n * 0.01)
