"""Reference banks: the blob format, the stores, registration and the worker's watcher."""

from .record import BankError, BankMeta, decode_bank, encode_bank, read_meta
from .stores import (BankStore, FileStore, LineState, NotFound, RedisStore, StoreError, open_configured_store, open_store,
                     redact_url)
from .watcher import BankSnapshot, BankWatcher, build_snapshot

__all__ = [
    "BankError", "BankMeta", "BankSnapshot", "BankStore", "BankWatcher", "FileStore", "LineState",
    "NotFound", "RedisStore", "StoreError", "build_snapshot", "decode_bank", "encode_bank",
    "open_configured_store", "open_store", "read_meta", "redact_url",
]
