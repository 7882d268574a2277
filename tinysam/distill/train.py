"""The training stage: compose the parts from config, make sure the teacher store exists, fit, report."""

from __future__ import annotations

import json
import logging
import resource
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from tinysam.data.embedding_store import EmbeddingStore, StoreError, read_manifest
from tinysam.distill.callbacks import CheckpointOnSigterm, DataWaitMonitor, ExportStudent
from tinysam.distill.module import VAL_KINDS, DistillModule
from tinysam.distill.precompute import teacher_store_spec
from tinysam.io import atomic_write_text
from tinysam.runtime import markdown_table

log = logging.getLogger(__name__)


def ensure_store(cfg: DictConfig) -> None:
    """Precompute the teacher store in this process when it is missing or unfinished (single process only)."""
    store = Path(cfg.store_dir)
    try:
        if read_manifest(store).get("complete"):
            return
    except StoreError:
        pass
    if cfg.trainer.get("devices", 1) not in (1, "1") or cfg.trainer.get("num_nodes", 1) != 1:
        raise StoreError(
            f"embedding store {store} is missing or unfinished; under DDP compute it first: "
            f"python precompute.py data={cfg.data.name} teacher=... trainer=ddp"
        )
    from tinysam.distill.precompute import run as precompute

    log.info("embedding store %s is missing: computing it now", store)
    precompute(
        OmegaConf.create(
            {
                "seed": cfg.seed,
                "data": OmegaConf.to_container(cfg.data, resolve=True),
                "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
                "trainer": {
                    "_target_": "lightning.pytorch.Trainer",
                    "accelerator": cfg.trainer.accelerator,
                    "devices": 1,
                    "logger": False,
                },
                "splits": ["train", "val"] if cfg.data.val_dirs else ["train"],
                "store_dir": str(store),
                "shard_size": 256,
                "batch_size": 8,
                "num_workers": 0,
            }
        )
    )


def resolve_ckpt_path(value: str | None, checkpoint_dir: Path) -> str | None:
    """The checkpoint to resume from: ``last`` must exist, ``auto`` resumes when one exists, else a path."""
    if value in (None, "null", ""):
        return None
    if value in ("last", "auto"):
        last = checkpoint_dir / "last.ckpt"
        if last.is_file():
            return str(last)
        if value == "auto":
            log.info("ckpt_path=auto: no checkpoint in %s yet, starting at step 0", checkpoint_dir)
            return None
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoint in {checkpoint_dir}: this run_name wrote none yet (never started, or "
            "stopped before its first checkpoint); check run_name, drop ckpt_path to start, or pass ckpt_path=auto"
        )
    if not Path(value).is_file():
        raise FileNotFoundError(f"ckpt_path={value}: no such file; pass a Lightning .ckpt, last or auto")
    return value


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process on ``device``: CUDA's peak allocation, or the peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def miou_table(metrics: dict[str, float]) -> str:
    """Markdown table of the held-out mIoUs that validation logged."""
    columns = ("val/{}_miou_gt", "val/{}_miou_teacher", "val/teacher_{}_miou_gt")
    rows = [[kind, *(metrics.get(c.format(kind)) for c in columns)] for kind in VAL_KINDS]
    return markdown_table(("prompt", "student vs GT", "student vs teacher", "teacher vs GT"), rows, digits=3)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns the final validation metrics (also written to ``results.json``)."""
    # DistillDataModule restores the data position itself (its state_dict), which Lightning cannot see.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning's own use of a torch API that newer torch deprecates: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath") or output_dir / "checkpoints")
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir)  # before any work: a bad path fails now
    teacher = instantiate(cfg.teacher) if cfg.get("teacher") else None
    if teacher is not None:
        ensure_store(cfg)
        spec = teacher_store_spec(teacher, cfg.teacher.name, cfg.teacher.checkpoint, cfg.seed)
        # refuses a store made with another teacher, checkpoint or image size, naming the field
        EmbeddingStore(cfg.store_dir, spec.teacher, spec.image_size, spec.teacher_checkpoint_sha256)
    # the student's init must not depend on whether a store was just made
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    student = instantiate(cfg.student)
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None and model.image_encoder.img_size != cfg.data.image_size:
            raise ValueError(
                f"{name} {getattr(model, 'arch', '')} takes {model.image_encoder.img_size} px but "
                f"data.image_size={cfg.data.image_size}; set data.image_size or pick another {name}"
            )
    datamodule = instantiate(cfg.data, store_dir=cfg.store_dir if teacher is not None else None)
    module: DistillModule = instantiate(
        cfg.module, student=student, teacher=teacher, loss=instantiate(cfg.distill), sampler=instantiate(cfg.prompts)
    )
    wait, preempted = DataWaitMonitor(), CheckpointOnSigterm()
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [
        ExportStudent(str(checkpoint_dir), made_from=f"train.py {cfg.run_name}"),
        wait,
        preempted,
    ]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, use_distributed_sampler=False)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        saved = f"saved {preempted.saved}" if preempted.saved else "no checkpoint callback, nothing saved"
        raise SystemExit(
            f"stopped by SIGTERM at step {trainer.global_step}: {saved}; resume with the same command and "
            "ckpt_path=last (or ckpt_path=auto)"
        ) from None
    metrics = {}
    if datamodule.val_dirs:
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    metrics["data_wait_fraction"] = wait.fraction  # timings: the numbers that vary run to run
    metrics["seconds_per_batch"] = wait.seconds_per_batch
    metrics["peak_memory_mib"] = peak_memory_mib(trainer.strategy.root_device)
    metrics["global_step"] = trainer.global_step
    for what, count in module.read.items():  # summed over processes; a resumed run counts from its resumption
        total = torch.tensor(float(count), device=trainer.strategy.root_device)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        metrics[f"train_{what}_read"] = int(total.item())
    metrics["threads"] = torch.get_num_threads()
    if trainer.is_global_zero:
        results = output_dir / "results.json"
        atomic_write_text(results, json.dumps(metrics, indent=1, sort_keys=True))
        if datamodule.val_dirs:
            print(f"\nheld-out mIoU ({cfg.run_name}, step {trainer.global_step}):\n{miou_table(metrics)}")
        else:
            print("\nno held-out mIoU: data.val_dirs is empty; pass data.val_dirs=[DIR] (held-out SA-1B folders)")
        print(f"data-wait fraction: {wait.fraction:.3f}")
        print(f"outputs in {output_dir}: student {checkpoint_dir / 'student.safetensors'}, metrics {results}")
    return metrics
