"""Operator feedback: confirmed-good parts' raw scores join a product's normal statistics.

One home for the compare-and-set write that ``inspector bank feedback`` and the live page's
"this part is good" both do: the statistics in the store are re-measured with the new scores
and written only if nobody (a worker's stream refresh, another operator) wrote in between;
otherwise it reads again, a few times.
"""

from __future__ import annotations

from typing import Sequence

from .normal import NormalStats
from .record import BankError, BankMeta
from .stores import BankStore

FEEDBACK_TRIES = 3  # compare-and-set retries when a worker writes the statistics at the same moment


def confirm_good(store: BankStore, line: str, meta: BankMeta, raw_scores: Sequence[float]) -> tuple[NormalStats, NormalStats]:
    """Add confirmed-good ``raw_scores`` (each scored against ``meta``'s bank version) to the
    product's statistics; returns ``(before, after)``. Workers serve them within one bank poll.

    Raises:
        BankError: ``busy`` when the statistics kept changing under the write.
    """
    for _ in range(FEEDBACK_TRIES):
        stored = store.normal(line, meta.product)
        current = stored if stored is not None and stored.bank_version == meta.version else NormalStats.from_meta(meta)
        new = current.with_feedback([float(r) for r in raw_scores])
        if store.put_normal(line, new, expect_revision=stored.revision if stored else 0, notify=True):
            return current, new
    raise BankError("busy", f"{meta.product}'s statistics kept changing while writing; try again")
