"""The Optuna storage of a study: its URL, kept secret where it holds a password, and opened
with one clear error when it cannot be.

* ``storage: null`` is ``sqlite:///<study>/optuna.db``.
* A URL with a password (``postgresql://user:secret@host/db``) is written to the study's
  ``search.yaml`` with the password masked (``postgresql://user:***@host/db``); the real URL
  goes to ``<study>/.storage_url`` (mode 0600), which ``--resume`` reads. A URL without a
  password (libpq then takes it from ``~/.pgpass`` or the server's trust rules) is kept as is.
* Every message that shows a URL shows it masked.
* PostgreSQL needs the psycopg 3 driver: ``pip install 'pgolf[postgres]'``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pgolf.registry.api.errors import PgolfError

SECRET_FILE = ".storage_url"
MASK = "***"

# the extra that installs each dialect's default driver (SQLAlchemy 2.1 maps postgresql:// to psycopg 3)
DRIVER_EXTRAS = {
    "psycopg": "pip install 'pgolf[postgres]'  (psycopg 3, the driver SQLAlchemy uses for postgresql://)",
    "psycopg2": "pip install 'pgolf[postgres]' and write postgresql+psycopg://... (psycopg 3), or pip install psycopg2-binary",
    "pymysql": "pip install pymysql",
    "MySQLdb": "pip install mysqlclient, or write mysql+pymysql://... after pip install pymysql",
}

_PASSWORD = re.compile(r"^(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@.*)$")


def redact(url: str | None) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    if not url:
        return ""
    m = _PASSWORD.match(url)
    return f"{m['head']}{MASK}{m['tail']}" if m and m["pw"] else url


def redact_text(text: str, url: str | None) -> str:
    """``text`` with every occurrence of the URL's password masked."""
    m = _PASSWORD.match(url or "")
    if m and m["pw"]:
        text = text.replace(url or "", redact(url)).replace(m["pw"], MASK)
    return text


def has_password(url: str | None) -> bool:
    m = _PASSWORD.match(url or "")
    return bool(m and m["pw"])


def default_url(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'optuna.db').resolve()}"


def resolve_url(configured: str | None, study_dir: Path) -> str:
    """The real storage URL of a study: the configured one, its secret copy when the study's
    search.yaml holds a masked one, or the default SQLite file."""
    if not configured:
        return default_url(study_dir)
    if MASK in configured and redact(configured) == configured:
        secret = study_dir / SECRET_FILE
        if not secret.is_file():
            raise PgolfError(
                f"the study's storage {configured} has a masked password and {SECRET_FILE} is missing "
                f"from {str(study_dir)!r}; write the full URL into that file (mode 0600) to resume"
            )
        return secret.read_text().strip()
    return configured


def keep_secret(url: str, study_dir: Path) -> None:
    """Write a URL that holds a password to the study's secret file (mode 0600)."""
    path = study_dir / SECRET_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")


def open_storage(url: str) -> Any:
    """``optuna.storages.RDBStorage(url)``, or one PgolfError that says what is wrong (the
    missing driver and how to install it, or the server's answer) with the password masked."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:
        missing = _missing_module(e)
        if missing is not None:
            hint = DRIVER_EXTRAS.get(missing, f"pip install {missing}")
            raise PgolfError(
                f"storage {redact(url)}: its database driver {missing!r} is not installed; {hint}"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PgolfError(f"cannot open the Optuna storage {redact(url)}: {redact_text(first, url)}") from None


def _missing_module(e: BaseException | None) -> str | None:
    """The module whose import failed somewhere in ``e``'s chain (Optuna wraps it)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ModuleNotFoundError) and e.name:
            return str(e.name).split(".")[0]
        e = e.__cause__ or e.__context__
        seen += 1
    return None
