"""Compute a teacher's image embeddings once and store them: python precompute.py data=toyworld teacher=toy."""

import hydra
from omegaconf import DictConfig

from tinysam.config import one_line_errors, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="precompute")
def main(cfg: DictConfig) -> None:
    from tinysam.distill.precompute import run

    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    main()
