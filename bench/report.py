"""Render a results file as the Markdown table BENCHMARKS.md keeps.

python -m bench.report [bench/results/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .env import RESULTS_DIR


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def runs(values: list[Any]) -> str:
    if values and all(isinstance(v, int | float) for v in values):
        return ", ".join(fmt(float(v)) for v in values)
    return f"{len(values)} samples" if values else "-"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['variant']} run, {report['started_at']}, {report['duration_s'] / 60:.0f} min",
        "",
        "| benchmark | value | baseline | ratio | target | met | runs / baseline runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in report["benchmarks"]:
        value = f"{fmt(entry['value'])} {entry['unit']}" if entry["value"] is not None else "-"
        baseline = (
            f"{fmt(entry['baseline'])} {entry['baseline_unit']}"
            if entry["baseline"] is not None
            else "-"
        )
        status = entry["status"]
        if status.startswith("measured (lower bound"):
            value, status = f">= {value}", " (lower bound)"
        else:
            status = "" if status == "measured" else f" ({status})"
        ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:,.3f}"
        lines.append(
            f"| `{entry['name']}` | {value}{status} | {baseline} | {ratio} "
            f"| {entry['target']} | {fmt(entry['met'])} "
            f"| {runs(entry['runs'])} / {runs(entry['baseline_runs'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "latest.json"
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
