"""Notices: things a user should know about a run that are not errors (a size rounded, sound dropped).

A notice goes to the log and to every observer (tests, the headless runner), and each host also shows
it where the user looks: inside ComfyUI as the node's UI text (host/comfyui.show_node_text); the
standalone host has only the log. Nodes call host.notice(); they never log such things themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("slipstream")

_hooks: list[Callable[[str, str], None]] = []


def add_notice_hook(hook: Callable[[str, str], None]) -> Callable[[], None]:
    """Call hook(node, message) for every notice; returns a function that removes it."""
    _hooks.append(hook)
    return lambda: _hooks.remove(hook)


def emit(node: str, message: str) -> str:
    """Log the notice and tell the observers; returns the line as the user sees it."""
    line = f"{node}: {message}" if node else message
    log.warning("%s", line)
    for hook in list(_hooks):
        hook(node, message)
    return line
