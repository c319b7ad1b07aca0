"""Reference banks as tensors: per-product shots, prototypes, coreset and padded stacking.

A product's bank is every position of its k shots, per level, L2-normalised and stored in fp16
(ResAD section 3.2). Banks enter the model's ``forward`` as tensors stacked over products and
padded to a fixed capacity by repeating real vectors, which can never change a nearest-neighbour
maximum, so a bank change needs no recompilation (DESIGN section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

BANK_DTYPE = torch.float16


Coreset = int | Sequence[int | None] | None  # one cap for every level, one per level, or None (no cap)


def level_caps(coreset: Coreset, levels: int) -> tuple[int | None, ...]:
    """The cap on vectors of each of ``levels`` levels: ``coreset`` as one cap for every level, a
    cap per level, or ``None`` (every position kept). A cap of 0 or ``None`` keeps every position."""
    if coreset is None or isinstance(coreset, int):
        caps: tuple[int | None, ...] = (coreset,) * levels
    else:
        caps = tuple(coreset)
        if len(caps) != levels:
            raise ValueError(f"a coreset cap per level needs {levels} caps, got {len(caps)}: {list(caps)}")
    if any(c is not None and (not isinstance(c, int) or c < 0) for c in caps):
        raise ValueError(f"coreset caps must be whole numbers >= 0, got {list(caps)}")
    return tuple(c or None for c in caps)


def parse_coreset(text: str) -> int | tuple[int | None, ...] | None:
    """A command-line coreset: ``1024`` (every level), ``4096,1024,1024`` (per level), ``all``
    or ``0`` (every position kept; ``all`` also per level)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        caps = [None if p.lower() in ("all", "none") else int(p) for p in parts]
    except ValueError:
        raise ValueError(f"a coreset is a whole number, 'all', or one of them per level separated by commas, got {text!r}") from None
    if any(c is not None and c < 0 for c in caps):
        raise ValueError(f"coreset caps must be >= 0, got {text!r}")
    caps = [c or None for c in caps]
    return caps[0] if len(caps) == 1 else tuple(caps)


def describe_coreset(coreset: Coreset) -> str:
    """``1024``, ``4096/1024/1024`` or ``off``, as the CLI prints it."""
    if coreset is None or isinstance(coreset, int):
        return str(coreset) if coreset else "off"
    return "/".join(str(c) if c else "all" for c in coreset)


class BankTensors(NamedTuple):
    """Stacked banks of ``P`` products, the model's second input.

    Attributes:
        features: per level ``(P, N_l, C_l)`` fp16, L2-normalised, padded to capacity ``N_l``.
        prototypes: ``(P, C_last)`` float32 unit vectors for routing.
        stats: ``(P, 2)`` float32 bank-mode normal map ``(u, gamma)`` per product.
    """

    features: tuple[torch.Tensor, ...]
    prototypes: torch.Tensor
    stats: torch.Tensor


@dataclass(frozen=True)
class ProductBank:
    """One product's reference bank.

    Attributes:
        features: per level ``(N_l, C_l)`` fp16 unit vectors.
        prototype: ``(C_last,)`` float32 unit vector.
        stats: ``(2,)`` float32 bank-mode ``(u, gamma)``; NaN until measured.
    """

    features: tuple[torch.Tensor, ...]
    prototype: torch.Tensor
    stats: torch.Tensor

    def with_stats(self, u: float, gamma: float) -> "ProductBank":
        """A copy carrying bank-mode statistics."""
        return ProductBank(self.features, self.prototype, torch.tensor([u, gamma]))

    @property
    def nbytes(self) -> int:
        """Bytes of the bank's tensors."""
        tensors = (*self.features, self.prototype, self.stats)
        return sum(t.numel() * t.element_size() for t in tensors)


