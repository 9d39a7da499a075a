"""What the ranks agree on at the start of every round: pure encoding, no process groups.

A round's first collective is one small all-reduce (sum) of a float64 vector that every rank
fills from what it saw since the previous launch. Summed, it tells every rank the same things:

* how many micro-batches each rank contributes, and how many ranks are finishing;
* which parameters received a gradient on at least one rank (the others are left untouched, as
  torch skips ``p.grad is None``);
* which ranks found their model's parameters written outside the optimizer, and which found a
  change that cannot be adopted (a parameter cast, moved to another device, or unfrozen);
* the hyper-parameters of rank 0's param groups, so that every shard of the round steps with the
  same values whatever each rank's scheduler did (plus every rank's own values and their squares,
  to detect differences: the sum alone misses two ranks that differ from rank 0 in opposite
  directions, the squares catch them).

Each rank has a slot of its own for its ownership report, so every rank can name the rank and the
parameter in its error message.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence


class Problem(enum.IntEnum):
    """A change to the model that the optimizer cannot adopt (0: none)."""

    NONE = 0
    MOVED = 1  # the parameter now lives on another device
    CAST = 2  # the parameter now has another dtype
    RESHAPED = 3  # the parameter now has another shape
    UNFROZEN = 4  # a parameter left out at construction (requires_grad=False) is now trainable


PROBLEM_ADVICE = {
    Problem.MOVED: "it was moved to another device after AccoOptimizer was built; move or cast the model first, then build the optimizer",
    Problem.CAST: "it was cast to another dtype after AccoOptimizer was built; move or cast the model first, then build the optimizer",
    Problem.RESHAPED: "it was replaced by a tensor of another shape after AccoOptimizer was built",
    Problem.UNFROZEN: (
        "it had requires_grad=False when AccoOptimizer was built, so the optimizer holds no state for it; build the "
        "optimizer with every parameter that will ever train trainable (freezing later is fine: a parameter that "
        "gets no gradient is left untouched)"
    ),
}


@dataclass(frozen=True)
class LocalReport:
    """What one rank brings to a round."""

    count: int  # step() calls whose gradients this rank contributes
    finishing: bool  # the round was launched from finish()
    has_gradient: Sequence[bool]  # per trainable parameter: a gradient arrived since the last launch
    written: bool  # the model's parameters were written outside the optimizer since the last round
    problem: Problem = Problem.NONE
    problem_param: int = -1  # index of the offending parameter (trainable, or among the frozen ones for UNFROZEN)
    hyperparameters: Sequence[float] = ()


@dataclass(frozen=True)
class Agreed:
    """The summed reports: identical on every rank."""

    global_count: int
    finishing_ranks: int
    has_gradient: Optional[tuple[bool, ...]]  # None: every parameter received a gradient somewhere
    written_ranks: tuple[int, ...]
    problems: tuple[tuple[int, Problem, int], ...]  # (rank, problem, parameter index)
    hyperparameters: tuple[float, ...]  # rank 0's
    hyperparameters_differ: bool  # some rank's own values were not rank 0's


class AgreementCodec:
    """The layout of the agreement vector: [count, finishing | per-rank slots | gradients | rank 0's
    hyper-parameters | everyone's | everyone's squared]."""

    SLOT = 3  # written, problem, parameter index + 1

    def __init__(self, world_size: int, num_params: int, num_hyperparameters: int) -> None:
        self.world_size = world_size
        self.num_params = num_params
        self.num_hyperparameters = num_hyperparameters
        self._slots = 2
        self._gradients = self._slots + self.SLOT * world_size
        self._rank0 = self._gradients + num_params
        self._everyone = self._rank0 + num_hyperparameters
        self._squares = self._everyone + num_hyperparameters
        self.size = self._squares + num_hyperparameters

    def encode(self, report: LocalReport, rank: int) -> list[float]:
        if len(report.has_gradient) != self.num_params or len(report.hyperparameters) != self.num_hyperparameters:
            raise ValueError("a report does not match the agreement's layout")
        values = [0.0] * self.size
        values[0] = float(report.count)
        values[1] = 1.0 if report.finishing else 0.0
        slot = self._slots + self.SLOT * rank
        values[slot] = 1.0 if report.written else 0.0
        values[slot + 1] = float(int(report.problem))
        values[slot + 2] = float(report.problem_param + 1) if report.problem else 0.0
        values[self._gradients : self._rank0] = [1.0 if g else 0.0 for g in report.has_gradient]
        if rank == 0:
            values[self._rank0 : self._everyone] = [float(v) for v in report.hyperparameters]
        values[self._everyone : self._squares] = [float(v) for v in report.hyperparameters]
        values[self._squares :] = [float(v) * float(v) for v in report.hyperparameters]
        return values

    def decode(self, summed: Sequence[float]) -> Agreed:
        if len(summed) != self.size:
            raise ValueError(f"an agreement vector of {len(summed)} values, expected {self.size}")
        written, problems = [], []
        for rank in range(self.world_size):
            slot = self._slots + self.SLOT * rank
            if summed[slot] > 0:
                written.append(rank)
            if summed[slot + 1] > 0:
                problems.append((rank, Problem(int(round(summed[slot + 1]))), int(round(summed[slot + 2])) - 1))
        gradients = tuple(v > 0 for v in summed[self._gradients : self._rank0])
        rank0 = tuple(summed[self._rank0 : self._everyone])
        everyone, squares = summed[self._everyone : self._squares], summed[self._squares :]
        differ = any(
            not _same(total, self.world_size * mine) or _spread(total, square, mine, self.world_size) > 0
            for total, square, mine in zip(everyone, squares, rank0)
        )
        return Agreed(
            global_count=int(round(summed[0])),
            finishing_ranks=int(round(summed[1])),
            has_gradient=None if all(gradients) else gradients,
            written_ranks=tuple(written),
            problems=tuple(problems),
            hyperparameters=rank0,
            hyperparameters_differ=differ,
        )

    def written_slots(self) -> slice:
        """Where the ranks' "written" flags lie (a strided slice: no index tensor on the device)."""
        return slice(self._slots, self._gradients, self.SLOT)

    def problem_slots(self) -> slice:
        """Where the ranks' problem codes lie (non-zero: a parameter that rank can no longer train)."""
        return slice(self._slots + 1, self._gradients, self.SLOT)

    def gradient_slots(self) -> slice:
        """Where the per-parameter gradient counts lie (non-zero: some rank had a gradient)."""
        return slice(self._gradients, self._rank0)

    def hyperparameter_range(self) -> tuple[slice, slice, slice]:
        """Where rank 0's values, the sum of everyone's and the sum of their squares lie (for a check on the device)."""
        return slice(self._rank0, self._everyone), slice(self._everyone, self._squares), slice(self._squares, self.size)


