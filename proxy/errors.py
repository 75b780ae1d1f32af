"""Exception groups, flattened: Trio's nurseries wrap errors, and callers want the errors.

:func:`leaves` yields every exception inside a (possibly nested) group, in order; a plain
exception is its own only leaf.
"""

from __future__ import annotations

from typing import Iterator


def leaves(raised: BaseException) -> Iterator[BaseException]:
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            yield from leaves(inner)
    else:
        yield raised
