"""Storage URLs: the default, the environment variable, and checks that fail early and clearly."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from microsweep.errors import StorageError

__all__ = ["DEFAULT_URL", "STORAGE_ENV", "masked", "resolve_url", "sqlite_path"]

DEFAULT_URL = "sqlite:///microsweep.db"
STORAGE_ENV = "MICROSWEEP_STORAGE"


def resolve_url(url: str | None = None) -> str:
    """`url`, else ``$MICROSWEEP_STORAGE``, else ``sqlite:///microsweep.db``; normalized.

    A bare ``postgresql://`` URL is sent to the psycopg (v3) driver when psycopg2 is absent.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    raw = url or os.environ.get(STORAGE_ENV) or DEFAULT_URL
    try:
        parsed = make_url(raw)
    except ArgumentError:
        raise StorageError(
            "the storage URL is not a database URL; use sqlite:///FILE.db or "
            "postgresql://USER@HOST/DB"
        ) from None
    except ValueError:  # SQLAlchemy parsed the form but not a part of it: the port, an IPv6 host
        raise StorageError(
            f"storage URL {_mask_text(raw)} cannot be parsed: {_bad_part(raw)}; use "
            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, an IPv6 host in brackets ([::1])"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"storage backend {backend!r} is not supported; use sqlite or postgresql"
        )
    if backend == "postgresql" and parsed.drivername == "postgresql":
        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
            parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        path = sqlite_path(parsed.render_as_string(hide_password=False))
        if path is None:
            raise StorageError(
                "an in-memory SQLite database keeps nothing after the command ends; use "
                "sqlite:///FILE.db"
            )
        if path is not None and not path.parent.is_dir():
            raise StorageError(
                f"folder {path.parent} for the SQLite file does not exist; create it"
            )
    return parsed.render_as_string(hide_password=False)


def masked(url: str) -> str:
    """`url` with any password replaced by ***, for messages and printed output."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable storage URL>"
    except ValueError:  # the form parsed but a part did not (a port that is no number)
        return _mask_text(url)


def _mask_text(url: str) -> str:
    """`url` with any password replaced by ***, read from the text alone (for a URL SQLAlchemy
    cannot parse): everything from the user's ':' to the last '@' goes, which may hide more than
    the password but never less."""
    return re.sub(r"^([\w+.-]+://[^:/@?]*):.*@", r"\1:***@", url, count=1, flags=re.DOTALL)


def _bad_part(url: str) -> str:
    """What is wrong in a URL whose host or port SQLAlchemy could not read, in a few words."""
    authority = re.split(r"[/?]", url.partition("://")[2].rpartition("@")[2], maxsplit=1)[0]
    if authority.startswith("[") and "]" not in authority:
        return f"the IPv6 host {authority!r} has no closing ']'"
    _, colon, port = authority.rpartition("]")[2].rpartition(":")
    if colon and not port.isdigit():
        return f"port {port!r} is not a number"
    return "its host or port is malformed"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database or another backend."""
    if not url.startswith("sqlite"):
        return None
    database = url.split("///", 1)[1] if "///" in url else ""
    if database in ("", ":memory:"):
        return None
    return Path(database.split("?", 1)[0])
