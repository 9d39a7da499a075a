"""The examples run end to end under torchrun (2 CPU ranks, gloo, tiny configs, seconds each).

train_gpt.py: loss goes down; its ACCO and ZeRO-1 branches reach the same validation loss within a
stated tolerance on the same budget; a checkpoint round-trips (stop, resume, continue: the same losses
as a run that was never stopped); under torchrun --max-restarts, workers killed mid-run and mid-save are
restarted by one command line and end on the uninterrupted run's exact state. hf_causal_lm.py: loss goes down and a saved run resumes where it left.
examples/README.md: its AdamW -> ACCO diff is made of the script's own lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import launch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 240  # per torchrun; a hang fails the test instead of the suite

# A tiny GPT that still learns something in 40 updates: 16 sequences of 64 bytes per rank per update.
GPT_CONFIG = [
    "--updates", "40", "--warmup", "5", "--eval-every", "20", "--ckpt-every", "20",
    "--n-layer", "1", "--n-embd", "64", "--block-size", "64", "--batch-size", "16",
    "--max-bytes", "400000", "--eval-batches", "2",
]
# ACCO vs ZeRO-1 after 40 updates of the same samples, from 5.44 nats/byte: measured 2.998 vs 2.984 (seed 1337),
# ACCO 0.03 behind with other seeds. The test asks for 0.1 nats/byte, while both fall by more than 2.
ACCO_VS_ZERO1_TOLERANCE = 0.1


def torchrun(script: str, *args: str, cwd: Path, max_restarts: int = 0, env: dict[str, str] | None = None) -> str:
    done = launch.torchrun(EXAMPLES / script, *args, cwd=cwd, timeout=TIMEOUT_S, max_restarts=max_restarts, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The scripts apply mode acco's batch rule themselves (batch_rule_applied=True): no warning about it.
    assert "batch_rule_applied" not in done.stdout + done.stderr, done.stderr[-3000:]
    return done.stdout


def val_losses(stdout: str) -> dict[int, float]:
    """{update: validation loss} from the lines 'update N | ... val loss X'."""
    found = re.findall(r"^update (\d+) \|.*val loss (\d+\.\d+)", stdout, flags=re.MULTILINE)
    return {int(u): float(v) for u, v in found}


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """ACCO uninterrupted; ZeRO-1 on the same budget; ACCO stopped at update 20 and resumed to 40."""
    tmp = tmp_path_factory.mktemp("train_gpt")
    runs = {
        "acco": torchrun("train_gpt.py", *GPT_CONFIG, "--optimizer", "acco", "--ckpt", str(tmp / "acco.pt"),
                         "--plot", str(tmp / "plots" / "loss.png"), cwd=tmp),  # a folder that does not exist yet
        "zero1": torchrun("train_gpt.py", *GPT_CONFIG, "--optimizer", "zero1", "--plot", "", cwd=tmp),
        "stopped": torchrun("train_gpt.py", *GPT_CONFIG, "--ckpt", str(tmp / "split.pt"), "--stop-after", "20",
                            "--plot", "", cwd=tmp),
    }
    runs["resumed"] = torchrun("train_gpt.py", *GPT_CONFIG, "--ckpt", str(tmp / "split.pt"), "--resume", "--plot", "", cwd=tmp)
    return tmp, runs


def test_train_gpt_acco_loss_decreases(gpt_runs):
    tmp, runs = gpt_runs
    losses = val_losses(runs["acco"])
    assert sorted(losses) == [0, 20, 40], runs["acco"]
    assert losses[20] < losses[0] - 1.0 and losses[40] < losses[20], losses
    assert (tmp / "plots" / "loss.png").stat().st_size > 0  # --plot made its folder
    assert (tmp / "acco.pt").stat().st_size > 0


def test_train_gpt_acco_matches_zero1_on_the_same_budget(gpt_runs):
    _, runs = gpt_runs
    acco, zero1 = val_losses(runs["acco"]), val_losses(runs["zero1"])
    assert "32 seq/update" in runs["acco"] and "32 seq/update" in runs["zero1"]  # 2 ranks x 16: equal tokens per update
    assert "2 step() call(s) of 8 seq" in runs["acco"] and "1 step() call(s) of 16 seq" in runs["zero1"]
    # Each validation line shows updates against step() calls: ACCO makes two calls per update.
    assert "update 40 | 80 step() calls |" in runs["acco"] and "update 40 | 40 step() calls |" in runs["zero1"]
    assert acco[0] == pytest.approx(zero1[0], abs=1e-4)  # the same initial model and validation batches
    assert zero1[40] < zero1[0] - 2.0 and acco[40] < acco[0] - 2.0, (acco, zero1)
    print(f"validation loss after 40 updates: acco {acco[40]:.4f}, zero1 {zero1[40]:.4f}")
    assert abs(acco[40] - zero1[40]) < ACCO_VS_ZERO1_TOLERANCE, (acco, zero1)


def test_train_gpt_checkpoint_round_trip(gpt_runs):
    """Stopping at update 20 and resuming from the checkpoint gives the run that never stopped (which
    also saved at update 20: saving commits the update in flight, in both runs)."""
    _, runs = gpt_runs
    whole, stopped, resumed = val_losses(runs["acco"]), val_losses(runs["stopped"]), val_losses(runs["resumed"])
    assert sorted(stopped) == [0, 20] and sorted(resumed) == [40], (stopped, resumed)
    assert "resumed from" in runs["resumed"] and "at update 20" in runs["resumed"]
    assert stopped[20] == pytest.approx(whole[20], abs=2e-6)
    assert resumed[40] == pytest.approx(whole[40], abs=2e-6)


def same(a, b) -> bool:
    """Exactly equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_train_gpt_restarts_after_kills_and_ends_as_the_uninterrupted_run(gpt_runs, tmp_path):
    """One command line under torchrun --max-restarts 2, with --resume and no checkpoint yet: the first attempt
    starts fresh and rank 1 is SIGKILLed mid-update 31 (its estimate round in flight; the last checkpoint is
    update 20's); the second attempt resumes from update 20 and rank 0 is SIGKILLed while saving update 40 (the
    new file written to .tmp, not yet renamed); the third resumes from update 20 again and runs to the end. Its
    final checkpoint (model, optimizer, scheduler, loss history) is the uninterrupted run's, bit for bit."""
    tmp, runs = gpt_runs
    path = tmp_path / "preempted.pt"
    out = torchrun("train_gpt.py", *GPT_CONFIG, "--ckpt", str(path), "--resume", "--plot", "", cwd=tmp_path, max_restarts=2,
                   env={"ACCO_EXAMPLE_KILL": "1:call:61,0:save:40"})
    assert out.count("starting fresh") == 1 and out.count(f"resumed from {path} at update 20") == 2, out[-3000:]
    assert not path.with_name(path.name + ".tmp").exists()  # the last save renamed its .tmp
    preempted = torch.load(path, weights_only=True)
    uninterrupted = torch.load(tmp / "acco.pt", weights_only=True)
    assert preempted["update"] == 40 and sorted(preempted) == sorted(uninterrupted)
    for key in sorted(set(uninterrupted) - {"args"}):
        assert same(preempted[key], uninterrupted[key]), key
    assert val_losses(out)[40] == val_losses(runs["acco"])[40]


