"""User-facing errors.

Anything a user can fix (a config key, a data path, a shard header, a plugin) raises a
:class:`PgolfError`; the CLI prints its message without a traceback and exits with status 2.
Internal invariants use ``assert``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class PgolfError(Exception):
    """An error the user can act on; its message is shown as is."""


class ConfigError(PgolfError):
    """One or more problems in a stack or search file, each with its key path."""

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}:"
        lines = [head] + [f"  {path or '<top>'}: {msg}" for path, msg in self.problems]
        super().__init__("\n".join(lines))


class DataError(PgolfError):
    """Missing or malformed data: shards, tokenizers, documents."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices`` (ties included), or ''."""
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in choices), key=lambda t: (-t[0], t[1])
    )
    if not scored or scored[0][0] < 0.6:
        return ""
    best = scored[0][0]
    close = [c for r, c in scored if r >= best - 0.05][:3]
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