def position_vectors(level: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` features -> ``(B, H*W, C)`` unit vectors (float32)."""
    return F.normalize(level.float().flatten(2).transpose(1, 2), dim=-1)


def prototype_of(level: torch.Tensor) -> torch.Tensor:
    """Mean-pooled unit level features of ``(B, C, H, W)`` -> ``(B, C)`` unit vectors."""
    return F.normalize(position_vectors(level).mean(1), dim=-1)


def build_bank(
    features: Sequence[torch.Tensor], coreset: Coreset = None, seed: int = 0
) -> ProductBank:
    """Build a product bank from the backbone features of its k shots.

    Args:
        features: per level ``(k, C, H, W)`` backbone features of the shots.
        coreset: cap on vectors per level (greedy k-center), one for all levels or one per level
            (:func:`level_caps`); ``None`` keeps all.
        seed: picks the coreset's first centre.
    """
    levels = []
    for level, cap in zip(features, level_caps(coreset, len(features))):
        vectors = _capped(position_vectors(level).reshape(-1, level.shape[1]), cap, seed)  # (k*H*W, C)
        levels.append(vectors.to(BANK_DTYPE).contiguous())
    proto = F.normalize(prototype_of(features[-1]).mean(0), dim=0)
    return ProductBank(tuple(levels), proto, torch.full((2,), float("nan")))


def greedy_k_center(vectors: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``count`` vectors chosen by greedy farthest-point (k-center) selection.

    For unit vectors (every bank and prototype) the squared distance is ``2 - 2 x.c``, so the
    farthest point is the one whose highest similarity to a chosen centre is lowest: one
    row-times-matrix product and one in-place maximum per centre. Other vectors
    update squared distances as ``|x|^2 - 2 x.c + |c|^2``. Either way no ``(N, C)`` difference is
    formed, which is what makes a bank of 50 images fast.
    """
    vectors = vectors.float().contiguous()
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(vectors.shape[0], (1,), generator=gen))
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = first
    norms = vectors.pow(2).sum(1)
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        columns = vectors.t().contiguous()  # (C, N): a row-times-matrix product is the fast one here
        best = vectors[first] @ columns  # highest similarity of each vector to any chosen centre
        for i in range(1, count):
            nxt = int(best.argmin())
            chosen[i] = nxt
            torch.maximum(best, columns[:, nxt] @ columns, out=best)
        return chosen
    dist = norms - 2 * (vectors @ vectors[first]) + norms[first]
    for i in range(1, count):
        nxt = int(dist.argmax())
        chosen[i] = nxt
        torch.minimum(dist, norms - 2 * (vectors @ vectors[nxt]) + norms[nxt], out=dist)
    return chosen


def _capped(vectors: torch.Tensor, coreset: int | None, seed: int) -> torch.Tensor:
    if coreset is not None and vectors.shape[0] > coreset:
        return vectors[greedy_k_center(vectors, coreset, seed)]
    return vectors


def build_fold_banks(
    features: Sequence[torch.Tensor], folds: Sequence[int], coreset: Coreset = None,
    seed: int = 0,
) -> tuple[ProductBank, list[ProductBank]]:
    """A product's bank from all its images, and per fold a bank of the images outside that fold.

    Each fold's positions are first reduced to a coreset of their own; the served bank is the
    coreset of the union of every fold's, and fold ``f``'s bank the coreset of the union of the
    others' (a two-level, composable k-center). The banks that cross-score the product's images
    are therefore built exactly like the served one, from all but one fold, and the whole costs
    about one k-center pass over the product's positions.

    Args:
        features: per level ``(N, C, H, W)`` backbone features of the product's N images.
        folds: the fold (``0..K-1``) of each image; K >= 2.
        coreset: cap on vectors per level, one for all levels or one per level; ``None`` keeps
            every position.
    """
    caps = level_caps(coreset, len(features))
    fold_ids = sorted(set(folds))
    member = torch.as_tensor(list(folds))
    per_fold: list[list[torch.Tensor]] = [[] for _ in fold_ids]
    for level, cap in zip(features, caps):
        for j, f in enumerate(fold_ids):
            vectors = position_vectors(level[member == f]).reshape(-1, level.shape[1])
            per_fold[j].append(_capped(vectors, cap, seed))

    def union(parts: Sequence[int]) -> ProductBank:
        levels = [_capped(torch.cat([per_fold[j][l] for j in parts]), caps[l], seed).to(BANK_DTYPE).contiguous()
                  for l in range(len(features))]
        rows = torch.cat([torch.nonzero(member == fold_ids[j]).flatten() for j in parts])
        proto = F.normalize(prototype_of(features[-1][rows]).mean(0), dim=0)
        return ProductBank(tuple(levels), proto, torch.full((2,), float("nan")))

    everything = list(range(len(fold_ids)))
    return union(everything), [union([j for j in everything if j != i]) for i in everything]


def stack_banks(
    banks: Sequence[ProductBank], capacity: Sequence[int] | None = None
) -> BankTensors:
    """Stack product banks, padding each level to ``capacity`` by repeating real vectors.

    Args:
        banks: at least one product bank; all must have the same levels and channels.
        capacity: vectors per level; defaults to the largest bank's count per level.
    """
    if not banks:
        raise ValueError("at least one product bank is needed")
    n_levels = len(banks[0].features)
    if capacity is None:
        capacity = [max(b.features[l].shape[0] for b in banks) for l in range(n_levels)]
    stacked = []
    for l in range(n_levels):
        rows = []
        for b in banks:
            n = b.features[l].shape[0]
            if n > capacity[l]:
                raise ValueError(f"level {l} bank has {n} vectors, over capacity {capacity[l]}")
            rows.append(b.features[l][torch.arange(capacity[l]) % n])
        stacked.append(torch.stack(rows))
    protos = torch.stack([b.prototype for b in banks])
    stats = torch.stack([b.stats.float() for b in banks])
    return BankTensors(tuple(stacked), protos, stats)


def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, chunk: int, query_tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine nearest neighbour of each query among the bank, by chunked batched matmul.

    Never forms a ``(B, Q, N, C)`` broadcast; peak memory is ``B * query_tile * chunk``
    similarities: the queries are taken ``query_tile`` at a time (None: all at once), the bank
    ``chunk`` vectors at a time.

    Args:
        queries: ``(B, Q, C)`` unit vectors.
        bank: ``(B, N, C)`` unit vectors (any float dtype; the engine hands it over in the
            queries' dtype, so no conversion happens here).
        chunk: bank vectors per matmul.
        query_tile: queries per matmul.

    Returns:
        ``(similarity, match)``: ``(B, Q)`` best cosine and ``(B, Q, C)`` matched vectors.
    """
    bank = bank.to(queries.dtype)
    q = queries.shape[1]
    tile = q if query_tile is None else query_tile
    sims, idxs = [], []
    for qs in range(0, q, tile):
        sim, idx = _best_match(queries[:, qs : qs + tile], bank, chunk)
        sims.append(sim)
        idxs.append(idx)
    best_sim = sims[0] if len(sims) == 1 else torch.cat(sims, dim=1)
    best_idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs, dim=1)
    channels = queries.shape[2]
    match = torch.gather(bank, 1, best_idx.unsqueeze(-1).expand(-1, -1, channels))
    return best_sim, match


def _best_match(queries: torch.Tensor, bank: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, q)`` best cosine and index of ``(B, q, C)`` queries among ``(B, N, C)`` bank vectors."""
    best_sim, best_idx = None, None
    for start in range(0, bank.shape[1], chunk):
        sims = torch.bmm(queries, bank[:, start : start + chunk].transpose(1, 2))  # (B, q, n)
        sim, idx = sims.max(dim=2)
        idx = idx + start
        if best_sim is None:
            best_sim, best_idx = sim, idx
        else:
            better = sim > best_sim
            best_sim = torch.where(better, sim, best_sim)
            best_idx = torch.where(better, idx, best_idx)
    return best_sim, best_idx


def bank_vectors(model, images: int, coreset) -> tuple[int, ...]:
    """Vectors per level (``model`` an ``InspectionModel``: its ``grids``) of a bank of ``images`` images under ``coreset``: every position, or the
    level's cap."""
    full = [images * h * w for h, w in model.grids]
    return tuple(min(f, cap) if cap else f for f, cap in zip(full, level_caps(coreset, len(full))))


def bank_capacity(model) -> tuple[int, ...]:
    """Vectors per level a bank may hold: every position of the bank's most ``images``, or the
    coreset cap of that level."""
    return bank_vectors(model, model.cfg.bank.images, model.cfg.bank.coreset)
