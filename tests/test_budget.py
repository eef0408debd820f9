"""Memory budgets (budget.py): the default limit, the limit a job sets for its run, the sizes a
user writes and reads, and the refusal of an input that describes more tensor bytes than allowed."""

from __future__ import annotations

import os

import pytest

from qlin_cli import budget
from qlin_cli.budget import check_budget, default_max_memory, format_size, limit, max_memory, parse_size
from qlin_cli.errors import ConfigError, InputError


def test_the_default_limit_is_half_the_physical_memory():
    assert default_max_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert max_memory() == default_max_memory()  # no job set a limit


def test_the_default_is_8_gib_where_the_memory_cannot_be_read(monkeypatch):
    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(budget.os, "sysconf", no_sysconf)
    assert default_max_memory() == 8 * 2**30
    assert max_memory() == 8 * 2**30


def test_a_limit_holds_within_its_block_and_nests():
    default = max_memory()
    with limit(1000):
        assert max_memory() == 1000
        with limit(None):  # None: the default, inside a limited block too
            assert max_memory() == default
        with limit(50):
            assert max_memory() == 50
        assert max_memory() == 1000
    assert max_memory() == default


def test_a_limit_is_undone_when_its_block_raises():
    default = max_memory()
    with pytest.raises(RuntimeError, match="boom"):
        with limit(10):
            raise RuntimeError("boom")
    assert max_memory() == default


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8GB"])
def test_a_limit_must_be_a_positive_number_of_bytes(bad):
    with pytest.raises(ConfigError) as exc:
        with limit(bad):
            pass
    assert str(exc.value) == f"`max_memory` {bad!r}: give a positive number of bytes"


@pytest.mark.parametrize("text, nbytes", [
    ("8GB", 8 * 10**9), ("8gb", 8 * 10**9), ("8G", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000),
    ("1000000", 1_000_000), (" 2 kib ", 2048), (".5k", 500), ("1.", 1), ("3b", 3), ("2TiB", 2 * 2**40),
    ("1.9", 1),  # whole bytes, rounded down
])
def test_sizes_in_decimal_and_binary_units(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["lots", "8XB", "-1GB", "", "nan", "1e9", "8 G B"])
def test_a_size_that_is_not_one_says_how_to_write_it(text):
    with pytest.raises(ConfigError) as exc:
        parse_size(text)
    assert str(exc.value) == f"`max_memory` {text!r}: give a size such as 8GB, 512MiB or 1000000 (bytes)"


@pytest.mark.parametrize("text", ["0", "0.5", "0kB", "9" * 400])  # under one byte, or beyond a float
def test_a_size_must_be_positive_and_finite(text):
    with pytest.raises(ConfigError) as exc:
        parse_size(text)
    assert str(exc.value) == f"`max_memory` {text!r}: give a positive size, e.g. 8GB"


@pytest.mark.parametrize("nbytes, text", [
    (0, "0 bytes"), (999, "999 bytes"), (999.9, "999 bytes"), (1000, "1.0 kB"), (89_200, "89.2 kB"),
    (999_999, "1000.0 kB"), (10**6, "1.0 MB"), (67_108_864, "67.1 MB"), (3.6e9, "3.6 GB"), (10**12, "1.0 TB"),
    (5 * 10**15, "5000.0 TB"),
])
def test_sizes_read_in_decimal_units(nbytes, text):
    assert format_size(nbytes) == text


def test_an_input_over_the_limit_is_refused_with_both_sizes():
    with limit(1000):
        check_budget(1000, "inputs x.safetensors")  # at the limit: allowed
        with pytest.raises(InputError) as exc:
            check_budget(1001, "inputs x.safetensors")
    assert str(exc.value) == ("inputs x.safetensors holds 1.0 kB of tensors, more than `max_memory` 1.0 kB; "
                              "pass a larger `max_memory` if this machine has the memory")


def test_without_a_limit_the_default_applies():
    check_budget(default_max_memory(), "model.pt")
    with pytest.raises(InputError, match=r"^model\.pt holds .* of tensors, more than `max_memory` "):
        check_budget(default_max_memory() + 1, "model.pt")