def test_train_gpt_dcp_checkpoints_survive_a_kill_during_a_save(gpt_runs, tmp_path):
    """--ckpt-format dcp under torchrun --max-restarts 1, one command line with --resume: the first attempt starts
    fresh, saves update 20 (every rank writes its own shard of PATH/update-20, then PATH/latest names it) and rank 0
    is SIGKILLed after writing update 40's folder, before `latest` names it; the second attempt resumes from update
    20 and runs to the end. Validation losses are the uninterrupted file-format run's (which saved at update 20
    too: a save commits the update in flight, in both formats)."""
    tmp, runs = gpt_runs
    path = tmp_path / "sharded"
    out = torchrun("train_gpt.py", *GPT_CONFIG, "--ckpt", str(path), "--ckpt-format", "dcp", "--resume", "--plot", "",
                   cwd=tmp_path, max_restarts=1, env={"ACCO_EXAMPLE_KILL": "0:save:40"})
    assert out.count("starting fresh") == 1 and out.count(f"resumed from {path / 'update-20'} at update 20") == 1, out[-3000:]
    assert (path / "latest").read_text() == "update-40"
    assert sorted(p.name for p in path.iterdir()) == ["latest", "update-40"]  # update 20's removed once 40's was named
    whole, resumed = val_losses(runs["acco"]), val_losses(out)
    assert resumed[20] == pytest.approx(whole[20], abs=2e-6) and resumed[40] == pytest.approx(whole[40], abs=2e-6)


def test_train_gpt_acco_muon_trains_with_per_group_optimizers(tmp_path):
    """Muon on the hidden matrices, AdamW on the rest, in one AccoOptimizer: the loss falls as far as
    with AdamW alone on the same budget (measured 2.998 at update 40, as acco's 2.998), and the
    portable checkpoint of both groups' state is written."""
    out = torchrun("train_gpt.py", *GPT_CONFIG, "--optimizer", "acco-muon", "--ckpt", str(tmp_path / "muon.pt"), "--plot", "",
                   cwd=tmp_path)
    losses = val_losses(out)
    assert sorted(losses) == [0, 20, 40], out
    assert "acco-muon" in out and "2 step() call(s) of 8 seq" in out
    assert losses[20] < losses[0] - 1.0 and losses[40] < losses[20], losses
    assert losses[40] < losses[0] - 2.0, losses
    assert (tmp_path / "muon.pt").stat().st_size > 0


