"""Exception groups, flattened: Trio's nurseries wrap errors, and callers want the errors.

:func:`leaves` yields every exception inside a (possibly nested) group, in order; a plain
exception is its own only leaf.
"""

from __future__ import annotations

from typing import Iterator

__all__ = ["ConfigError", "ProxyError", "leaves"]


class ProxyError(Exception):
    """The base of every error this package raises on purpose."""




def leaves(raised: BaseException) -> Iterator[BaseException]:
    """Every exception in ``raised``, groups flattened, in order; a plain exception yields itself."""
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            yield from leaves(inner)
    else:
        yield raised


class ConfigError(ProxyError, ValueError):
    """One configuration variable is wrong; the message names it and says what is wrong."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"configuration error: {variable}: {problem}")
        self.variable = variable
