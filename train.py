"""Distil a TinyViT student from a frozen SAM teacher: python train.py [experiment=...] [trainer=ddp]."""

import hydra
from omegaconf import DictConfig

from tinysam.config import one_line_errors, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from tinysam.distill.train import run

    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    main()
