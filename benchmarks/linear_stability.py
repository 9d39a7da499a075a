"""Issue 22: why acco's gap grows with the learning rate, in the smallest model that shows it.

One sharp direction of the loss, L(θ) = ½·h·θ², gradient noise ξ ~ N(0, 1) per half batch, Adam's first
moment (β₁) with the preconditioner frozen and folded into η (near a minimum Adam's second moment moves
slowly), so that every rule is a linear system x' = A·x + B·ξ. Its stationary covariance solves the
discrete Lyapunov equation S = A·S·Aᵀ + B·Bᵀ, and the stationary loss is ½·h·S[θ, θ]; a spectral radius
≥ 1 means the rule diverges in that direction. The state is (θₜ, θ̃ₜ, mₜ):

* ``sync``: both halves at θₜ; the commit steps m ← β₁m + (1 − β₁)·(g₁ + g₂)/2, θ ← θ − η·m.
* ``acco``: g₁ at θ̃ₜ; the estimate θ̃ₜ₊₁ = θₜ − η·(β₁mₜ + (1 − β₁)·g₁) (Adam's step on ḡ₁, never committed).
* ``damp:<α>``: θ̃ₜ₊₁ = θₜ + α·(acco's θ̃ₜ₊₁ − θₜ).
* ``weighted:<w>``: the commit steps on w·g₁ + (1 − w)·g₂.
* ``oracle``: the estimate steps on g₁'s noise at θₜ (what report 3b's oracle does), the commit as acco.

The sharpness is given as a fraction f of sync's own limit a_max = ηh = 2(1 + β₁)/(1 − β₁), the edge of
stability that Adam's training is known to approach (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability"). What it shows: acco's estimate is a recursion in itself (θ̃ₜ₊₁ depends on the gradient
at θ̃ₜ with gain −ηh(1 − β₁)), which loses stability at about half of sync's limit; below that it costs
little, near it the loss in that direction grows without bound. Pure torch, seconds to run::

    python -m benchmarks.linear_stability --json benchmarks/results/linear_stability.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

RULES = ("sync", "acco", "damp:0.5", "weighted:0.25", "oracle")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.8)


def step(x: torch.Tensor, noise: torch.Tensor, a: float, beta: float, rule: str) -> torch.Tensor:
    """One update of the linear model (h = 1, η = a): state (θ, θ̃, m), noise (ξ₁, ξ₂)."""
    theta, estimate, m = x
    xi1, xi2 = noise
    kind, _, value = rule.partition(":")
    g1 = (theta if kind == "sync" else estimate) + xi1
    g2 = theta + xi2
    g_estimate = theta + xi1 if kind == "oracle" else g1
    new_estimate = theta - a * (beta * m + (1 - beta) * g_estimate)
    if kind == "damp":
        new_estimate = theta + float(value) * (new_estimate - theta)
    w = float(value) if kind == "weighted" else 0.5
    new_m = beta * m + (1 - beta) * (w * g1 + (1 - w) * g2)
    return torch.stack([theta - a * new_m, new_estimate, new_m])


def linear_system(a: float, beta: float, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of x' = A·x + B·ξ, read off ``step`` column by column (it is linear)."""
    eye3, eye2 = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    zero3, zero2 = torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    A = torch.stack([step(e, zero2, a, beta, rule) for e in eye3], 1)
    B = torch.stack([step(zero3, e, a, beta, rule) for e in eye2], 1)
    return A, B


def stationary(a: float, beta: float, rule: str) -> tuple[Optional[float], float]:
    """(stationary loss ½·S[θ, θ], or None where the rule diverges; spectral radius of A)."""
    A, B = linear_system(a, beta, rule)
    radius = float(torch.linalg.eigvals(A).abs().max())
    if radius >= 1.0:
        return None, radius
    n = A.shape[0]
    # vec(S) = (I − A ⊗ A)⁻¹ vec(B·Bᵀ): the Lyapunov equation as one linear solve (row-major vec).
    vec = torch.linalg.solve(torch.eye(n * n, dtype=torch.float64) - torch.kron(A, A), (B @ B.T).reshape(-1))
    covariance = vec.reshape(n, n)
    return 0.5 * float(covariance[0, 0]), radius


def limit_fraction(beta: float, rule: str, tolerance: float = 1e-4) -> float:
    """The largest fraction of sync's limit at which ``rule`` is still stable in the θ direction (bisection;
    a mode of θ̃ alone that never reaches θ is ignored, as with weighted:0, by checking the loss instead)."""
    top = 2 * (1 + beta) / (1 - beta)
    low, high = 0.0, 1.0
    while high - low > tolerance:
        mid = (low + high) / 2
        loss, _ = stationary(mid * top, beta, rule)
        low, high = (mid, high) if loss is not None else (low, mid)
    return low


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", default="0.9,0.95,0.98")
    p.add_argument("--json", default="benchmarks/results/linear_stability.json")
    args = p.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    table: dict[str, dict] = {}
    lines = ["# The estimate's stability in one sharp direction (issue 22; `benchmarks/linear_stability.py`)", "",
             "Reproduce: `python -m benchmarks.linear_stability --json benchmarks/results/linear_stability.json` (seconds).", "",
             "Stationary loss in one direction of the loss, relative to sync's, at sharpness ηh given as a fraction of sync's",
             "stability limit 2(1 + β₁)/(1 − β₁); ∞: the rule diverges there. Last column: the largest stable fraction.", ""]
    for beta in betas:
        top = 2 * (1 + beta) / (1 - beta)
        lines += [f"## β₁ = {beta:g} (sync's limit ηh = {top:.0f})", "",
                  "| rule | " + " | ".join(f"f = {f:g}" for f in FRACTIONS) + " | stable up to f |",
                  "|---|" + "---|" * (len(FRACTIONS) + 1)]
        table[str(beta)] = {}
        for rule in RULES:
            cells, values = [], []
            for f in FRACTIONS:
                base, _ = stationary(f * top, beta, "sync")
                loss, radius = stationary(f * top, beta, rule)
                ratio = None if loss is None or base is None else loss / base
                values.append({"fraction": f, "loss_over_sync": ratio, "spectral_radius": radius})
                cells.append("∞" if ratio is None else f"{ratio:.2f}")
            limit = limit_fraction(beta, rule)
            table[str(beta)][rule] = {"by_fraction": values, "stable_up_to_fraction": limit}
            lines.append(f"| {rule} | " + " | ".join(cells) + f" | {limit:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv, "betas": table}, indent=1))
    out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
