"""OmegaConf resolvers used by the configs: ``${tinysam.asset:NAME}`` is the path of a shipped file."""

from omegaconf import OmegaConf

from tinysam.assets import asset_path


def register_resolvers() -> None:
    """Register tinysam's resolvers once (entry scripts and tests call this before composing)."""
    if not OmegaConf.has_resolver("tinysam.asset"):
        OmegaConf.register_new_resolver("tinysam.asset", asset_path)
