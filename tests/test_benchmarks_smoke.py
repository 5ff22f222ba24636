"""The benchmark scripts a lent GPU or an AMX host runs next (issue 30) must not fail there on
a typo: they compile, the GPU suite exits 0 with one line where there is no CUDA, its report
renders every section it can produce, and the host facts name the CPU's bf16 support."""

from __future__ import annotations

import importlib
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_scripts_compile(script):
    py_compile.compile(str(BENCHMARKS / script), doraise=True, cfile=None)


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_host_facts_name_the_bf16_support(benchmarks_on_path):
    host = importlib.import_module("host")
    info = host.host_info(peaks=False)
    assert info["bf16_units"] in ("amx", "avx512_bf16", "none")
    assert info["host_kind"] in ("cpu", "cpu-avx512_bf16", "cpu-amx")
    assert set(info["flags"]) <= set(host.FLAGS_OF_INTEREST)
    line = host.host_line({**info, "gemm_gflops_1024": {"fp32": 100.0, "bf16": 210.0}})
    assert "bf16 units:" in line and "fp32 100, bf16 210 GFLOP/s" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the suite runs for real")
def test_gpu_suite_without_cuda_says_so_and_exits_0():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_suite.py")], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("gpu_suite: no CUDA device here")


def test_gpu_suite_report_renders_the_graphs_and_budget_sections(benchmarks_on_path):
    suite = importlib.import_module("gpu_suite")
    entry = {
        "ldmkit_s": 0.5, "diffusers_s": 0.8, "speedup_median_of_pairs": 1.6, "compile_s": {"ldmkit": 30.0},
    }
    results = {
        "environment": {"gpu": "X", "torch": "2", "cuda": "13", "diffusers": "0.42", "xformers": False},
        "graphs": {"fmnist_ldm_kl_f4/default/ldmkit-graphs-vs-diffusers-eager": entry,
                   "fmnist_ldm_kl_f4/bf16/ldmkit-graphs-vs-diffusers-graphs": {"skipped": "RuntimeError: no"}},
        "budget_skipped": ["paper", "fsdp"],
        "seconds": 530.0,
        "train_step": {"small": {"params_m": 24.2, "batch": [8, 4, 32, 32], "modes": {"bf16": {
            "ldmkit_precision": "bf16", "diffusers": "bfloat16", "ldmkit_ms": 20.0, "diffusers_ms": 24.0,
            "speedup_median_of_pairs": 1.2, "speedup_range": [1.1, 1.3], "peak_memory_gib": {"ldmkit": 1.0, "diffusers": 1.1},
            "ldmkit_mfu": 0.3, "ldmkit_bf16_weights_ms": 18.0, "bf16_weights_speedup_over_autocast": 1.11,
            "bf16_weights_peak_memory_gib": 1.05}}}},
    }
    text = suite.markdown(results)
    assert "- bf16: 18.0 ms, 1.11x, peak 1.05 GiB" in text
    assert "| fmnist_ldm_kl_f4/default/ldmkit-graphs-vs-diffusers-eager | 0.500 | 0.800 | 1.60x | 30 / 0 |" in text
    assert "skipped: RuntimeError: no" in text
    assert "Skipped for the time budget: paper, fsdp." in text and "Suite time: 530.0 s." in text


def test_gpu_suite_train_step_on_working_weights_runs_and_trains(benchmarks_on_path):
    """The suite's bf16-weights train step (run on CUDA there), exercised on the CPU: it
    steps, and its weights follow the autocast step's."""
    import copy

    import torch
    from torch import nn

    suite = importlib.import_module("gpu_suite")

    class Net(nn.Module):  # the UNet's call signature: (x, t, cond)
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                                      nn.Conv2d(8, 3, 3, padding=1))

        def forward(self, x, t, cond):
            return self.body(x)

    torch.manual_seed(0)
    plain = Net()
    working = copy.deepcopy(plain)
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def forward(m, x, t, cond):
        return m(x, t, cond)

    steps = [suite.make_train_step(plain, forward, x, None, None, target, torch.bfloat16, device="cpu"),
             suite.make_train_step(working, None, x, None, None, target, torch.bfloat16, working_weights=True,
                                   device="cpu")]
    before = [p.clone() for p in working.parameters()]
    for _ in range(2):
        for step in steps:
            step()
    assert all(not torch.equal(a, b) for a, b in zip(before, working.parameters(), strict=True))
    for a, b in zip(plain.parameters(), working.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
