"""User-facing errors.

Anything a user can fix (a config key, a data path, a shard header, a plugin, an unwritable or
full output folder) raises a :class:`PgolfError`; the CLI prints its message without a traceback
and exits with status 2. A run that ends without a valid result raises :class:`RunFailed`
(status 3). Internal invariants use ``assert``.

Exit statuses of every ``pgolf`` command (errors and verdicts never share a code):

===  =====================================================================================
0    success; for a command that gives a verdict, the verdict is yes (fits, bar met)
1    the command worked and its verdict is no (``check``: does not fit; ``compare``: the
     challenge bar is not met)
2    an error the user can fix: bad input, missing or malformed file, unwritable or full disk
3    the run failed: training diverged, or the score is not finite or has nothing to score
     (the run folder is kept as ``OUT.failed`` with ``error.txt``)
70   an internal error (a bug in pgolf): the traceback is printed
130  interrupted (Ctrl-C)
===  =====================================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

EXIT_OK = 0
EXIT_VERDICT_NO = 1
EXIT_ERROR = 2
EXIT_RUN_FAILED = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class PgolfError(Exception):
    """An error the user can act on; its message is shown as is."""


class RunFailed(PgolfError):
    """A run that produced no valid result: diverged training, a non-finite or degenerate score."""


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


def os_error_text(e: OSError) -> str:
    """``'No space left on device: /out/model.ptz'`` for an :class:`OSError`."""
    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename else ""
    if e.filename2:
        where += f" -> {e.filename2}"
    return f"{what}{where}"


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
