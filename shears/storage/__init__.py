"""Where models, datasets, checkpoints and artifacts live: a :class:`Storage` backend chosen by
the scheme of ``SHEARS_STORAGE_URL`` (unset: local disk). Each backend registers itself in its own
module; importing this package registers the built-in ones."""

from shears.storage import local, s3
from shears.storage.base import (
    Storage,
    StorageError,
    StorageQuotaExceeded,
    StoredFile,
    register,
    storage_from_settings,
)
from shears.storage.local import LocalStorage

__all__ = [
    "LocalStorage",
    "Storage",
    "StorageError",
    "StorageQuotaExceeded",
    "StoredFile",
    "local",
    "register",
    "s3",
    "storage_from_settings",
]
