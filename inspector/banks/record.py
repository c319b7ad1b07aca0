"""A product's reference bank as a self-describing blob (DESIGN section 8).

The blob is safetensors bytes: one fp16 ``(N_l, C_l)`` tensor per level, the float32 prototype
and the bank-mode ``(u, gamma)``, with the bank's metadata as JSON in the safetensors header, so
one blob is also the portable export file. ``decode_bank`` accepts arbitrary bytes and either
returns a bank that the model can use or raises ``BankError`` saying what is wrong; it never
unpickles anything and checks every size against the header before trusting it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..model.bank import BANK_DTYPE, ProductBank

BANK_SCHEMA = 1
META_KEY = "inspector_bank"
MAX_BLOB_BYTES = 512 * 2**20  # a 4-shot bank at 1024 px input with a wide backbone stays well under
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # names become Redis keys, paths and topics
UNIT_TOLERANCE = 2e-2  # fp16 storage of unit vectors: |norm - 1| stays far below this


class BankError(ValueError):
    """A bank cannot be used: damaged, truncated, or built for another model."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_name(kind: str, value: str) -> str:
    """Validate a line or product name (letters, digits, ``_ . -``, at most 64)."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise BankError("bad_name", f"{kind} {value!r} must match {NAME_PATTERN.pattern}")
    return value


@dataclass(frozen=True)
class BankMeta:
    """What a bank was built from and with; stored in the blob and beside it in the store.

    Attributes:
        product: the product name.
        signature: backbone signature of the model that extracted the features.
        shots: number of images in the bank.
        images: ``[{"name", "sha256"}]`` of the shots, in bank order.
        levels: ``[[N_l, C_l]]`` vectors and channels per level.
        u, gamma: the product's calibration at registration: score = (raw - u) / (gamma - u).
        model_id: the artifact that measured ``u`` and ``gamma``.
        coreset: the cap on vectors per level (one for all levels, or a list with one per level),
            or None.
        created_at: ISO 8601 UTC time of registration.
        content_sha256: digest of the tensors, checked on load.
        version: the store's version number (0 until stored).
        candidates: how many images were offered when the shots were picked from more.
        normal: the normal statistics measured at registration (method, count, thin, how the
            images were scored, the raw scores); None for banks registered before they existed,
            whose ``u``/``gamma`` are leave-one-out map mean and max.
    """

    product: str
    signature: str
    shots: int
    images: list[dict[str, str]]
    levels: list[list[int]]
    u: float
    gamma: float
    model_id: str
    created_at: str
    content_sha256: str = ""
    coreset: int | list[int | None] | None = None
    version: int = 0
    candidates: int = 0
    schema: int = BANK_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)
    normal: dict[str, Any] | None = None  # registration statistics (NormalStats.summary + scores); None: older banks

    @property
    def nbytes(self) -> int:
        """Bytes of the level tensors (fp16)."""
        return sum(n * c for n, c in self.levels) * torch.finfo(BANK_DTYPE).bits // 8

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "BankMeta":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BankError("bad_meta", f"bank metadata is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise BankError("bad_meta", "bank metadata is not a JSON object")
        if data.get("schema") != BANK_SCHEMA:
            raise BankError("bad_schema", f"bank schema {data.get('schema')!r}, this code reads {BANK_SCHEMA}")
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in data.items() if k in known}
        try:
            meta = cls(**data)
        except TypeError as err:
            raise BankError("bad_meta", f"bank metadata fields: {err}") from err
        _check_meta(meta)
        return meta

    def with_version(self, version: int) -> "BankMeta":
        return BankMeta(**{**asdict(self), "version": version})


def _check_meta(meta: BankMeta) -> None:
    check_name("product", meta.product)
    if not isinstance(meta.levels, list) or not meta.levels or not all(
        isinstance(l, list) and len(l) == 2 and all(isinstance(v, int) and v > 0 for v in l)
        for l in meta.levels
    ):
        raise BankError("bad_meta", f"levels must be [[vectors, channels], ...], got {meta.levels!r}")
    if not isinstance(meta.shots, int) or meta.shots < 1:
        raise BankError("bad_meta", f"shots must be a positive integer, got {meta.shots!r}")
    for name in ("u", "gamma"):
        value = getattr(meta, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BankError("bad_stats", f"bank-mode {name} is {value!r}, not a finite number")
    if not meta.gamma > meta.u:
        raise BankError("bad_stats", f"bank-mode gamma {meta.gamma} must exceed u {meta.u}")


def content_digest(bank: ProductBank) -> str:
    """sha256 over the bank's tensor bytes, in a fixed order."""
    h = hashlib.sha256()
    for t in (*bank.features, bank.prototype.float(), bank.stats.float()):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_bank(bank: ProductBank, meta: BankMeta) -> bytes:
    """Bank and metadata -> safetensors bytes (the blob and the export file format)."""
    tensors = {f"level{i}": f.to(BANK_DTYPE).contiguous() for i, f in enumerate(bank.features)}
    tensors["prototype"] = bank.prototype.float().contiguous()
    tensors["stats"] = bank.stats.float().contiguous()
    _check_meta(meta)
    return st_save(tensors, metadata={META_KEY: meta.to_json()})


