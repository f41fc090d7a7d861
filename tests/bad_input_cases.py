"""The shape of a bad-input table: one row a case, one runner that checks it.

Every bad input a user can give a node (a damaged file, an empty batch, a NaN setting) must end in
one of the pack's own error types, with a message that names what was wrong, never in a raw
exception from torch, PIL, safetensors, json or the OS. Test modules list their cases as
`BadInput` rows and run each through `assert_bad_input`, so the rule is checked the same way
everywhere. Import it the way the MIA tests import their helpers (pytest runs with
--import-mode=importlib): `sys.path.insert(0, str(Path(__file__).parent))`, then
`from bad_input_cases import BadInput, assert_bad_input, cases_param`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class BadInput:
    """One bad input.

    id: the pytest id (short, kebab-case). run: builds the input under the given temporary folder
    and calls the node (or the loader the node calls); it must raise. error: the pack's error type
    (or a tuple of them) it must raise. names: substrings the message must contain, e.g. the file
    name or the input's name, and a word of the fix; matched case-insensitively.
    """

    id: str
    run: Callable[[Path], object]
    error: type[BaseException] | tuple[type[BaseException], ...]
    names: tuple[str, ...] = field(default_factory=tuple)


_PACKAGE = "slipstream"


def _is_ours(exc_type: type[BaseException]) -> bool:
    """An error class defined inside the pack (any class in its MRO short of the builtins)."""
    return any(klass.__module__.split(".")[0] == _PACKAGE for klass in exc_type.__mro__)


def assert_bad_input(case: BadInput, tmp_path: Path) -> BaseException:
    """Run the case; assert it raised the pack's own error of the expected type whose message
    names every substring of `case.names`. Returns the exception for extra checks."""
    with pytest.raises(BaseException) as info:
        case.run(tmp_path)
    exc = info.value
    expected = case.error if isinstance(case.error, tuple) else (case.error,)
    assert isinstance(exc, expected), (
        f"{case.id}: raised {type(exc).__module__}.{type(exc).__name__}: {exc}; expected one of "
        f"{[e.__name__ for e in expected]}")
    assert _is_ours(type(exc)), f"{case.id}: {type(exc).__name__} is not one of the pack's error types: {exc}"
    message = str(exc).lower()
    for name in case.names:
        assert name.lower() in message, f"{case.id}: message does not name {name!r}: {exc}"
    return exc


def cases_param(cases: list[BadInput]):
    """`pytest.mark.parametrize` over the cases, each under its id."""
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return pytest.mark.parametrize("case", cases, ids=ids)
