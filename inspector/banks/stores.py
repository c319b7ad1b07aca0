"""Bank stores: Redis (DESIGN section 8) and ``file://`` (one PC, no Redis), one interface.

Both keep versioned blobs and switch a product's active version, the line's epoch and the change
notice together, after the new blob is completely written, so a reader never sees a half-written
bank and a writer that dies midway leaves the previous version in service.

Redis keys: the line's layout in ``inspector.keys`` (banks, products, epoch, change channel,
normal statistics).

The ``file://`` store keeps ``<root>/line-<L>/state.json`` (active versions and epoch, replaced
atomically under an exclusive lock), ``<root>/line-<L>/banks/<product>/<version>.bank`` and
``<root>/line-<L>/normal/<product>.json``.

A product's normal statistics (``inspector.banks.normal``) are measured at registration and kept
in the bank's metadata, which never changes; what the stream and operator feedback learn later
is one JSON record per product beside the banks, written whole, with a revision that makes every
write a compare-and-set. A record whose ``bank_version`` is not the active version is ignored
(re-registration starts afresh) and is deleted with the next registration or removal.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import unquote, urlsplit

from ..config import BankConfig
from ..keys import DEFAULT_PREFIX, line_key
from .normal import NormalStats, NormalStatsError
from .record import BankError, BankMeta, check_name

DEFAULT_KEEP = 3
FILE_POLL_S = 0.05  # the file store's change wait re-reads state this often: cheap, and far below any poll interval


UNREADABLE_REVISION = -1  # the revision of a damaged statistics record: no compare-and-set matches it


def _stored_revision(data: bytes | None) -> int:
    if data is None:
        return 0
    try:
        return NormalStats.from_json(data).revision
    except NormalStatsError:
        return UNREADABLE_REVISION


def _check_active(product: str, active: object, expect: int | None) -> None:
    """``BankError("conflict")`` unless ``expect`` is None or the active version (0: none)."""
    if expect is None:
        return
    have = int(active) if active is not None else 0
    if have != expect:
        raise BankError("conflict", f"{product}'s active bank is version {have}, not {expect}: it changed meanwhile")


class StoreError(RuntimeError):
    """The store cannot be reached or is in an unexpected state (retryable)."""


class NotFound(KeyError):
    """No such product or version on this line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True)
class LineState:
    """A consistent read of a line: active version per product and the epoch."""

    epoch: int
    products: dict[str, int]


class Subscription(Protocol):
    """A change notice source; ``wait`` returns True when a change may have happened."""

    def wait(self, timeout: float) -> bool: ...

    def close(self) -> None: ...


class BankStore(Protocol):
    url: str

    def state(self, line: str) -> LineState: ...
    def put(self, line: str, blob: bytes, meta: BankMeta, expect_active: int | None = None) -> tuple[int, int]: ...
    def blob(self, line: str, product: str, version: int | None = None) -> bytes: ...
    def meta(self, line: str, product: str, version: int | None = None) -> BankMeta: ...
    def versions(self, line: str, product: str) -> list[int]: ...
    def remove(self, line: str, product: str) -> int: ...
    def subscribe(self, line: str) -> Subscription: ...
    def normal(self, line: str, product: str) -> NormalStats | None: ...
    def put_normal(self, line: str, stats: NormalStats, expect_revision: int | None, notify: bool) -> bool: ...
    def close(self) -> None: ...


def redact_url(url: str) -> str:
    """The URL with any password (``user:pw@`` or ``?password=``) replaced by ``***``."""
    from ..config import mask_url_secrets

    return mask_url_secrets(url)


def open_store(
    url: str,
    prefix: str = DEFAULT_PREFIX,
    keep: int = DEFAULT_KEEP,
    password: str | None = None,
    username: str | None = None,
    tls_ca_file: str | None = None,
) -> BankStore:
    """Open ``redis://``, ``rediss://`` or ``file://`` (a plain path counts as ``file://``)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 version, got {keep}")
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, prefix, keep, password, username, tls_ca_file)
    if scheme == "file":
        return FileStore(Path(unquote(urlsplit(url).path)), keep)
    if scheme == "":
        return FileStore(Path(url), keep)
    raise ValueError(f"unknown bank store {redact_url(url)!r}: use redis://, rediss:// or file://")


def open_configured_store(cfg: BankConfig) -> BankStore:
    """The store a line config's ``[banks]`` names, with its prefix, versions kept and credentials."""
    return open_store(cfg.store, cfg.prefix, cfg.keep_versions, cfg.password, cfg.username, cfg.tls_ca_file)


