"""The evaluation stage: load the model, instantiate the chosen task from config, run it."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from tinysam.loader import load_model
from tinysam.runtime import resolve_device

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """``cfg.task`` is a partial taking ``model`` and ``output_dir``; returns what the task reports."""
    device = resolve_device(cfg.device)
    model = load_model(cfg.model, cfg.checkpoint, device)
    log.info("evaluating %s (%s) on %s", cfg.model, cfg.checkpoint or "random weights", device)
    task = instantiate(cfg.task)
    return task(model=model, output_dir=cfg.output_dir)
