"""Evaluate a model: python evaluate.py [task=coco_instances|prompt_miou|everything] [model=... checkpoint=...]."""

import hydra
from omegaconf import DictConfig

from tinysam.config import one_line_errors, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from tinysam.eval.run import run

    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    main()
