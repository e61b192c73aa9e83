"""The one memory policy: rows per chunk fill the budget, keep the engine's minimum, never exceed
half of what is free; a user's chunk that cannot fit names one that does."""

from __future__ import annotations

import pytest
import torch

from tl_normmix import memory


def test_rows_fill_the_budget_within_minimum_and_rows(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)
    assert memory.rows_per_chunk(1000, 10**6, budget_bytes=10_000) == 10
    assert memory.rows_per_chunk(1000, 7, budget_bytes=10_000) == 7
    assert memory.rows_per_chunk(10**9, 100, minimum=4) == 4
    assert memory.rows_per_chunk(10**9, 100) == 1


def test_free_memory_caps_the_rows(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 20_000)
    rows = memory.rows_per_chunk(1000, 100, budget_bytes=10**9, device="cpu", fixed_bytes=2_000)
    assert rows == 8  # (20_000 / 2 − 2_000) / 1_000
    assert memory.rows_per_chunk(1000, 100, minimum=50, device="cpu", budget_bytes=10**9) == 10


def test_a_chosen_chunk_that_cannot_fit_names_one_that_does(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10_500)
    assert memory.check_fits(5, 1000, device="cpu", what="x") == 5
    with pytest.raises(MemoryError, match=r"chunk_size=20 needs.*chunk_size=10 would fit"):
        memory.check_fits(20, 1000, device="cpu", what="x")
    with pytest.raises(ValueError, match="at least 1"):
        memory.check_fits(0, 1000, device="cpu", what="x")


def test_the_budget_can_be_set_and_reset():
    memory.set_budget(1234)
    try:
        assert memory.budget() == 1234
        assert memory.rows_per_chunk(100, 10**6) == 12
    finally:
        memory.set_budget(None)
    assert memory.budget() == memory.DEFAULT_BUDGET_BYTES
    with pytest.raises(ValueError):
        memory.set_budget(0)


def test_free_memory_is_known_on_the_cpu_of_every_platform():
    free = memory.free_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    assert memory.free_bytes("meta") is None
