"""Tests for bdlkit.compress.speed (FLOP counting and interleaved CPU timing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdlkit.compress.speed import count_flops, measure_speedup, time_interleaved

torch.set_num_threads(1)


def test_count_flops_closed_forms() -> None:
    assert count_flops(nn.Linear(10, 5), torch.zeros(3, 10)) == 2 * 3 * 10 * 5
    conv = nn.Conv2d(2, 4, 3)
    # output 6x6, each output: 2*3*3 MACs
    assert count_flops(conv, torch.zeros(1, 2, 8, 8)) == 2 * 4 * 36 * 2 * 9
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3))
    assert count_flops(net, torch.zeros(2, 3, 4)) == 2 * 2 * (12 * 7 + 7 * 3)
    with pytest.raises(TypeError, match="model"):
        count_flops(3, torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_input"):
        count_flops(nn.Linear(2, 2), [1.0, 2.0])  # type: ignore[arg-type]


def test_time_interleaved_counts_and_order() -> None:
    calls: list[str] = []
    ts = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeats=4,
                          warmup=2, min_seconds=0.0)
    assert [len(t) for t in ts] == [4, 4]
    assert all(t >= 0 for row in ts for t in row)
    # after warm-up (2 + 1 calibration call each), the order alternates a b, b a, a b, b a
    assert calls[6:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved([lambda: None], repeats=0)
    with pytest.raises(TypeError, match="fns"):
        time_interleaved([])


def test_measure_speedup_reports_and_restores_state() -> None:
    big = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))
    small = nn.Sequential(nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10))
    big.train()
    small.eval()
    threads_before = torch.get_num_threads()
    r = measure_speedup(big, small, (256,), batch_sizes=(1, 64), threads=(1, 2), repeats=5,
                        warmup=2, min_seconds=0.005)
    assert torch.get_num_threads() == threads_before
    assert big.training and not small.training
    assert r["flops_original"] == 2 * (256 * 1024 + 1024 * 10)
    assert r["flops_pruned"] == 2 * (256 * 16 + 16 * 10)
    assert r["flop_reduction"] == pytest.approx(r["flops_original"] / r["flops_pruned"])
    assert [(x["threads"], x["batch"]) for x in r["rows"]] == [(1, 1), (1, 64), (2, 1), (2, 64)]
    for x in r["rows"]:
        assert x["original_ms_min"] <= x["original_ms"] <= x["original_ms_max"]
        assert x["speedup_min"] <= x["speedup"] <= x["speedup_max"]
    # a 60x FLOP difference at batch 64 is a real speed-up even on a busy machine
    assert next(x for x in r["rows"] if x["batch"] == 64 and x["threads"] == 1)["speedup"] > 2


def test_measure_speedup_bad_inputs() -> None:
    net = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="original"):
        measure_speedup("net", net, (4,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_shape"):
        measure_speedup(net, net, (0,))
    with pytest.raises(ValueError, match="batch_sizes"):
        measure_speedup(net, net, (4,), batch_sizes=())
    with pytest.raises(ValueError, match="threads"):
        measure_speedup(net, net, (4,), threads=(0,))
    with pytest.raises(ValueError, match="repeats"):
        measure_speedup(net, net, (4,), repeats=0)


def test_measure_speedup_reads_iterators_once_and_keeps_float64() -> None:
    big = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 4)).double()
    small = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).double()
    r = measure_speedup(big, small, (16,), batch_sizes=iter([1, 4]), threads=iter([1]),
                        repeats=2, warmup=1, min_seconds=0.0)
    assert [(row["threads"], row["batch"]) for row in r["rows"]] == [(1, 1), (1, 4)]
