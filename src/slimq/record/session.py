"""The per-model link between compressed layers and their record file.

One :class:`RecordSession` belongs to one compressed model (never to the process). Layers tell it
when they train and report their factors when they run in eval mode; once every quantized layer
has reported after a train->eval switch, it writes the record file once (rank 0 only,
atomically). Training forwards never write.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, Optional, Set

import torch.distributed as dist

from .store import QuantFactors, Record, write_record

__all__ = ["RecordSession", "is_writer_rank"]


def is_writer_rank() -> bool:
    """True where record files may be written: single process, or rank 0 of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RecordSession:
    """Collects factors from the quantized layers of one model and writes them as one record.

    Attributes:
        path: the record file.
        record: the in-memory record (other features' entries included).
        expected: names of the quantized layers that must report before a write.
        rounds: how many complete eval rounds to write after each switch (batch_num, for
            searchN's accumulation); the first complete round always writes.
    """

    def __init__(self, path: str, record: Record, expected: Set[str], rounds: int = 1) -> None:
        self.path = os.fspath(path)
        self.record = record
        self.expected = set(expected)
        self.rounds = max(1, int(rounds))
        self.trained_since_write = True  # an eval right after create writes too
        self.phase = 0
        self._reports: Dict[str, int] = {}
        self._written_rounds = 0
        self.writes = 0
        self.sparse_layers: Dict[str, Any] = {}  # name -> layer with a 2:4 mask (its .sparsity)

    # -- called by layers -----------------------------------------------------------------
    def mark_training(self) -> None:
        self.trained_since_write = True

    def eval_round(self, name: str) -> int:
        """0-based index of the eval round ``name`` is in (starting a new phase if needed)."""
        if self.trained_since_write:
            self.trained_since_write = False
            self.phase += 1
            self._reports.clear()
            self._written_rounds = 0
        return self._reports.get(name, 0)

    def sparse_eval(self, name: str) -> None:
        """An eval forward of a 2:4 layer: in a model without quantized layers nobody else writes
        the (possibly re-chosen) masks, so write once per train->eval switch here."""
        if self.expected:
            return
        self.eval_round(name)
        if self._written_rounds == 0:
            self._written_rounds = 1
            self.flush()

    def wants_report(self, name: str) -> bool:
        """Whether layer ``name`` should compute and report factors on this eval forward."""
        return self.eval_round(name) < self.rounds and self._written_rounds < self.rounds

    def report(self, name: str, factors: QuantFactors) -> None:
        self.record.set_quant(name, factors)
        self._reports[name] = self._reports.get(name, 0) + 1
        if not self.expected:
            return
        complete = min(self._reports.get(n, 0) for n in self.expected)
        if complete > self._written_rounds:
            self._written_rounds = complete
            if complete == 1 or complete == self.rounds:
                self.flush()

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Collect reports without writing (save writes the record itself afterwards)."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def refresh_masks(self) -> None:
        for name, layer in self.sparse_layers.items():
            self.record.set_selective_mask(layer.sparsity.info(name))

    def flush(self) -> None:
        """Write the record now (rank 0 only), refreshing 2:4 masks from their layers first."""
        if getattr(self, "_deferred", False):
            return
        self.refresh_masks()
        if is_writer_rank():
            write_record(self.path, self.record)
            self.writes += 1

    def set_quant(self, name: str, factors: QuantFactors) -> None:
        self.record.set_quant(name, factors)

    def quant_factors(self, name: str) -> Optional[QuantFactors]:
        return self.record.quant(name)
