"""Training callbacks: student export, data-wait measurement, progress (terminal or log file) and preemption."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
    """Share of training wall time spent waiting for the next batch (logged as ``perf/data_wait_fraction``),
    and the wall time per batch after the first (compilation, allocator and cache warm-up excluded)."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.total = 0.0
        self.batches = 0
        self.first = 0.0
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
        took = now - self._batch_start + (self._batch_start - self._batch_end if self._batch_end else 0.0)
        self.total += took
        self.batches += 1
        if self.batches == 1:
            self.first = took
        self._batch_end = now
        if self.total > 0:
            pl_module.log("perf/data_wait_fraction", self.wait / self.total, batch_size=1)

    @property
    def fraction(self) -> float:
        return self.wait / self.total if self.total else 0.0

    @property
    def seconds_per_batch(self) -> float:
        """Mean wall time of a batch, data wait included, over the batches after the first (0 with fewer than 2)."""
        return (self.total - self.first) / (self.batches - 1) if self.batches > 1 else 0.0


class StepProgressBar(RichProgressBar):
    """Rich's progress bar, counting optimizer steps out of ``max_steps`` when the run is bounded by steps.

    Lightning's bar counts batches per epoch and reads ``Epoch 60/-2`` under ``max_epochs=-1``.
    """

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._by_steps():
            text = "Step"
        elif self.trainer.max_epochs in (None, -1):  # unbounded: no "/-2"
            text = f"Epoch {current_epoch}"
        else:
            return super()._get_train_description(current_epoch)
        return f"{text:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()


class StepLog(Callback):
    """Logs step, loss, seconds per step and ETA every ``every_n_steps`` steps when stdout is not a terminal.

    A run whose output goes to a file or a cluster log otherwise shows no progress at all
    (the progress bar draws only on terminals). ``always=True`` logs on terminals too.
    """

    def __init__(self, every_n_steps: int = 25, always: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.active = always or not sys.stdout.isatty()
        self._start: tuple[float, int] | None = None
        self._last_logged = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.active or step % self.every_n_steps or step == self._last_logged or self._start is None:
            return
        self._last_logged = step
        started, first_step = self._start
        per_step = (time.perf_counter() - started) / max(step - first_step, 1)
        loss = trainer.callback_metrics.get("train/loss_total")
        total = trainer.max_steps if trainer.max_steps > 0 else None
        eta = f", ETA {timedelta(seconds=round(per_step * (total - step)))}" if total else ""
        log.info(
            "step %d%s, loss %s, %.2f s/step%s",
            step,
            f"/{total}" if total else "",
            "-" if loss is None else f"{float(loss):.4f}",
            per_step,
            eta,
        )


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a cluster's preemption) saves ``last.ckpt`` where ``ckpt_path=last`` finds it.

    Lightning stops its loop at the next step on SIGTERM; the run then exits non-zero
    (``tinysam.distill.train.run``), and the same command with ``ckpt_path=last`` (or ``auto``)
    resumes exactly where it stopped.
    """

    saved: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.checkpoint_callback is None:
            return
        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        if path.is_symlink():  # save_last="link": replace the link, never write through it
            path.unlink()
        trainer.save_checkpoint(path)
        self.saved = path
        log.warning("SIGTERM at step %d: saved %s", trainer.global_step, path)
