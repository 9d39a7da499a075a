"""``correction="secant-gated"``'s gate as a pure function (``acco.secant.gated_kappa``), held to its
definition written out here: κ·min(1, m²/v) with m, v the running averages (0.9) of the measured κ and κ², the
first κ starting them, 0 while m ≤ 0; the host (floats) and device (0-dim tensors) forms agree; a κ too large
to square corrects nothing and leaves the averages alone; a checkpoint of the other variant warns."""

from __future__ import annotations

import logging

import pytest
import torch

from acco.secant import GATE_BETA, SecantCorrection, gated_kappa

KAPPAS = [0.8, -0.3, 1.2, 0.1, -2.0, 0.5, 0.9, 3.0, -0.1, 0.7]


def _definition(kappas):
    out, m, v = [], None, None
    for k in kappas:
        m, v = (k, k * k) if m is None else (GATE_BETA * m + (1 - GATE_BETA) * k, GATE_BETA * v + (1 - GATE_BETA) * k * k)
        out.append(max(0.0, k) * (min(1.0, m * m / v) if m > 0 else 0.0))
    return out


def test_host_and_device_forms_follow_the_definition():
    want = _definition(KAPPAS)
    host, device = (0.0, 0.0, False), (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), torch.tensor(False))
    for k, expected in zip(KAPPAS, want):
        got_host, host = gated_kappa(k, host)
        got_device, device = gated_kappa(torch.tensor(k, dtype=torch.float64), device)
        assert got_host == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert float(got_device) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert 0 < sum(want) < sum(max(0.0, k) for k in KAPPAS)  # the gate shrank some κ and kept others


@pytest.mark.parametrize("on_device", [False, True])
def test_a_kappa_too_large_to_square_corrects_nothing_and_leaves_the_averages(on_device):
    as_value = (lambda x: torch.tensor(x, dtype=torch.float64)) if on_device else float
    moments = (0.0, 0.0, False)
    for k in (0.8, 1.1):
        _, moments = gated_kappa(as_value(k), moments)
    kappa, after = gated_kappa(as_value(1e160), moments)
    assert float(kappa) == 0.0
    assert [float(x) for x in after] == pytest.approx([float(x) for x in moments])
    kappa, _ = gated_kappa(as_value(0.9), after)
    assert torch.isfinite(torch.as_tensor(kappa)) and float(kappa) > 0


@pytest.mark.parametrize("gated,with_moments", [(True, False), (False, True)])
def test_a_checkpoint_of_the_other_variant_warns(caplog, gated, with_moments):
    correction = SecantCorrection(torch.zeros(4, dtype=torch.float64), gated=gated)
    saved = {"point": torch.ones(4, dtype=torch.float64), "carried_valid": True, "kappa": 0.5, "at_committed": False}
    if with_moments:
        saved["kappa_moments"] = [0.5, 0.3, True]
    with caplog.at_level(logging.WARNING, logger="acco.secant"):
        correction.load(saved, None)
    assert "saved with correction=" in caplog.text
    assert correction.kappa == 0.5 and correction.moments == (0.0, 0.0, False)


def test_an_unsquarable_first_kappa_starts_nothing_on_either_path():
    """Through ``SecantCorrection.keep_kappa`` too: the averages after it are as before any κ, on both paths."""
    for on_device in (False, True):
        correction = SecantCorrection(torch.zeros(2, dtype=torch.float64), gated=True)
        raw = torch.tensor(1e160, dtype=torch.float64) if on_device else 1e160
        kappa, correction._measured_moments = gated_kappa(raw, correction.moments)
        correction.keep_kappa(kappa, torch.tensor(True) if on_device else True)
        later, _ = gated_kappa(torch.tensor(0.5, dtype=torch.float64) if on_device else 0.5, correction.moments)
        assert float(later) == pytest.approx(0.5)  # started afresh at 0.5: the gate is 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("on_device", [False, True])
def test_a_kappa_too_large_for_the_master_corrects_nothing_in_either_variant(gated, on_device, dtype):
    """A denormal |e|² against finite dots gives κ = inf, one whose square overflows, or (float32 master) one
    above the master's largest number: the commit's gradient and norm² must stay as they were (finite), not
    become ḡ − inf·e after its finiteness check, and the carried κ and the gate's averages must be kept."""
    tiny_error = 1e-161 if dtype == torch.float64 else 1e-23
    cases = [[1.0, 0.0, 1e-320], [1.0, 0.0, 1e-170]] if dtype == torch.float64 else [[1.0, 0.0, 1.4e-45], [1.0, 0.0, 1e-40]]
    as_value = (lambda x: torch.tensor(x, dtype=torch.float64)) if on_device else float
    for dots in cases:  # float64: κ = inf, κ = 1e170 (κ² overflows); float32: κ ≈ 7e44 and 1e40, above its 3.4e38
        correction = SecantCorrection(torch.zeros(3, dtype=dtype), gated=gated)
        correction.point, correction.carried_valid = torch.tensor([tiny_error, 0.0, 0.0], dtype=dtype), True
        correction.kappa = as_value(0.3)
        correction.moments = (as_value(0.4), as_value(0.25), torch.tensor(True) if on_device else True)
        grad = torch.tensor([0.5, -1.0, 2.0], dtype=dtype)
        summed = torch.tensor(dots, dtype=torch.float64) if on_device else [float(x) for x in dots]
        square, kappa, measured = correction.correct_commit(grad, summed, as_value(5.25), as_value(1.0), as_value(1.0), as_value(2.0))
        correction.keep_kappa(kappa, measured)
        assert float(kappa) == 0.0 and not bool(measured)
        assert torch.equal(grad, torch.tensor([0.5, -1.0, 2.0], dtype=dtype)) and float(square) == 5.25
        assert float(correction.kappa) == pytest.approx(0.3)  # the last kept κ stays
        assert [float(x) for x in correction.moments] == pytest.approx([0.4, 0.25, 1.0])