def test_hf_causal_lm_trains_saves_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    config = [
        "--updates", "16", "--warmup", "2", "--eval-every", "8", "--save-every", "8", "--hidden-size", "32",
        "--layers", "1", "--batch-size", "8", "--seq-len", "64", "--max-bytes", "300000", "--eval-batches", "2",
        "--dtype", "bf16", "--out-dir", str(tmp_path / "out"),  # pure bf16 parameters, fp32 master shards
    ]
    first = val_losses(torchrun("hf_causal_lm.py", *config, "--stop-after", "8", cwd=tmp_path))
    assert {"config.json", "optimizer.pt", "trainer_state.pt"} <= {p.name for p in (tmp_path / "out").iterdir()}
    second_out = torchrun("hf_causal_lm.py", *config, "--resume", cwd=tmp_path)
    second = val_losses(second_out)
    assert "resumed from" in second_out
    assert sorted(first) == [0, 8] and sorted(second) == [8, 16], (first, second)
    assert first[8] < first[0] - 0.3, first
    assert second[8] == pytest.approx(first[8], abs=1e-6)  # the saved model and optimizer came back as they were
    assert second[16] < second[8], second


def test_readme_diff_is_made_of_the_scripts_lines():
    """The README's AdamW -> ACCO diff is the script's own switch: every removed line runs in train_gpt.py's
    adamw-ddp branch and not in its acco branch, every added line runs with --optimizer acco (and, unless it
    is an import, not with adamw-ddp), and the lines come in the script's order. Branches are read with
    ``ast``: the conditions of the ``if`` statements around a line are evaluated for each optimizer."""
    import ast
    import types

    readme = (EXAMPLES / "README.md").read_text()
    diff = re.search(r"```diff\n(.*?)```", readme, flags=re.DOTALL)
    assert diff, "examples/README.md has no diff block"
    source = (EXAMPLES / "train_gpt.py").read_text()
    lines = [line.strip() for line in source.splitlines()]
    tree = ast.parse(source)
    parents: dict[int, list[tuple[ast.If, bool]]] = {}  # line -> enclosing (if, in its body?) from outer to inner

    def visit(node: ast.AST, path: list[tuple[ast.If, bool]]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If):
                for stmt in child.body:
                    visit_stmt(stmt, path + [(child, True)])
                for stmt in child.orelse:
                    visit_stmt(stmt, path + [(child, False)])
            elif isinstance(child, ast.stmt):
                visit_stmt(child, path)

    def visit_stmt(stmt: ast.stmt, path: list[tuple[ast.If, bool]]) -> None:
        if isinstance(stmt, ast.If):
            visit(ast.Module(body=[stmt], type_ignores=[]), path)
            return
        for number in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1):
            parents[number] = path  # nested statements, visited next, overwrite with their deeper path
        visit(stmt, path)

    visit(tree, [])

    class Anything(dict):
        """Names the conditions use besides the optimizer's (update numbers, ...): 1, so that a test like
        ``update == end_update and uses_acco`` turns on the optimizer alone."""

        def __missing__(self, name: str) -> int:
            return 1

    class Args(types.SimpleNamespace):
        def __getattr__(self, name: str) -> int:
            return 1

    def runs_with(number: int, optimizer: str) -> bool:
        names = Anything(args=Args(optimizer=optimizer, dtype="fp32", plot=""), uses_acco=optimizer in ("acco", "dpu", "acco-muon"))
        for node, in_body in parents.get(number, []):
            taken = bool(eval(compile(ast.Expression(node.test), "<test>", "eval"), {}, names))
            if taken != in_body:
                return False
        return True

    changed = [line for line in diff.group(1).splitlines() if line[:1] in "+-" and line[1:].strip()]
    assert changed
    for side in "-+":  # the old script (context and removed lines), then the new one (context and added): each in order
        previous = 0
        for line in diff.group(1).splitlines():
            if line[:1] not in (" ", side):
                continue
            text = line[1:].strip()
            if not text or text.startswith("..."):
                continue
            numbers = [i + 1 for i, candidate in enumerate(lines) if candidate == text]
            assert numbers, f"not a line of train_gpt.py: {line}"
            if line[:1] == "-":
                numbers = [n for n in numbers if runs_with(n, "adamw-ddp") and not runs_with(n, "acco")]
                assert numbers, f"removed line does not run in the adamw-ddp branch only: {line}"
            elif line[:1] == "+":
                numbers = [n for n in numbers if runs_with(n, "acco") and (text.startswith("from ") or not runs_with(n, "adamw-ddp"))]
                assert numbers, f"added line does not run in the acco branch only: {line}"
            later = [n for n in numbers if n >= previous]
            assert later, f"out of the script's order: {line}"
            previous = min(later)