def read_meta(blob: bytes) -> BankMeta:
    """The metadata of a blob, from the safetensors header alone."""
    header = _header(blob)
    raw = header.get("__metadata__", {}).get(META_KEY) if isinstance(header.get("__metadata__"), dict) else None
    if not isinstance(raw, str):
        raise BankError("bad_meta", "blob has no inspector bank metadata")
    return BankMeta.from_json(raw)


def decode_bank(blob: bytes, signature: str | None = None, channels: tuple[int, ...] | None = None) -> tuple[ProductBank, BankMeta]:
    """Validate and load a blob.

    Args:
        blob: safetensors bytes from a store or an export file.
        signature: the serving model's backbone signature; a different one is refused.
        channels: the serving model's channels per level; a different geometry is refused.

    Raises:
        BankError: with ``reason`` one of ``too_large``, ``truncated``, ``bad_meta``,
            ``bad_schema``, ``bad_tensors``, ``corrupt``, ``bad_stats``, ``wrong_backbone``.
    """
    meta = read_meta(blob)
    if signature is not None and meta.signature != signature:
        raise BankError(
            "wrong_backbone",
            f"bank for {meta.product!r} was built with {meta.signature}, the model uses {signature}: "
            "register the product again with this model",
        )
    if channels is not None and [c for _, c in meta.levels] != list(channels):
        raise BankError("wrong_backbone", f"bank channels {[c for _, c in meta.levels]} != model's {list(channels)}")
    try:
        tensors = st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise BankError("truncated", f"cannot read bank tensors: {err}") from err
    bank = _bank_from(tensors, meta)
    if content_digest(bank) != meta.content_sha256:
        raise BankError("corrupt", f"bank for {meta.product!r} fails its content digest: the blob is damaged")
    return bank, meta


def _header(blob: bytes) -> dict[str, Any]:
    """Parse a safetensors header with explicit bounds (the loader is not given bad sizes)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise BankError("bad_blob", f"bank blob must be bytes, got {type(blob).__name__}")
    size = len(blob)
    if size > MAX_BLOB_BYTES:
        raise BankError("too_large", f"bank blob of {size} bytes is over the {MAX_BLOB_BYTES} byte limit")
    if size < 8:
        raise BankError("truncated", f"bank blob of {size} bytes has no header")
    n = int.from_bytes(bytes(blob[:8]), "little")
    if n > size - 8:
        raise BankError("truncated", f"bank header claims {n} bytes, the blob has {size - 8}")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BankError("truncated", f"bank header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise BankError("bad_blob", "bank header is not a JSON object")
    return header


def _bank_from(tensors: dict[str, torch.Tensor], meta: BankMeta) -> ProductBank:
    n_levels = len(meta.levels)
    expected = {f"level{i}" for i in range(n_levels)} | {"prototype", "stats"}
    if set(tensors) != expected:
        raise BankError("bad_tensors", f"bank tensors {sorted(tensors)} != expected {sorted(expected)}")
    levels = []
    for i, (n, c) in enumerate(meta.levels):
        t = tensors[f"level{i}"]
        if t.dtype != BANK_DTYPE or tuple(t.shape) != (n, c):
            raise BankError("bad_tensors", f"level{i} is {t.dtype} {tuple(t.shape)}, meta says {BANK_DTYPE} {(n, c)}")
        levels.append(t)
    proto, stats = tensors["prototype"], tensors["stats"]
    if proto.dtype != torch.float32 or tuple(proto.shape) != (meta.levels[-1][1],):
        raise BankError("bad_tensors", f"prototype is {proto.dtype} {tuple(proto.shape)}")
    if stats.dtype != torch.float32 or tuple(stats.shape) != (2,):
        raise BankError("bad_tensors", f"stats is {stats.dtype} {tuple(stats.shape)}")
    for name, t in (*((f"level{i}", l) for i, l in enumerate(levels)), ("prototype", proto)):
        norms = t.float().reshape(-1, t.shape[-1]).norm(dim=1)
        if not torch.isfinite(norms).all() or (norms - 1).abs().max() > UNIT_TOLERANCE:
            raise BankError("corrupt", f"{name} holds vectors that are not unit length")
    return ProductBank(tuple(levels), proto, stats)
