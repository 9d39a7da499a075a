"""Why acco's loss falls behind at high learning rates: the estimate's error feeds back.

A linear model of one direction of the loss, curvature h, with Adam seen as heavy-ball momentum
under a fixed preconditioner (η = lr / √v, β = β₁, no bias correction), and κ = η·h the
*preconditioned* curvature. Half of an update's batch is computed at θ̃ₜ (``g₁ = h·θ̃ₜ + ξ₁``),
the other half at θₜ (``g₂ = h·θₜ + ξ₂``), and the estimate θ̃ₜ₊₁ is made from θₜ by a rule:

* ``sync``: no estimate; both halves at θₜ (ZeRO-1, DDP);
* ``plain``: θ̃ₜ₊₁ = θₜ − η(β·mₜ + (1 − β)·g₁), the paper's estimate;
* ``momentum``: the same with (g₁ + mₜ) / 2 in place of g₁ (``estimate="momentum"``);
* ``carry:<c>``: plain, plus c·(θ̃ₜ − θₜ), the previous estimate's offset carried on.

For ``plain`` the estimate's error eₜ = θ̃ₜ − θₜ obeys eₜ₊₁ = −κ(1 − β)/2 · eₜ + noise: g₁ is
computed at θ̃ₜ, so it carries h·eₜ, which the estimate takes whole and the commit only half.
It is unstable once κ > 2 / (1 − β) = 20, while synchronous momentum is stable up to
κ < 2(1 + β) / (1 − β) = 38 (β = 0.9): the estimate halves the sharpness Adam can train at, the
regime ("edge of stability") where the best learning rates put the sharpest directions. Below
the threshold the error still amplifies the gradient noise there. ``benchmarks.estimate_study``
tests the consequence on the real model with diagnostic oracles that remove the feedback.

Usage: ``.venv/bin/python -m benchmarks.estimate_stability`` prints the thresholds and the
stationary noise loss relative to sync.
"""

from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

# State: θ (committed), θ̃ (where g₁ is computed), m (momentum). Noise: ξ₁, ξ₂ (half batches).
_STATE = 3


def _step(state: np.ndarray, noise: np.ndarray, kappa: float, rule: str, beta: float) -> np.ndarray:
    theta, estimate, m = state
    xi1, xi2 = noise
    g1 = kappa * (theta if rule == "sync" else estimate) + xi1
    g2 = kappa * theta + xi2
    m_next = beta * m + (1 - beta) * (g1 + g2) / 2
    theta_next = theta - m_next
    kind, _, value = rule.partition(":")
    if kind == "sync":
        estimate_next = theta_next
    elif kind in ("plain", "carry"):
        estimate_next = theta - (beta * m + (1 - beta) * g1) + (float(value) * (estimate - theta) if value else 0.0)
    elif kind == "momentum":
        estimate_next = theta - (beta * m + (1 - beta) * (g1 + m) / 2)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return np.array([theta_next, estimate_next, m_next])


def transition(kappa: float, rule: str, beta: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of state' = A·state + B·noise (η = 1, so the curvature is κ)."""
    a = np.column_stack([_step(np.eye(_STATE)[i], np.zeros(2), kappa, rule, beta) for i in range(_STATE)])
    b = np.column_stack([_step(np.zeros(_STATE), np.eye(2)[j], kappa, rule, beta) for j in range(2)])
    return a, b


def spectral_radius(kappa: float, rule: str, beta: float = 0.9) -> float:
    return float(max(abs(np.linalg.eigvals(transition(kappa, rule, beta)[0]))))


def stability_threshold(rule: str, beta: float = 0.9, upper: float = 200.0) -> float:
    """The smallest κ at which the iteration stops contracting (first crossing, scanned then bisected)."""
    grid = np.linspace(1e-3, upper, 4000)
    unstable = next((k for k in grid if spectral_radius(k, rule, beta) >= 1.0), None)
    if unstable is None:
        return float("inf")
    low, high = unstable - (grid[1] - grid[0]), unstable
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (low, mid) if spectral_radius(mid, rule, beta) >= 1.0 else (mid, high)
    return high


def noise_loss(kappa: float, rule: str, beta: float = 0.9) -> float:
    """Stationary E[½κθ²] under unit half-batch noise; inf where unstable."""
    a, b = transition(kappa, rule, beta)
    if max(abs(np.linalg.eigvals(a))) >= 1.0 - 1e-9:
        return float("inf")
    covariance, power = b @ b.T, a.copy()  # Σ = Σₖ Aᵏ Q Aᵏᵀ by doubling
    for _ in range(40):
        covariance = covariance + power @ covariance @ power.T
        power = power @ power
    return 0.5 * kappa * float(covariance[0, 0])


def table(rules: list[str], beta: float, kappas: list[float]) -> str:
    lines = [f"β = {beta}: stability threshold in κ = lr·h/√v, and stationary noise loss relative to sync",
             "| rule | threshold | " + " | ".join(f"κ={k:g}" for k in kappas) + " |",
             "|---|---|" + "---|" * len(kappas)]
    base = [noise_loss(k, "sync", beta) for k in kappas]
    for rule in rules:
        ratios = [noise_loss(k, rule, beta) / b for k, b in zip(kappas, base)]
        cells = ["unstable" if not np.isfinite(r) else f"{r:.2f}" for r in ratios]
        lines.append(f"| {rule} | {stability_threshold(rule, beta):.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--rules", default="sync,plain,momentum,carry:0.5,carry:0.9")
    p.add_argument("--kappas", default="1,5,10,15,20,25,30,35")
    args = p.parse_args(argv)
    print(table(args.rules.split(","), args.beta, [float(k) for k in args.kappas.split(",")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
