"""SentryPeer's SQLite storage (interface.md §4).

- :mod:`sentrypeer.storage.queries`: pure SQL functions taking a DB-API cursor or connection
  (schema migrations included); no Twisted import, testable with plain :mod:`sqlite3`.
- :mod:`sentrypeer.storage.database`: the Twisted side (``adbapi`` pool, write queue, service).
- ``schema/*.sql``: the schema files, package data read with :mod:`importlib.resources`.

This module holds only the exceptions, so that both halves can raise them.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database cannot be used; ``str()`` is one line naming the file and the cause.

    :param path: the database file as configured.
    :param cause: what went wrong, in words; line breaks are folded into spaces.
    """

    def __init__(self, path: str, cause: str) -> None:
        self.path = path
        self.cause = " ".join(str(cause).split())
        super().__init__(f"database {path}: {self.cause}")


class SchemaVersionError(StorageError):
    """The database's ``PRAGMA user_version`` is newer than this program knows; it was left untouched.

    :param path: the database file.
    :param found: the file's schema version.
    :param supported: the newest schema version this program knows.
    """

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            path,
            f"schema version {found} is newer than the newest this SentryPeer knows "
            f"({supported}); it was written by a newer SentryPeer and is left untouched",
        )
