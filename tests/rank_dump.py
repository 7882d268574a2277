"""A test-only callback: every rank writes its student weights at the end of training."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file


class RankDump(Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.student.state_dict().items()}
        save_file(state, self.dirpath / f"rank{trainer.global_rank}.safetensors")
