"""The teacher embedding pass: Lightning ``predict`` over a dataset, each rank writing its own shards."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from omegaconf import DictConfig
from segment_anything.modeling import Sam
from torch.utils.data import DataLoader

from tinysam.data.embedding_store import (
    ShardWriter,
    StoreSpec,
    clean_partial,
    done_names,
    finalize,
    open_for_writing,
)
from tinysam.data.sa1b import SA1BImages, SkipReport, collate_images
from tinysam.data.toyworld import generate
from tinysam.io import file_sha256

log = logging.getLogger(__name__)


def teacher_store_spec(teacher: Sam, name: str, checkpoint: str | None, seed: int) -> StoreSpec:
    """The store spec of ``teacher``: what a store of its embeddings must record and match."""
    prompt = teacher.prompt_encoder
    return StoreSpec(
        teacher=name,
        teacher_checkpoint_sha256=file_sha256(checkpoint) if checkpoint else f"random-init:seed={seed}",
        image_size=int(teacher.image_encoder.img_size),
        pixel_mean=tuple(round(v, 4) for v in teacher.pixel_mean.flatten().tolist()),
        pixel_std=tuple(round(v, 4) for v in teacher.pixel_std.flatten().tolist()),
        record_shape=(prompt.embed_dim, *prompt.image_embedding_size),
    )


class TeacherEmbedder(L.LightningModule):
    """Runs the frozen teacher's image encoder in ``predict``."""

    def __init__(self, teacher: Sam) -> None:
        super().__init__()
        self.teacher = teacher

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch["name"]:
            return None
        return self.teacher.image_encoder(batch["image"])


class ImagesDataModule(L.LightningDataModule):
    """The images not yet in the store, read on every rank after the process group is up."""

    def __init__(self, roots: Sequence[str], spec: StoreSpec, store_dir: str, batch_size: int, num_workers: int):
        super().__init__()
        self.roots, self.spec, self.store_dir = list(roots), spec, store_dir
        self.batch_size, self.num_workers = batch_size, num_workers

    def setup(self, stage: str) -> None:
        done = done_names(self.store_dir)
        self.dataset = SA1BImages(self.roots, self.spec.image_size, done, self.spec.pixel_mean, self.spec.pixel_std)
        log.info("precompute: %d images to embed, %d already in %s", len(self.dataset), len(done), self.store_dir)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            persistent_workers=False,
        )


class StoreWriter(BasePredictionWriter):
    """Appends each batch's embeddings to this rank's shards; flushes the last shard at the end."""

    def __init__(self, store_dir: str, spec: StoreSpec, shard_size: int) -> None:
        super().__init__(write_interval="batch")
        self.store_dir, self.spec, self.shard_size = store_dir, spec, shard_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # nobody writes before the post-setup barrier
            clean_partial(self.store_dir)
        self.writer = ShardWriter(self.store_dir, trainer.global_rank, self.spec, self.shard_size)
        self.skips = SkipReport(f"precompute rank {trainer.global_rank}")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.skips.add(len(batch["name"]), batch["skipped"])
        if prediction is not None:
            for name, embedding in zip(batch["name"], prediction):
                self.writer.add(name, embedding)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.flush()
        self.skips.end_pass()


class ImagesPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar (with ETA) plus the images/s of the pass."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if batch_idx == 0:
            self._start, self._images = time.perf_counter(), 0
        self._images += len(batch["name"])
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and batch_idx > 0:
            self.predict_progress_bar.set_postfix(img_s=f"{self._images / elapsed:.1f}")


def run(cfg: DictConfig) -> Path:
    """Embed ``cfg.splits`` of ``cfg.data`` with ``cfg.teacher`` into ``cfg.store_dir``; returns the store."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.data.get("toyworld"):
        generate(instantiate(cfg.data.toyworld))
    teacher = instantiate(cfg.teacher)
    spec = teacher_store_spec(teacher, cfg.teacher.name, cfg.teacher.checkpoint, cfg.seed)
    open_for_writing(cfg.store_dir, spec)
    roots = [d for split in cfg.splits for d in cfg.data[f"{split}_dirs"]]
    datamodule = ImagesDataModule(roots, spec, cfg.store_dir, cfg.batch_size, cfg.num_workers)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[StoreWriter(cfg.store_dir, spec, cfg.shard_size), ImagesPerSecondBar()]
    )
    trainer.predict(TeacherEmbedder(teacher), datamodule=datamodule, return_predictions=False)
    trainer.strategy.barrier("store-written")
    if trainer.is_global_zero:
        manifest = finalize(cfg.store_dir)
        log.info(
            "embedding store %s: %d records in %d shards", cfg.store_dir, manifest["count"], len(manifest["shards"])
        )
    return Path(cfg.store_dir)
