"""Checks of balancer hyper-parameters, shared by the constructors and the config check.

A balancer class may define ``config_problems(config, tasks) -> list[str]``: one line per bad
key of its config node (``balancer.<key>: <value>; expected ...``), so that a mistake is
reported before anything is built; its constructor raises the first of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number_problems(
    config: Mapping[str, Any],
    prefix: str,
    rules: Iterable[tuple[str, Any, Callable[[float], bool], str]],
) -> list[str]:
    """Problems for (key, default, test, expected) rules: the value must be a number passing
    the test."""
    problems = []
    for key, default, test, expected in rules:
        value = config.get(key, default)
        if not (_is_number(value) and test(value)):
            problems.append(f"{prefix}.{key}: {value!r}; expected {expected}")
    return problems


def integer_problem(
    config: Mapping[str, Any], key: str, default: Any, low: int, high: int, expected: str
) -> list[str]:
    value = config.get(key, default)
    if _is_integer(value) and low <= value <= high:
        return []
    return [f"balancer.{key}: {value!r}; expected {expected}"]


def raise_first(problems: list[str]) -> None:
    """Raise the first problem as a ValueError (constructors)."""
    if problems:
        raise ValueError(problems[0])
