"""The batch rule of mode ``acco`` (one update = two ``step()`` calls): a loop written for DDP, switched by the
README's diff alone, makes half the updates it meant. AccoOptimizer warns once, at the first ``step()``, through
the ``acco`` logger, unless the loop says it applies the rule (``batch_rule_applied=True``). AccoTrainer and the
examples apply it (tests/test_hf_trainer.py, tests/test_examples.py); accelerate's wrapper is refused there.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer

TIMEOUT = 90
CALLS = 6
SILENCER = "batch_rule_applied=True"  # the warning names it; nothing else in acco logs it


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if SILENCER in record.getMessage():
            self.messages.append(record.levelname)


def readme_loop(rank: int, world_size: int, mode: str, applied: str) -> dict:
    """DDP + AdamW, then the README's diff of the same loop: the count of updates each made, and the
    batch-rule warnings seen after the first call and at the end."""
    handler = Collect()
    logging.getLogger("acco").addHandler(handler)
    try:
        reference = DistributedDataParallel(workloads.make_model())
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
        model = workloads.make_model()
        opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), mode=mode,
                            **({"batch_rule_applied": True} if applied == "keyword" else {}))
        if applied == "attribute":
            opt.batch_rule_applied = True
        after_first = None
        for call in range(CALLS):
            x, y = workloads.batch(rank, call)
            for net, optimizer in ((reference, ref_opt), (model, opt)):
                workloads.loss_fn(net, x, y).backward()
                optimizer.step()
                optimizer.zero_grad()
            if call == 0:
                after_first = list(handler.messages)
        opt.finish()
        result = {
            "after_first_call": after_first, "at_end": list(handler.messages),
            "ddp_updates": int(ref_opt.state[next(iter(reference.parameters()))]["step"]), "acco_updates": opt.num_updates,
        }
        opt.close()
        return result
    finally:
        logging.getLogger("acco").removeHandler(handler)


@pytest.mark.parametrize("mode, applied", [("acco", "no"), ("acco", "keyword"), ("acco", "attribute"), ("sync", "no")])
def test_unchanged_loop_in_acco_mode_warns_once_with_the_batch_rule(run_distributed, mode, applied):
    """The same six calls make six DDP + AdamW updates and three acco-mode ones: the first step() says so, once,
    on every rank (a logger warning); never once the loop says it applies the rule, never in mode sync."""
    results = run_distributed(2, readme_loop, mode, applied, timeout=TIMEOUT)
    for r in results:
        assert r["ddp_updates"] == CALLS, r
        if mode == "sync":
            assert r["acco_updates"] == CALLS and r["at_end"] == [], r
            continue
        assert r["acco_updates"] == CALLS // 2, r
        expected = ["WARNING"] if applied == "no" else []
        assert r["after_first_call"] == expected and r["at_end"] == expected, r


def test_the_batch_rule_says_what_to_do():
    """One sentence: the rule, the arithmetic, where the README explains it, and how to silence it."""
    from acco.validation import BATCH_RULE

    for words in ("two step() calls", "half", "scheduler", "Batch size and schedule length", "batch_rule_applied=True"):
        assert words in BATCH_RULE, words
