"""Training data for distillation: SA-1B-layout images, their masks, and cached teacher embeddings.

The order of samples is a pure function of (seed, epoch, rank), and the datamodule's
checkpoint state records how far into the epoch training got, so a run resumed from
a mid-epoch checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tinysam.data.embedding_store import EmbeddingStore
from tinysam.data.sa1b import SA1BDataset, SkippedSample, SkipReport, collate_samples, split_skipped
from tinysam.data.toyworld import ToyWorldConfig, generate

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded by rank, that can start part-way into an epoch.

    When shuffling it yields ``epoch * size + index``, so that datasets in worker processes,
    which never see ``set_epoch``, still know the epoch (:class:`EmbeddedSamples` decodes it).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.per_rank = size // world_size
        self.epoch = 0
        self.resume_epoch, self.resume_offset = -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, offset: int) -> None:
        """Skip the first ``offset`` samples of ``epoch`` (later epochs start at their beginning)."""
        self.resume_epoch, self.resume_offset = epoch, offset

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order + (self.epoch * self.size if self.shuffle else 0)
        shard = order[self.rank :: self.world_size][: self.per_rank].tolist()
        # Lightning may create the iterator of the resumed epoch more than once: skip every time.
        start = self.resume_offset if self.epoch == self.resume_epoch else 0
        return iter(shard[start:])


class EmbeddedSamples(Dataset):
    """SA-1B samples with their cached teacher embedding (``teacher_embedding``) when a store is given.

    Indices are ``epoch * len(self) + index`` (see :class:`ResumableSampler`): masks are chosen per epoch.
    """

    def __init__(self, samples: SA1BDataset, store: EmbeddingStore | None) -> None:
        self.samples, self.store = samples, store

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        epoch, index = divmod(index, len(self.samples))
        sample = self.samples.load(index, epoch)
        if isinstance(sample, SkippedSample) or self.store is None:
            return sample
        if sample["name"] not in self.store:
            return SkippedSample(sample["name"], f"no teacher embedding: {sample['name']} is not in {self.store.path}")
        sample["teacher_embedding"] = self.store[sample["name"]]
        return sample


def collate_with_embeddings(batch: list) -> dict[str, Any]:
    """:func:`collate_samples` plus the stacked ``teacher_embedding`` when the samples have one."""
    out = collate_samples(batch)
    samples, _ = split_skipped(batch)
    if samples and "teacher_embedding" in samples[0]:
        out["teacher_embedding"] = torch.stack([s["teacher_embedding"] for s in samples])
    return out


class DistillDataModule(L.LightningDataModule):
    """Images + SA-1B masks (+ cached teacher embeddings) for training and validation.

    Args:
        name: data set name (used in store paths).
        train_dirs, val_dirs: SA-1B-layout folders.
        image_size: model input side; must equal the student's and the teacher's.
        store_dir: embedding store of the teacher (``None`` when no teacher is used).
        toyworld: when given, the toy world is generated (or reused) before reading.
        batch_size, num_workers, max_masks, min_mask_area, seed: as named.
    """

    def __init__(
        self,
        name: str,
        train_dirs: Sequence[str],
        val_dirs: Sequence[str],
        image_size: int,
        store_dir: str | None = None,
        toyworld: ToyWorldConfig | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        max_masks: int = 16,
        min_mask_area: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"data.batch_size={batch_size} and data.num_workers={num_workers}: "
                "need batch_size >= 1, num_workers >= 0"
            )
        self.name = name
        self.train_dirs, self.val_dirs = list(train_dirs), list(val_dirs)
        self.image_size, self.store_dir, self.toyworld = image_size, store_dir, toyworld
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_masks, self.min_mask_area, self.seed = max_masks, min_mask_area, seed
        self.skips = {"train": SkipReport("train data"), "val": SkipReport("val data")}
        self._resume: tuple[int, int] | None = None

    def prepare_data(self) -> None:
        if self.toyworld is not None:
            generate(self.toyworld)

    def _dataset(self, dirs: list[str], store: EmbeddingStore | None) -> EmbeddedSamples:
        samples = SA1BDataset(
            dirs, self.image_size, max_masks=self.max_masks, min_mask_area=self.min_mask_area, seed=self.seed
        )
        return EmbeddedSamples(samples, store)

    def setup(self, stage: str) -> None:
        store = None
        if self.store_dir is not None:
            store = EmbeddingStore(self.store_dir, image_size=self.image_size)
        self.train_set = self._dataset(self.train_dirs, store)
        self.val_set = self._dataset(self.val_dirs, store) if self.val_dirs else None
        self.train_sampler = ResumableSampler(len(self.train_set), self.seed, *self._rank_and_world())
        if self._resume is not None:
            self.train_sampler.resume_at(*self._resume)

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_with_embeddings,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        sampler = ResumableSampler(len(self.val_set), 0, *self._rank_and_world(), shuffle=False)
        return self._loader(self.val_set, sampler, 4)

    def state_dict(self) -> dict[str, int]:
        """How far into the current epoch training got (batches whose step ran)."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume = (state["epoch"], state["batches"] * self.batch_size)
            log.info("resuming data at epoch %d, batch %d", state["epoch"], state["batches"])
            if hasattr(self, "train_sampler"):  # Lightning restores the datamodule after setup()
                self.train_sampler.resume_at(*self._resume)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Count the samples each batch dropped (runs in the main process, whatever the workers), then drop their
        records, which are not tensors to move to the device."""
        stage = "val" if self.trainer is not None and not self.trainer.training else "train"
        self.skips[stage].add(len(batch.get("name", [])), batch["skipped"])
        return {key: value for key, value in batch.items() if key != "skipped"}

    def end_pass(self, stage: str) -> str:
        """Log and reset the skip summary of a finished training or validation pass."""
        return self.skips[stage].end_pass()
