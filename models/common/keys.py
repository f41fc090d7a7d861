"""Reading a model's size from its checkpoint keys (the released files carry no config)."""

from __future__ import annotations

from collections.abc import Iterable


def count_numbered(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children `prefix` has: 1 + the highest N of keys `<prefix>N.…` (0 if none).

    The highest index, not the number of distinct ones, so a gap left by a pruned layer still
    fails the key check later instead of building a shorter model.
    """
    highest = -1
    for key in keys:
        if key.startswith(prefix):
            index = key[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                highest = max(highest, int(index))
    return highest + 1