SPREAD_TOLERANCE = 1e-12  # of the sum of squares: float64 rounding is ~1e-16 of it


def _spread(total: float, square: float, mine: float, world: int) -> float:
    """Σ(xᵣ − x₀)² from the sums (0 when every rank holds rank 0's value), less the rounding allowance;
    > 0 means some rank's value differs. NaN (a value outside the schema) compares as not differing here;
    ``_same`` handles it."""
    spread = square - 2.0 * mine * total + world * mine * mine
    if math.isnan(spread):
        return 0.0
    return spread - SPREAD_TOLERANCE * abs(square)  # relative: small values (a 3e-5 rate) are compared as closely


def _same(total: float, expected: float) -> bool:
    if math.isnan(total) or math.isnan(expected):
        return math.isnan(total) and math.isnan(expected)
    return abs(total - expected) <= 1e-9 * max(1.0, abs(expected))


class HyperparameterCodec:
    """Numeric group settings (lr, betas, weight decay, ...) as a fixed-length float vector.

    The schema is taken at construction (identical on every rank: checked then). Values that no
    longer fit it (a setting that became a tensor or changed length) travel as NaN and stay
    rank-local; keys added after construction stay rank-local too.
    """

    def __init__(self, groups: Sequence[dict[str, Any]]) -> None:
        self.schema: list[tuple[int, str, Optional[int], type]] = []
        for index, group in enumerate(groups):
            for key in sorted(k for k in group if k != "params"):
                kind = _numeric_kind(group[key])
                if kind is None:
                    continue
                length = len(group[key]) if isinstance(group[key], (tuple, list)) else None
                self.schema.append((index, key, length, kind))
        self.size = sum(1 if length is None else length for _, _, length, _ in self.schema)

    def encode(self, groups: Sequence[dict[str, Any]]) -> list[float]:
        values: list[float] = []
        for index, key, length, _ in self.schema:
            value = groups[index].get(key) if index < len(groups) else None
            width = 1 if length is None else length
            if length is None and _numeric_kind(value) in (bool, int, float) and not isinstance(value, (tuple, list)):
                values.append(float(value))
            elif length is not None and isinstance(value, (tuple, list)) and len(value) == length and _numeric_kind(value):
                values.extend(float(v) for v in value)
            else:
                values.extend([math.nan] * width)
        return values

    def decode(self, values: Sequence[float], groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` (this rank's settings) with every shared value replaced by ``values``."""
        result = [dict(group) for group in groups]
        cursor = 0
        for index, key, length, kind in self.schema:
            width = 1 if length is None else length
            piece = values[cursor : cursor + width]
            cursor += width
            if any(math.isnan(v) for v in piece):
                continue
            if length is None:
                result[index][key] = _as(kind, piece[0])
            else:
                original = groups[index].get(key)
                kinds = [_numeric_kind(v) for v in original] if isinstance(original, (tuple, list)) else [kind] * width
                decoded = [_as(k or float, v) for k, v in zip(kinds, piece)]
                result[index][key] = type(original)(decoded) if isinstance(original, (tuple, list)) else tuple(decoded)
        return result


def _numeric_kind(value: Any) -> Optional[type]:
    """bool, int or float for a plain number (or a tuple/list of them: the kind of its first); else None."""
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    if isinstance(value, (tuple, list)) and value and all(_numeric_kind(v) in (bool, int, float) for v in value):
        return _numeric_kind(value[0])
    return None


def _as(kind: type, value: float) -> Any:
    if kind is bool:
        return value != 0.0
    if kind is int:
        return int(round(value))
    return value
