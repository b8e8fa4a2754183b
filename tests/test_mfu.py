"""MFU helpers must not disturb the run they measure."""

from __future__ import annotations

import torch

from neuroplastic.training.mfu import measure_matmul_peak


def test_measuring_the_peak_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert measure_matmul_peak(torch.device("cpu"), n=64, reps=1) > 0
    assert torch.equal(torch.rand(4), expected)
