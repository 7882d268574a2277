"""Post-training quantization: python quantize.py [checkpoint=... model=...] [weight_bits=8 act_bits=8] [out=DIR]."""

import hydra
from omegaconf import DictConfig

from tinysam.config import one_line_errors, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="quantize")
def main(cfg: DictConfig) -> None:
    from tinysam.loader import load_model
    from tinysam.quant.run import run
    from tinysam.runtime import resolve_device

    with one_line_errors():
        run(cfg, load_model(cfg.model, cfg.checkpoint, resolve_device(cfg.device)))


if __name__ == "__main__":
    main()
