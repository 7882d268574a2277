"""Training callbacks: export of the student alone and data-wait measurement."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback

from tinysam.models.checkpoint import save_checkpoint

log = logging.getLogger(__name__)


class ExportStudent(Callback):
    """Writes the student alone (safetensors + JSON metadata) at every checkpoint and at the end.

    Files: ``<dirpath>/student-step<N>.safetensors`` and, at the end, ``<dirpath>/student.safetensors``.
    """

    def __init__(self, dirpath: str, made_from: str = "tinysam distillation") -> None:
        self.dirpath = Path(dirpath)
        self.made_from = made_from

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        return save_checkpoint(
            pl_module.student,
            self.dirpath / name,
            made_from=self.made_from,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            teacher=getattr(pl_module.teacher, "arch", None),
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._export(trainer, pl_module, f"student-step{trainer.global_step}.safetensors")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._export(trainer, pl_module, "student.safetensors")
        if path is not None:
            log.info("student exported to %s", path)


class DataWaitMonitor(Callback):
    """Share of training wall time spent waiting for the next batch (logged as ``perf/data_wait_fraction``)."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.total = 0.0
        self._batch_end: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self.wait += now - self._batch_end
        self._batch_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.total += now - self._batch_start + (self._batch_start - self._batch_end if self._batch_end else 0.0)
        self._batch_end = now
        if self.total > 0:
            pl_module.log("perf/data_wait_fraction", self.wait / self.total, batch_size=1)

    @property
    def fraction(self) -> float:
        return self.wait / self.total if self.total else 0.0
