"""Storage: microsweep's SQL tables and Optuna's RDB storage on one URL (SQLite or PostgreSQL)."""

from microsweep.storage._records import TrialRecord
from microsweep.storage._store import Store
from microsweep.storage._summary import unpack_layer_counts
from microsweep.storage._url import DEFAULT_URL, STORAGE_ENV, resolve_url, sqlite_path

__all__ = [
    "DEFAULT_URL",
    "STORAGE_ENV",
    "Store",
    "TrialRecord",
    "resolve_url",
    "sqlite_path",
    "unpack_layer_counts",
]
