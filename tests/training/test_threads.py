"""trainer.num_threads: the default takes half the usable cores on the CPU."""

from __future__ import annotations

import pytest
import torch

from ldmkit.training import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8)])
def test_default_is_half_the_cores(cores, expected):
    assert threads.default_num_threads(cores) == expected


def test_usable_cores_follows_the_affinity(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert threads.usable_cores() == 6
    assert threads.default_num_threads() == 3


def test_null_and_auto_choose_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.resolve_num_threads(None) == 4
    assert threads.resolve_num_threads("auto", torch.device("cpu")) == 4


def test_an_explicit_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve_num_threads(2) == 2
    assert threads.resolve_num_threads("5", "cuda") == 5


def test_omp_num_threads_and_accelerators_keep_torchs_setting(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.resolve_num_threads(None) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.resolve_num_threads(None, "cuda") is None


@pytest.mark.parametrize("bad", [0, -1, "abc", 1.5, True])
def test_bad_values_name_the_key(bad):
    with pytest.raises(ValueError, match="trainer.num_threads"):
        threads.resolve_num_threads(bad)


def test_apply_sets_torch(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.apply_num_threads(None) == 1 == torch.get_num_threads()
    assert threads.apply_num_threads(2) == 2 == torch.get_num_threads()
