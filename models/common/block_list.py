"""Block selections typed by users ("0-9, 15"): one parser for every input that names DiT blocks."""

from __future__ import annotations


def parse_block_list(text: str, what: str = "Block selection") -> tuple[int, ...]:
    """"0-9, 15" -> (0, 1, …, 9, 15), sorted and without repeats; "" -> (). `what` names the input in
    the error (e.g. "SLG blocks"), which says how to write a selection."""
    chosen: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"{what} '{text}': '{part}' is not a block number or range; write block indices "
                             "like '9', '8,9' or '0-9, 15'.") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"{what} '{text}': range '{part}' is empty or negative; write low-high, e.g. '10-19'.")
        chosen.update(range(lo, hi + 1))
    return tuple(sorted(chosen))
