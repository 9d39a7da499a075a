"""The round pipeline as a pure state machine: which round comes next, when to wait, what it counts.

Nothing here touches tensors or process groups. The optimizer facade asks this object what to
do at each ``step()`` / ``finish()`` and carries it out; the tests drive it directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(str, enum.Enum):
    ACCO = "acco"  # estimate round, then commit round, per update (two step() calls per update)
    DPU = "dpu"  # every round commits, on gradients one round stale
    SYNC = "sync"  # plain ZeRO-1: launch and wait at once


class RoundKind(str, enum.Enum):
    ESTIMATE = "estimate"  # tentative update; committed state is restored afterwards
    COMMIT = "commit"  # real update of master weights and optimizer state


def round_kind(mode: Mode, round_index: int) -> RoundKind:
    if round_index < 0:
        raise ValueError(f"round index must be >= 0, got {round_index}")
    if Mode(mode) is Mode.ACCO and round_index % 2 == 0:
        return RoundKind.ESTIMATE
    return RoundKind.COMMIT


@dataclass(frozen=True)
class Launch:
    """One round to start: its index and kind, and how many step() calls fed its gradients here."""

    index: int
    kind: RoundKind
    local_count: int
    # A commit that follows an estimate also uses the estimate's (already reduced) gradients.
    adds_estimate_gradients: bool


class Schedule:
    """Per-rank bookkeeping of rounds. Every rank runs the same sequence of rounds."""

    def __init__(self, mode: Mode | str, blocking: bool = True) -> None:
        self.mode = Mode(mode)
        self.blocking = bool(blocking)
        self.rounds_launched = 0
        self.rounds_installed = 0
        self.pending_calls = 0  # step() calls whose gradients are not yet in a launched round

    @property
    def in_flight(self) -> bool:
        return self.rounds_installed < self.rounds_launched

    @property
    def next_kind(self) -> RoundKind:
        return round_kind(self.mode, self.rounds_launched)

    @property
    def last_launched_kind(self) -> RoundKind | None:
        return round_kind(self.mode, self.rounds_launched - 1) if self.rounds_launched else None

    @property
    def has_uncommitted_estimate(self) -> bool:
        """The last launched round was an estimate: its gradients still await a commit."""
        return self.last_launched_kind is RoundKind.ESTIMATE

    def record_call(self) -> None:
        self.pending_calls += 1

    def should_launch(self, round_done: bool) -> bool:
        """At a step() call: launch now (after waiting for the round in flight), or keep accumulating.

        Only the non-blocking mode keeps accumulating, and only while a round is still running.
        """
        return self.blocking or not self.in_flight or round_done

    def launch(self, *, contributes: bool = True) -> Launch:
        """Start the next round with the pending calls (or none, for a drain round)."""
        if self.in_flight:
            raise RuntimeError("a round is still in flight; install it before launching the next")
        kind = self.next_kind
        launch = Launch(
            index=self.rounds_launched,
            kind=kind,
            local_count=self.pending_calls if contributes else 0,
            adds_estimate_gradients=kind is RoundKind.COMMIT and self.has_uncommitted_estimate,
        )
        if contributes:
            self.pending_calls = 0
        self.rounds_launched += 1
        return launch

    def installed(self) -> None:
        if not self.in_flight:
            raise RuntimeError("no round in flight to install")
        self.rounds_installed += 1

    @property
    def waits_after_launch(self) -> bool:
        return self.mode is Mode.SYNC
