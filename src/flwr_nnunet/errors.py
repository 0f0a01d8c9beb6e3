"""The root of every exception flwr-nnunet raises, and the errors shared by several layers.

Every exception class of the project subclasses :class:`FlwrNnUNetError` and
keeps the built-in base it always had (``ValueError``, ``KeyError``,
``RuntimeError``...), so ``except FlwrNnUNetError`` catches anything the
project raised on purpose while existing ``except ValueError`` code still works.

This module imports nothing from the project, so every layer (the core
included) can import it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

__all__ = ["FlwrNnUNetError", "KeyMismatchError"]

_SHOWN_KEYS = 3
_DEFAULT_FIX = "both sides must come from the same plans, configuration and trainer"


class FlwrNnUNetError(Exception):
    """The root of every exception the project raises."""


class KeyMismatchError(FlwrNnUNetError, KeyError, ValueError):
    """A mapping's keys differ from the keys it was compared to.

    It is a ``KeyError`` (a lookup by the expected keys would fail) and a
    ``ValueError`` (the mapping is the wrong value), so code written for
    either keeps catching it. ``missing`` and ``unknown`` hold every key the
    message names only the first few of.
    """

    def __init__(self, message: str, *, missing: Sequence[str] = (), unknown: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.unknown = tuple(unknown)

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""

    @classmethod
    def from_keys(
        cls,
        missing: Sequence[str],
        unknown: Sequence[str],
        *,
        what: str,
        against: str,
        fix: str = _DEFAULT_FIX,
    ) -> KeyMismatchError:
        """The error for ``what`` whose keys differ from ``against``'s.

        ``missing`` are keys of ``against`` that ``what`` lacks, ``unknown``
        keys of ``what`` that ``against`` does not have, each in the order to
        report them. The message reads ``"<what>: keys differ from <against>:
        missing N keys (first: [...]); M unknown keys (first: [...]); <fix>"``.
        """
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {list(missing[:_SHOWN_KEYS])})")
        if unknown:
            parts.append(f"{len(unknown)} unknown keys (first: {list(unknown[:_SHOWN_KEYS])})")
        if fix:
            parts.append(fix)
        return cls(f"{what}: keys differ from {against}: " + "; ".join(parts), missing=missing, unknown=unknown)

    @classmethod
    def check(
        cls,
        given: Iterable[str],
        expected: Iterable[str],
        *,
        what: str,
        against: str,
        fix: str = _DEFAULT_FIX,
        optional: Collection[str] = (),
    ) -> None:
        """Raise :meth:`from_keys`'s error unless ``given`` holds exactly the ``expected`` keys.

        Missing keys are reported in ``expected``'s order, unknown ones sorted;
        keys in ``optional`` may be present or absent.
        """
        given_set = set(given)
        expected = list(expected)
        expected_set = set(expected)
        if given_set == expected_set:
            return
        missing = [k for k in expected if k not in given_set]
        unknown = sorted(given_set - expected_set - set(optional))
        if missing or unknown:
            raise cls.from_keys(missing, unknown, what=what, against=against, fix=fix)
