"""Open-set detection from text: Hugging Face ``transformers``' Grounding DINO, loaded from a local folder only.

A caption ("dog. frisbee.") or a list of class names goes in; XYXY boxes in image pixels, the
phrase each box matched (its tokens above the text threshold, without special tokens and periods;
a box whose phrase is then empty names nothing and is dropped) and its score come out. A class
list longer than the text encoder's token limit is split into captions that fit, each detected
separately, and the results merged, so the 80 COCO or 1203 LVIS names work. Post-processing is the processor's own
``post_process_grounded_object_detection``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinysam.runtime import resolve_device

MODEL_IDS = ("IDEA-Research/grounding-dino-tiny", "IDEA-Research/grounding-dino-base")
MODEL_TYPE = "grounding-dino"
INSTALL = 'pip install "tinysam[grounded]"'


class DetectorError(ValueError):
    """A detector that cannot be used as configured; the message is one line naming the fix."""


@dataclass
class TextDetections:
    """Boxes found for a text prompt: (N, 4) XYXY pixels, (N,) scores and the phrase each box matched."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    phrases: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> TextDetections:
        """The detections at the indices (or boolean mask) ``keep``."""
        index = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=np.int64)
        return TextDetections(self.boxes[index], self.scores[index], [self.phrases[i] for i in index])

    @staticmethod
    def concat(parts: Sequence[TextDetections]) -> TextDetections:
        if not parts:
            return TextDetections()
        return TextDetections(
            np.concatenate([p.boxes for p in parts]).astype(np.float32),
            np.concatenate([p.scores for p in parts]).astype(np.float32),
            [phrase for p in parts for phrase in p.phrases],
        )


def check_threshold(name: str, value: float) -> float:
    """``value`` as a float in [0, 1], else a one-line error naming the argument."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise DetectorError(f"{name}={value} must lie in [0, 1]")
    return value


def class_names(text: str | Sequence[str]) -> list[str] | None:
    """The class names of a list prompt (stripped, lower-case), or ``None`` for a caption; empty text fails."""
    if isinstance(text, str):
        if not text.strip(" .\t\n"):
            raise DetectorError("text is empty: pass a caption such as text='dog. frisbee.' or a list of class names")
        return None
    names = [str(n).strip(" .\t\n").lower() for n in text]
    if not names or not all(names):
        raise DetectorError("text holds an empty class name: pass non-empty names such as ['dog', 'frisbee']")
    return names


def caption(names: Sequence[str]) -> str:
    """Grounding DINO's caption for class names: ``"dog . frisbee ."``."""
    return " . ".join(names) + " ."


def chunk_captions(text: str | Sequence[str], count_tokens, max_tokens: int) -> list[str]:
    """Captions that each fit in ``max_tokens`` tokens (``count_tokens(text)`` counts them, special ones included).

    A caption string is used as it is (lower-case, ending in a period); a list of class names is
    packed greedily, in order, into as few captions as fit.
    """
    names = class_names(text)
    if names is None:
        text = text.strip().lower()
        text = text if text.endswith(".") else text + "."
        if count_tokens(text) > max_tokens:
            raise DetectorError(
                f"the caption has {count_tokens(text)} tokens, more than the text encoder's {max_tokens}; "
                "pass the class names as a list, which tinysam splits into captions that fit"
            )
        return [text]
    chunks: list[list[str]] = [[]]
    for name in names:
        if count_tokens(caption([name])) > max_tokens:
            raise DetectorError(f"class name {name!r} alone is longer than the text encoder's {max_tokens} tokens")
        if chunks[-1] and count_tokens(caption([*chunks[-1], name])) > max_tokens:
            chunks.append([])
        chunks[-1].append(name)
    return [caption(chunk) for chunk in chunks]


def clean_phrase(text: str, special_tokens: Sequence[str]) -> str:
    """A decoded phrase without its special tokens and periods: ``"dog. [SEP]"`` -> ``"dog"``."""
    for token in special_tokens:
        text = text.replace(token, " ")
    return " ".join(text.replace(".", " ").split())


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DetectorError(f"text prompts need Hugging Face transformers: {INSTALL}") from None
    return transformers


def check_folder(folder: str | Path) -> Path:
    """``folder`` if it holds a saved Grounding DINO (``config.json`` of model type grounding-dino), else one line."""
    folder = Path(folder)
    get = (
        f"save one with transformers' save_pretrained (model and processor) from {' or '.join(MODEL_IDS)} on a "
        "machine with internet, and pass that folder; tinysam never downloads anything"
    )
    config = folder / "config.json"
    if not config.is_file():
        raise DetectorError(f"detector folder {folder} holds no config.json: {get}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise DetectorError(f"{config} is not a model config ({err}): {get}") from None
    if model_type != MODEL_TYPE:
        raise DetectorError(f"detector folder {folder} holds a {model_type!r} model, not {MODEL_TYPE!r}: {get}")
    return folder


class GroundingDino:
    """Grounding DINO (``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``) from a local folder.

    Args:
        folder: what ``save_pretrained`` wrote for the model and its processor.
        box_threshold: keep boxes whose best token score exceeds this (Grounded-SAM's 0.35).
        text_threshold: the tokens above this make a box's phrase (Grounded-SAM's 0.25).
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    def __init__(
        self, folder: str | Path, box_threshold: float = 0.35, text_threshold: float = 0.25, device: str = "cpu"
    ) -> None:
        self.box_threshold = check_threshold("box_threshold", box_threshold)
        self.text_threshold = check_threshold("text_threshold", text_threshold)
        transformers = _transformers()
        folder = check_folder(folder)
        transformers.logging.disable_progress_bar()
        self.processor = transformers.GroundingDinoProcessor.from_pretrained(folder, local_files_only=True)
        self.device = resolve_device(device)
        self.model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder, local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.max_tokens = int(self.model.config.max_text_len)

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray, text: str | Sequence[str]) -> TextDetections:
        """Boxes, scores and phrases for ``text`` in the RGB uint8 image ``rgb``; one pass per caption chunk."""
        image = Image.fromarray(rgb)
        parts = []
        for chunk in chunk_captions(text, self.count_tokens, self.max_tokens):
            inputs = self.processor(images=image, text=chunk, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            result = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[rgb.shape[:2]],
            )[0]
            found = TextDetections(
                result["boxes"].float().cpu().numpy().reshape(-1, 4),
                result["scores"].float().cpu().numpy(),
                [
                    clean_phrase(str(label), self.processor.tokenizer.all_special_tokens)
                    for label in result["text_labels"]
                ],
            )
            parts.append(found.select(np.array([bool(p) for p in found.phrases], dtype=bool)))  # no phrase: no object
        return TextDetections.concat(parts)
