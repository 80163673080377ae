"""A benchmark's result: a titled markdown table with notes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Table:
    """Rows of cells under a header; ``notes`` are printed under the table."""

    title: str
    header: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> list[object]:
        """The cells of one column, by header name."""
        index = list(self.header).index(name)
        return [row[index] for row in self.rows]

    def markdown(self) -> str:
        def cell(value: object) -> str:
            if isinstance(value, float):
                if abs(value) >= 100:
                    return f"{value:,.0f}"
                return f"{value:.2f}" if abs(value) >= 1 else f"{value:#.3g}"
            if isinstance(value, int) and not isinstance(value, bool):
                return f"{value:,}"
            return str(value)

        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        lines += ["", *self.notes] if self.notes else []
        return "\n".join(lines) + "\n"
