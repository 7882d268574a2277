"""Loading official SAM / TinySAM / MobileSAM checkpoints and saving our own.

Official checkpoints are PyTorch pickles read with ``torch.load(weights_only=True)``;
ours are safetensors with a JSON sidecar of metadata. Loading is strict, and every
failure is a single :class:`CheckpointError` line naming the file and the fix.
"""

from __future__ import annotations

import json
import pickle
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinysam.io import atomic_write
from tinysam.models.registry import architecture_builders
from tinysam.version import __version__

WHERE_TO_GET_WEIGHTS = (
    "official weights are published by their authors: SAM ViT-H/L/B at "
    "https://github.com/facebookresearch/segment-anything#model-checkpoints, TinySAM at "
    "https://github.com/xinghaochen/TinySAM (Releases), MobileSAM at "
    "https://github.com/ChaoningZhang/MobileSAM (weights/mobile_sam.pt); "
    "tinysam never downloads anything, so fetch the file yourself and pass its path"
)
WRAPPER_KEYS = ("model", "state_dict")
SHOWN_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the fix."""


def metadata_path(path: str | Path) -> Path:
    """The JSON sidecar that :func:`save_checkpoint` writes next to ``path``."""
    return Path(path).with_suffix(".json")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch pickle (bare or under ``model``/``state_dict``)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a weights file: pass the .pth or .safetensors file inside it "
            "(a quantized model folder must hold the quantization.json that quantize.py writes)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {WHERE_TO_GET_WEIGHTS}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # any failure of the reader is a file we cannot use
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a safetensors file ({_first_line(err)}); "
                "re-export it or re-download it"
            ) from None
    return _unwrap(_torch_load(path), path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # the unpickler met a class or function: code, not tensors
            raise CheckpointError(
                f"checkpoint {path} is a pickle that needs code to load (for example a whole pickled "
                "module, as the official Q-TinySAM file is); tinysam only loads plain tensors: in the "
                "environment that made it, run torch.save(model.state_dict(), 'weights.pth') and load that"
            ) from None
        raise _not_a_checkpoint(path, err) from None
    except Exception as err:  # torch's unpickler fails on foreign bytes with any error type (KeyError, IndexError...)
        raise _not_a_checkpoint(path, err) from None


def _not_a_checkpoint(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated or not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}); "
        "pass a .pth saved with torch.save or a .safetensors file, or re-download it"
    )


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (expected a mapping of tensor names to tensors, bare or "
            f"under one of {WRAPPER_KEYS}); pass the model's weights file"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


@lru_cache(maxsize=None)
def _known_signatures() -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of every registered architecture, built on the meta device (no memory, no time)."""
    signatures = {}
    with torch.device("meta"):
        for name, build in architecture_builders().items():
            signatures[name] = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    return signatures


def closest_architecture(state: Mapping[str, torch.Tensor]) -> tuple[str, float]:
    """The registered architecture whose keys and shapes best match ``state``, with the matching share."""
    given = {k: tuple(v.shape) for k, v in state.items()}
    best, best_score = "", -1.0
    for name, signature in _known_signatures().items():
        same = sum(1 for k, shape in given.items() if signature.get(k) == shape)
        score = same / max(len(given), len(signature))
        if score > best_score:
            best, best_score = name, score
    return best, best_score


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong_shape):
        return
    arch = getattr(model, "arch", type(model).__name__)
    guess, share = closest_architecture(state)
    looks_like = (
        f"its keys look like {guess!r} ({share:.0%} of keys and shapes match)"
        if share > 0.2
        else ("its keys match no architecture tinysam knows")
    )
    details = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" (+{len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else ""
            details.append(f"{len(items)} {label}: {', '.join(items[:SHOWN_KEYS])}{more}")
    raise CheckpointError(
        f"checkpoint {path} does not fit architecture {arch!r}: {looks_like}; {'; '.join(details)}; "
        "build the matching architecture or pass the right checkpoint"
    )


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` strictly (keys and shapes must match exactly); returns ``model``."""
    state = read_state_dict(path)
    check_compatible(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata saved beside a checkpoint, or ``{}`` for official checkpoints without one."""
    sidecar = metadata_path(path)
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"metadata {sidecar} is not valid JSON ({err}); delete or fix it") from None


def save_checkpoint(
    model: nn.Module, path: str | Path, weights_dtype: torch.dtype | None = None, **metadata: Any
) -> Path:
    """Write ``model``'s state dict as safetensors plus a JSON sidecar of metadata; returns the path.

    The metadata records the architecture name (from the registry), the image size
    and whatever the caller passes (for example ``made_from=...``); values must be JSON-serialisable.
    ``weights_dtype=torch.float16`` stores the floating-point parameters in half precision (half the
    file; loading casts them back to the model's dtype); buffers such as SAM's pixel mean stay exact.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint: {path} must end in .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    info: dict[str, Any] = {"format": "tinysam-checkpoint", "tinysam_version": __version__}
    if weights_dtype is not None:
        for name, param in model.named_parameters():
            if param.is_floating_point():
                state[name] = state[name].to(weights_dtype)
        info["weights_dtype"] = str(weights_dtype).removeprefix("torch.")
    if hasattr(model, "arch"):
        info["arch"] = model.arch
    encoder = getattr(model, "image_encoder", None)
    if encoder is not None and hasattr(encoder, "img_size"):
        info["image_size"] = int(encoder.img_size)
    info.update(metadata)
    text = json.dumps(info, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"tinysam": text}))
    atomic_write(metadata_path(path), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path