# -- file:// -------------------------------------------------------------------------------------
class FileStore:
    """Banks in a directory; an exclusive ``flock`` serialises writers, readers need no lock."""

    def __init__(self, root: Path, keep: int = DEFAULT_KEEP) -> None:
        self.root = Path(root)
        self.keep = keep
        self.url = f"file://{self.root.resolve()}"

    def _line(self, line: str) -> Path:
        return self.root / f"line-{check_name('line', line)}"

    def _bank(self, line: str, product: str, version: int) -> Path:
        return self._line(line) / "banks" / check_name("product", product) / f"{version}.bank"

    def _read_state(self, line: str) -> dict:
        path = self._line(line) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"epoch": 0, "products": {}, "seq": {}}
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"cannot read {path}: {err}") from err
        return data

    def _write_state(self, line: str, data: dict) -> None:
        _atomic_write(self._line(line) / "state.json", json.dumps(data, sort_keys=True).encode())

    @contextmanager
    def _locked(self, line: str) -> Iterator[None]:
        d = self._line(line)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def state(self, line: str) -> LineState:
        data = self._read_state(line)
        return LineState(int(data["epoch"]), {k: int(v) for k, v in data["products"].items()})

    def put(self, line: str, blob: bytes, meta: BankMeta, expect_active: int | None = None) -> tuple[int, int]:
        """Store a new version of ``meta.product``'s bank and make it active; returns
        ``(version, epoch)``.

        ``expect_active`` makes it a compare-and-set: the write happens only while that version
        (0: none) is the active one, otherwise ``BankError("conflict")`` and nothing changes
        (a bank grown from the stream must not replace an operator's new registration).
        """
        product = check_name("product", meta.product)
        with self._locked(line):
            data = self._read_state(line)
            _check_active(product, data["products"].get(product), expect_active)
            version = int(data["seq"].get(product, 0)) + 1
            data["seq"][product] = version
            self._write_state(line, data)  # reserve the version before the slow write
        path = self._bank(line, product, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, bytes(blob))
        _atomic_write(path.with_suffix(".meta"), meta.with_version(version).to_json().encode())
        with self._locked(line):
            data = self._read_state(line)
            try:
                _check_active(product, data["products"].get(product), expect_active)
            except BankError:
                for suffix in (".bank", ".meta"):
                    path.with_suffix(suffix).unlink(missing_ok=True)
                raise
            data["products"][product] = version
            data["epoch"] = int(data["epoch"]) + 1
            self._write_state(line, data)
            self._normal(line, product).unlink(missing_ok=True)  # a new registration starts afresh
            self._prune(line, product, version)
            return version, int(data["epoch"])

    def _prune(self, line: str, product: str, active: int) -> None:
        stored = self.versions(line, product)
        for v in stored[: max(0, len(stored) - self.keep)]:
            if v != active:
                for suffix in (".bank", ".meta"):
                    self._bank(line, product, v).with_suffix(suffix).unlink(missing_ok=True)

    def _active(self, line: str, product: str, version: int | None) -> int:
        if version is not None:
            return version
        products = self.state(line).products
        if product not in products:
            raise NotFound(f"no product {product!r} on line {line}")
        return products[product]

    def blob(self, line: str, product: str, version: int | None = None) -> bytes:
        v = self._active(line, product, version)
        try:
            return self._bank(line, product, v).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no version {v} of {product!r} on line {line}") from None

    def meta(self, line: str, product: str, version: int | None = None) -> BankMeta:
        v = self._active(line, product, version)
        try:
            return BankMeta.from_json(self._bank(line, product, v).with_suffix(".meta").read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no version {v} of {product!r} on line {line}") from None

    def versions(self, line: str, product: str) -> list[int]:
        d = self._line(line) / "banks" / check_name("product", product)
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.glob("*.bank") if p.stem.isdigit())

    def remove(self, line: str, product: str) -> int:
        check_name("product", product)
        with self._locked(line):
            data = self._read_state(line)
            if product not in data["products"]:
                raise NotFound(f"no product {product!r} on line {line}")
            del data["products"][product]
            data["epoch"] = int(data["epoch"]) + 1
            self._write_state(line, data)
            self._normal(line, product).unlink(missing_ok=True)
            for v in self.versions(line, product):
                for suffix in (".bank", ".meta"):
                    self._bank(line, product, v).with_suffix(suffix).unlink(missing_ok=True)
            return int(data["epoch"])

    def _normal(self, line: str, product: str) -> Path:
        return self._line(line) / "normal" / f"{check_name('product', product)}.json"

    def normal(self, line: str, product: str) -> NormalStats | None:
        """The product's refined normal statistics, or None when only the registration's exist."""
        try:
            return NormalStats.from_json(self._normal(line, product).read_bytes())
        except FileNotFoundError:
            return None
        except NormalStatsError as err:
            raise BankError("bad_stats", f"normal statistics of {product!r}: {err}") from err

    def _revision(self, line: str, product: str) -> int:
        try:
            current = self.normal(line, product)
        except BankError:
            return UNREADABLE_REVISION
        return current.revision if current else 0

    def put_normal(self, line: str, stats: NormalStats, expect_revision: int | None = None,
                   notify: bool = False) -> bool:
        """Write ``stats`` if the stored revision is ``expect_revision`` (None: unconditionally)
        and ``stats.bank_version`` is active; ``notify`` bumps the epoch so workers reload them."""
        stats.checked()
        with self._locked(line):
            data = self._read_state(line)
            if data["products"].get(stats.product) != stats.bank_version:
                return False
            if expect_revision is not None and self._revision(line, stats.product) != expect_revision:
                return False
            _atomic_write(self._normal(line, stats.product), stats.to_json().encode())
            if notify:
                data["epoch"] = int(data["epoch"]) + 1
                self._write_state(line, data)
            return True

    def subscribe(self, line: str) -> "FileSubscription":
        return FileSubscription(self._line(line) / "state.json")

    def close(self) -> None:
        pass


