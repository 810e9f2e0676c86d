"""SQLite storage (sqlite-utils)."""

from storage.db import Storage

__all__ = ["Storage"]
