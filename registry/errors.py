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
    """' (did you mean 'x'?)' for the closest matches of ``name``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