class FileSubscription:
    """Change notices for the file store: the state file's identity changes on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while True:
            stamp = self._stamp()
            if stamp != self._seen:
                self._seen = stamp
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(FILE_POLL_S, left))

    def close(self) -> None:
        pass


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- redis:// ------------------------------------------------------------------------------------
SOCKET_TIMEOUT_S = 5.0  # a stalled Redis fails a call after this instead of hanging the caller


class RedisStore:
    """Banks in Redis with the key layout of DESIGN section 8."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        keep: int = DEFAULT_KEEP,
        password: str | None = None,
        username: str | None = None,
        tls_ca_file: str | None = None,
    ) -> None:
        import redis  # imported here: the file store and the model need no Redis client

        self._redis_mod = redis
        kwargs: dict = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": SOCKET_TIMEOUT_S}
        if password is not None:
            kwargs["password"] = password
        if username is not None:
            kwargs["username"] = username
        if tls_ca_file is not None:
            kwargs["ssl_ca_certs"] = tls_ca_file
        self.client = redis.Redis.from_url(url, **kwargs)
        self.url = redact_url(url)
        self.prefix = prefix
        self.keep = keep

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    def key(self, line: str, *parts: object) -> str:
        return line_key(self.prefix, check_name("line", line), *parts)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._redis_mod.RedisError as err:
            raise StoreError(f"redis at {self.url}: {err}") from err

    def state(self, line: str) -> LineState:
        with self._errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self.key(line, "products"))
            pipe.get(self.key(line, "epoch"))
            products, epoch = pipe.execute()
        return LineState(int(epoch or 0), {k.decode(): int(v) for k, v in products.items()})

    def put(self, line: str, blob: bytes, meta: BankMeta, expect_active: int | None = None) -> tuple[int, int]:
        """See ``FileStore.put``; with ``expect_active`` the activation WATCHes the products hash."""
        product = check_name("product", meta.product)
        base = ("bank", product)
        products = self.key(line, "products")
        with self._errors():
            if expect_active is not None:
                _check_active(product, self.client.hget(products, product), expect_active)
            version = int(self.client.incr(self.key(line, *base, "seq")))
            blob_key = self.key(line, *base, version)
            self.client.set(blob_key, bytes(blob))
            self.client.set(blob_key + ":meta", meta.with_version(version).to_json())
            self.client.zadd(self.key(line, *base, "versions"), {str(version): version})
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    if expect_active is not None:
                        pipe.watch(products)
                        _check_active(product, pipe.hget(products, product), expect_active)
                        pipe.multi()
                    pipe.hset(products, product, version)
                    pipe.delete(self.key(line, "normal", product))  # a new registration starts afresh
                    pipe.incr(self.key(line, "epoch"))
                    pipe.publish(self.key(line, "changed"), f"put {product} {version}")
                    _, _, epoch, _ = pipe.execute()
                except (BankError, self._redis_mod.WatchError) as err:
                    drop = self.client.pipeline(transaction=True)
                    drop.delete(blob_key, blob_key + ":meta")
                    drop.zrem(self.key(line, *base, "versions"), str(version))
                    drop.execute()
                    if isinstance(err, BankError):
                        raise
                    raise BankError("conflict", f"{product}'s active bank changed while writing version {version}") from err
            self._prune(line, product, version)
        return version, int(epoch)

    def _prune(self, line: str, product: str, active: int) -> None:
        stored = self.versions(line, product)
        for v in stored[: max(0, len(stored) - self.keep)]:
            if v != active:
                key = self.key(line, "bank", product, v)
                pipe = self.client.pipeline(transaction=True)
                pipe.delete(key, key + ":meta")
                pipe.zrem(self.key(line, "bank", product, "versions"), str(v))
                pipe.execute()

    def _active(self, line: str, product: str, version: int | None) -> int:
        if version is not None:
            return version
        with self._errors():
            v = self.client.hget(self.key(line, "products"), check_name("product", product))
        if v is None:
            raise NotFound(f"no product {product!r} on line {line}")
        return int(v)

    def blob(self, line: str, product: str, version: int | None = None) -> bytes:
        v = self._active(line, product, version)
        with self._errors():
            data = self.client.get(self.key(line, "bank", product, v))
        if data is None:
            raise NotFound(f"no version {v} of {product!r} on line {line}")
        return data

    def meta(self, line: str, product: str, version: int | None = None) -> BankMeta:
        v = self._active(line, product, version)
        with self._errors():
            data = self.client.get(self.key(line, "bank", product, v) + ":meta")
        if data is None:
            raise NotFound(f"no version {v} of {product!r} on line {line}")
        return BankMeta.from_json(data)

    def versions(self, line: str, product: str) -> list[int]:
        with self._errors():
            members = self.client.zrange(self.key(line, "bank", check_name("product", product), "versions"), 0, -1)
        return sorted(int(m) for m in members)

    def remove(self, line: str, product: str) -> int:
        check_name("product", product)
        with self._errors():
            if not self.client.hexists(self.key(line, "products"), product):
                raise NotFound(f"no product {product!r} on line {line}")
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(self.key(line, "products"), product)
            pipe.delete(self.key(line, "normal", product))
            pipe.incr(self.key(line, "epoch"))
            pipe.publish(self.key(line, "changed"), f"remove {product}")
            _, _, epoch, _ = pipe.execute()
            for v in self.versions(line, product):
                key = self.key(line, "bank", product, v)
                self.client.delete(key, key + ":meta")
            self.client.delete(self.key(line, "bank", product, "versions"))
        return int(epoch)

    def normal(self, line: str, product: str) -> NormalStats | None:
        """The product's refined normal statistics, or None when only the registration's exist."""
        with self._errors():
            data = self.client.get(self.key(line, "normal", check_name("product", product)))
        if data is None:
            return None
        try:
            return NormalStats.from_json(data)
        except NormalStatsError as err:
            raise BankError("bad_stats", f"normal statistics of {product!r}: {err}") from err

    def put_normal(self, line: str, stats: NormalStats, expect_revision: int | None = None,
                   notify: bool = False) -> bool:
        """Compare-and-set ``stats`` (see ``FileStore.put_normal``): WATCH the record and the
        products hash, check, then one MULTI writes (and with ``notify`` bumps and publishes)."""
        stats.checked()
        key = self.key(line, "normal", check_name("product", stats.product))
        products = self.key(line, "products")
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key, products)
                active = pipe.hget(products, stats.product)
                stored = pipe.get(key)
                revision = _stored_revision(stored)
                if active is None or int(active) != stats.bank_version or (
                        expect_revision is not None and revision != expect_revision):
                    return False
                pipe.multi()
                pipe.set(key, stats.to_json())
                if notify:
                    pipe.incr(self.key(line, "epoch"))
                    pipe.publish(self.key(line, "changed"), f"normal {stats.product}")
                pipe.execute()
                return True
            except self._redis_mod.WatchError:
                return False

    def subscribe(self, line: str) -> "RedisSubscription":
        return RedisSubscription(self, self.key(line, "changed"))

    def close(self) -> None:
        self.client.close()


class RedisSubscription:
    """Pub/sub nudges. Pub/sub loses messages across a disconnect, so the watcher also polls
    the epoch; a failed connection here reports a possible change and reconnects on next wait."""

    def __init__(self, store: RedisStore, channel: str) -> None:
        self.store = store
        self.channel = channel
        self._pubsub = None

    def wait(self, timeout: float) -> bool:
        redis = self.store._redis_mod
        try:
            if self._pubsub is None:
                self._pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.channel)
            end = time.monotonic() + timeout
            while True:  # get_message may return early (e.g. on the subscribe reply)
                left = end - time.monotonic()
                if self._pubsub.get_message(timeout=max(left, 0.0)) is not None:
                    while self._pubsub.get_message(timeout=0) is not None:  # coalesce a burst
                        pass
                    return True
                if left <= 0:
                    return False
        except (redis.RedisError, OSError) as err:
            self.close()
            raise StoreError(f"redis at {self.store.url}: {err}") from err

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # closing a broken connection may raise anything; nothing to do
                pass
            self._pubsub = None
