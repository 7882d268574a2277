"""Shared by the entry scripts: the ``${tinysam.asset:NAME}`` resolver and one-line reporting of user errors."""

from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import OmegaConf

from tinysam.assets import asset_path


def register_resolvers() -> None:
    """Register tinysam's resolvers once (entry scripts and tests call this before composing)."""
    if not OmegaConf.has_resolver("tinysam.asset"):
        OmegaConf.register_new_resolver("tinysam.asset", asset_path)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad paths, files, settings) into a one-line exit message."""
    from tinysam.data.coco import CocoFormatError
    from tinysam.data.embedding_store import StoreError
    from tinysam.data.transforms import ImageError
    from tinysam.models.checkpoint import CheckpointError

    try:
        yield
    except (CheckpointError, CocoFormatError, StoreError, ImageError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {type(err).__name__}: {err}") from None
