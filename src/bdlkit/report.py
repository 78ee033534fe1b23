"""Render ``OUT/report.md`` from the ``OUT/<method>/result.json`` files of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_report", "markdown_table"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 2.5]]))
        | a | b |
        |---|---|
        | 1 | 2.5 |
    """
    if any(len(r) != len(columns) for r in rows):
        raise ValueError("every row must have one value per column")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _section(name: str, result: dict[str, Any]) -> list[str]:
    lines = [f"## {result.get('title', name)}", ""]
    meta = [f"recipe `{name}`"]
    if "wall_time_s" in result:
        meta.append(f"wall time {result['wall_time_s']:.0f} s")
    if "config" in result and "quick" in result["config"]:
        meta.append("quick mode" if result["config"]["quick"] else "full mode")
    env = result.get("environment", {})
    if "threads" in env and "torch" in env:
        meta.append(f"torch {env['torch']}, {env['threads']} thread(s)")
    lines += ["_" + ", ".join(meta) + "_", ""]
    if result.get("error"):
        lines += [f"**Failed:** `{result['error']}`", ""]
    for table in result.get("tables", []):
        lines += [f"**{table['title']}**", "", markdown_table(table["columns"], table["rows"]), ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    if result.get("notes"):
        lines.append("")
    for fig in result.get("figures", []):
        lines += [f"![{fig.get('caption', '')}]({name}/{fig['path']})",
                  f"*{fig.get('caption', '')}*", ""]
    return lines


def write_report(out_dir: str | Path) -> Path:
    """Collect every ``<out_dir>/<method>/result.json`` into ``<out_dir>/report.md``.

    Example:
        >>> write_report("runs/demo")  # doctest: +SKIP
        PosixPath('runs/demo/report.md')
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"out_dir {str(out_dir)!r} does not exist")
    from .experiments import RECIPES

    found = {p.parent.name: p for p in out_dir.glob("*/result.json")}
    if not found:
        raise FileNotFoundError(f"no */result.json under {str(out_dir)!r}; run `bdlkit run` first")
    order = [n for n in RECIPES if n in found] + sorted(set(found) - set(RECIPES))
    lines = ["# bdlkit report", "", f"Methods: {', '.join(order)}", ""]
    for name in order:
        lines += _section(name, json.loads(found[name].read_text()))
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
