"""Writing a report: ``<stem>.json`` (``config`` + ``results``), ``<stem>.md`` (a table) and
``<stem>.png`` (a plot; matplotlib is imported only here, lazily, so runs without it still work)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

logger = logging.getLogger("acco.benchmarks")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def environment() -> dict[str, Any]:
    """What a reader needs to judge or rerun the numbers."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def config(name: str, args: Any, argv: Sequence[str], parameters: Optional[int], **notes: Any) -> dict[str, Any]:
    """A report's ``config``: the command line that reruns it, every option, the model and notes."""
    from .gpt import config_dict, model_config

    return {
        "report": name, "argv": ["python", "-m", f"benchmarks.{name}", *argv], **vars(args), "json": str(args.json),
        "model_config": config_dict(model_config(args.model)), "parameters": parameters, **notes,
        "environment": environment(),
    }


def where(part: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The setting (world, bandwidth, network) of one launch, to put beside each of its rows."""
    return {key: part[key] for key in ("world", "bandwidth", "bandwidth_bps", "network")} | extra


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def mib(nbytes: Optional[float]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


def write(
    json_path: Path,
    report: dict[str, Any],
    markdown: str,
    plot: Optional[Callable[[Any, dict[str, Any]], None]] = None,
    make_plot: bool = True,
) -> list[Path]:
    """Write the JSON, the markdown beside it, and the PNG if asked and matplotlib is there."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown.rstrip() + "\n")
    written = [json_path, md_path]
    if plot is not None and make_plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib is not installed: no plot (pip install -e '.[bench]')")
            return written
        png_path = json_path.with_suffix(".png")
        plot(plt, report)
        plt.tight_layout()
        plt.savefig(png_path, dpi=120)
        plt.close("all")
        written.append(png_path)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return written
