"""Per-class score tables (per-class IoU): rows with class names, CSV and JSON files."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor


def table_rows(values: Tensor, class_names: Sequence[str] | None = None) -> list[list]:
    """``[[index, name, value], ...]``; names default to the index, NaN (class absent) -> None."""
    rows = []
    for index, value in enumerate(values.tolist()):
        name = class_names[index] if class_names and index < len(class_names) else str(index)
        rows.append([index, name, None if value != value else float(value)])
    return rows


def named_tables(
    tables: Mapping[str, Tensor], class_names: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[list]]:
    """Rows of every table ``<task>/<score>``, with the task's class names."""
    class_names = class_names or {}
    return {
        key: table_rows(values, class_names.get(key.split("/")[0]))
        for key, values in tables.items()
    }


def write_tables(
    directory: str | Path,
    tables: Mapping[str, Tensor],
    class_names: Mapping[str, Sequence[str]] | None = None,
    prefix: str = "",
) -> list[Path]:
    """Write ``per_class.csv`` (columns key, class_index, class, value) and ``per_class.json``
    (``{"<prefix><task>/<score>": {class: value}}``) into ``directory``; returns the paths."""
    if not tables:
        return []
    directory = Path(directory)
    rows = named_tables(tables, class_names)
    csv_path, json_path = directory / "per_class.csv", directory / "per_class.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "class_index", "class", "value"])
        for key, key_rows in rows.items():
            writer.writerows([f"{prefix}{key}", *row] for row in key_rows)
    as_dict = {f"{prefix}{key}": {name: value for _, name, value in r} for key, r in rows.items()}
    json_path.write_text(json.dumps(as_dict, indent=2))
    return [csv_path, json_path]
