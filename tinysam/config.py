"""Shared by the entry points: the ``${tinysam.asset:NAME}`` resolver, one-line reporting of user errors, and
the ``key=value`` argument parser of the ``python -m tinysam.*`` commands."""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from omegaconf import OmegaConf

from tinysam.assets import asset_path


def register_resolvers() -> None:
    """Register tinysam's resolvers once (entry scripts and tests call this before composing)."""
    if not OmegaConf.has_resolver("tinysam.asset"):
        OmegaConf.register_new_resolver("tinysam.asset", asset_path)


def parse_keys(
    argv: Sequence[str],
    prog: str,
    usage: str,
    keys: Sequence[str],
    required: Sequence[str] = (),
    positional: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``key=value`` arguments of a ``python -m tinysam.<name>`` command, as a dict.

    The same style as the Hydra scripts' overrides (values are read by OmegaConf: ``port=8000`` is
    an int, ``images=[a,b]`` a list). Leading words without ``=`` fill the ``positional`` names in
    order. An unknown key, a missing required one or a stray word raises a one-line ``ValueError``
    naming it with the usage, which :func:`one_line_errors` prints as it prints the scripts' errors.
    """
    words = list(argv)
    args: dict[str, Any] = {}
    while words and "=" not in words[0] and len(args) < len(positional):
        args[positional[len(args)]] = words.pop(0)
    stray = [word for word in words if "=" not in word]
    if stray:
        raise ValueError(f"{prog}: {stray[0]!r} is not key=value; usage: {usage}")
    args.update(OmegaConf.to_container(OmegaConf.from_dotlist(words)))
    unknown = sorted(set(args) - set(keys))
    missing = [key for key in required if key not in args]
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"{' and '.join(missing)} missing"
        raise ValueError(f"{prog}: {problem}; usage: {usage}")
    return args


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad paths, files, settings) into a one-line exit message.

    Wraps every entry point: the four scripts as ``with one_line_errors():``, and the
    ``python -m tinysam.*`` mains as the decorator ``@one_line_errors()``. It also checks the
    command line's value types and tidies the logs (:func:`tidy_logging`).
    """
    from hydra.errors import InstantiationException

    tidy_logging()
    try:
        check_override_types()
        yield
    except Exception as err:
        # Hydra wraps what a constructor raises (a missing checkpoint of a teacher, say): judge the cause
        message = user_error(err.__cause__ if isinstance(err, InstantiationException) else err)
        if message is None:
            raise
        raise SystemExit(message) from None


def user_error(err: BaseException | None) -> str | None:
    """The one-line message of an error a user can fix, or ``None`` for a bug (which keeps its traceback).

    Every tinysam error type (``CheckpointError``, ``StoreError``, ``CocoFormatError``, ``ImageError``,
    ``PromptError``...) is a ``ValueError``; a missing file, a read-only or full folder is an ``OSError``.
    """
    if isinstance(err, (ValueError, FileNotFoundError)):
        return f"error: {type(err).__name__}: {_one_line(err)}"
    if isinstance(err, OSError):  # a read-only or full output folder, a permission: errno and file name say which
        where = f" ({err.filename})" if err.filename else ""
        return (
            f"error: {type(err).__name__}: {err.strerror or err}{where}; check that the folder is writable "
            "and its disk has space"
        )
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def check_override_types() -> None:
    """Refuse a command-line override that puts text where the config holds a number, naming key and default.

    Hydra already refuses misspelt keys; a value of the wrong type would otherwise surface as a
    TypeError deep inside Lightning. Only overrides whose value is non-numeric text are checked,
    each against the config composed without it. Outside a Hydra run this does nothing.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    composed = None
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith(("~", "+")) or not _is_text(value):
            continue
        if composed is None:
            composed = compose(config_name=hydra_cfg.job.config_name, overrides=overrides)
        if not isinstance(OmegaConf.select(composed, key), str):
            continue  # a config group or a structured value, not a plain text field
        base = compose(config_name=hydra_cfg.job.config_name, overrides=[o for o in overrides if o != override])
        default = OmegaConf.select(base, key)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            raise ValueError(
                f"override {override}: {key} takes a number ({type(default).__name__}; the config has {default}); "
                f"give a number, for example {key}={default}"
            )


def _is_text(value: str) -> bool:
    """Whether Hydra reads an override's value as text (not a number, bool or null)."""
    if value.strip().lower() in ("null", "true", "false"):
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's "Tip: try installing <product>" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def tidy_logging() -> None:
    """One copy of each log line: Lightning's loggers hand their records to the root's handlers (Hydra's).

    Lightning adds its own console handler when it is imported before logging is configured,
    so every line appeared twice; its product tips are dropped.
    """
    for name in list(logging.root.manager.loggerDict):
        if name == "lightning" or name.startswith(("lightning.", "lightning_fabric", "pytorch_lightning")):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in tips.filters):
        tips.addFilter(_NoAdvertisements())
