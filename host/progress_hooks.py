"""Observers of progress updates, for tests and the headless runner's log (both hosts call them)."""

from __future__ import annotations

from collections.abc import Callable

_hooks: list[Callable[[int, int], None]] = []


def add_progress_hook(hook: Callable[[int, int], None]) -> Callable[[], None]:
    """Call hook(value, total) on every progress update; returns a function that removes it."""
    _hooks.append(hook)
    return lambda: _hooks.remove(hook)


def notify(value: int, total: int) -> None:
    for hook in list(_hooks):
        hook(value, total)
