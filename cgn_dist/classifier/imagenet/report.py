"""Evaluation tables: our numbers beside the paper's, as json + csv + txt + a png table.

A table is a title, column names, rows (dicts keyed by column; None = not measured / not published)
and notes. Files are written to temporary names and renamed, so a table on disk is always complete.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

MISSING = "–"


def fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, float):
        return format(round(v, digits), "g")
    return str(v)


def format_table(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]],
                 notes: Sequence[str] = ()) -> str:
    cells = [list(columns)] + [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    out = [title]
    for k, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def table_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


def plot_table(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               notes: Sequence[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = [[fmt(r.get(c)) for c in columns] for r in rows] or [[MISSING] * len(columns)]
    fig_h = 0.6 + 0.3 * (len(text) + 1) + 0.18 * len(notes)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.35 * len(columns)), fig_h))
    ax.axis("off")
    tab = ax.table(cellText=text, colLabels=list(columns), loc="upper center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.25)
    tab.auto_set_column_width(list(range(len(columns))))
    for (r, _), cell in tab.get_celld().items():
        if r == 0:
            cell.set_facecolor("#dddddd")
    ax.set_title(title, fontsize=10)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6.5, va="bottom", wrap=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_table(out_dir: str | os.PathLike, name: str, title: str, columns: Sequence[str],
               rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = (), details: Mapping[str, Any] | None = None,
               png: bool = True) -> dict[str, Path]:
    """Write ``<name>.json`` (table + details), ``.csv``, ``.txt`` and ``.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("json", "csv", "txt", "png")}
    doc = {"title": title, "columns": list(columns), "rows": [dict(r) for r in rows], "notes": list(notes),
           **({"details": dict(details)} if details else {})}
    _write_atomic(paths["txt"], format_table(title, columns, rows, notes) + "\n")
    _write_atomic(paths["csv"], table_csv(columns, rows))
    if png:
        tmp = paths["png"].with_name(paths["png"].name + ".tmp.png")
        plot_table(title, columns, rows, tmp, notes)
        tmp.replace(paths["png"])
    else:
        paths.pop("png")
    _write_atomic(paths["json"], json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n")
    return paths


def pct(hits: int, total: int) -> float | None:
    return None if total == 0 else 100.0 * hits / total


__all__ = ["save_table", "format_table", "table_csv", "plot_table", "fmt", "pct", "MISSING"]
