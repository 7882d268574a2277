"""Checkpoint loading and saving: round trips, wrappers, and one test per error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tinysam import CheckpointError, build_student, load_checkpoint, save_checkpoint
from tinysam.models.checkpoint import closest_architecture, metadata_path, read_metadata


def _states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_round_trip_with_metadata(tmp_path, toy_student):
    path = save_checkpoint(toy_student, tmp_path / "ckpt" / "student.safetensors", made_from="unit test", step=3)
    assert path.is_file() and metadata_path(path).is_file()
    meta = read_metadata(path)
    assert meta["arch"] == "tinyvit_toy" and meta["image_size"] == 256
    assert meta["made_from"] == "unit test" and meta["step"] == 3
    torch.manual_seed(1)
    fresh = build_student("tinyvit_toy")
    assert not _states_equal(fresh.state_dict(), toy_student.state_dict())
    load_checkpoint(fresh, path)
    assert _states_equal(fresh.state_dict(), toy_student.state_dict())
    assert not list(tmp_path.glob("ckpt/*.tmp")), "temporary files left behind"


def test_half_precision_weights_keep_buffers_exact(tmp_path, toy_student):
    path = save_checkpoint(toy_student, tmp_path / "half.safetensors", weights_dtype=torch.float16)
    assert read_metadata(path)["weights_dtype"] == "float16"
    fresh = load_checkpoint(build_student("tinyvit_toy"), path)
    params, originals = dict(toy_student.named_parameters()), toy_student.state_dict()
    for name, value in fresh.state_dict().items():
        original = originals[name]
        assert value.dtype == original.dtype, name  # loading casts back to the model's dtype
        if name in params and original.is_floating_point():
            assert torch.equal(value, original.half().float()), name
        else:
            assert torch.equal(value, original), name  # buffers (pixel mean and std, ...) are exact
    assert path.stat().st_size < 0.6 * save_checkpoint(toy_student, tmp_path / "full.safetensors").stat().st_size


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "ddp"])
def test_official_pth_layouts_load(tmp_path, toy_student, wrapper):
    state = toy_student.state_dict()
    if wrapper == "ddp":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrapper:
        payload = {wrapper: state, "epoch": 7}
    else:
        payload = state
    torch.save(payload, tmp_path / "weights.pth")
    model = build_student("tinyvit_toy", checkpoint=tmp_path / "weights.pth")
    assert _states_equal(model.state_dict(), state)


def test_missing_file_says_where_to_get_weights(tmp_path):
    with pytest.raises(CheckpointError) as info:
        build_student("tinyvit_5m", checkpoint=tmp_path / "tinysam.pth")
    message = str(info.value)
    assert "\n" not in message and "does not exist" in message
    for where in ("facebookresearch/segment-anything", "xinghaochen/TinySAM", "ChaoningZhang/MobileSAM"):
        assert where in message
    assert "never downloads" in message


def test_truncated_pth(tmp_path, toy_student):
    torch.save(toy_student.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as info:
        load_checkpoint(build_student("tinyvit_toy"), tmp_path / "cut.pth")
    assert "\n" not in str(info.value) and "cut.pth" in str(info.value)


def test_truncated_safetensors(tmp_path, toy_student):
    path = save_checkpoint(toy_student, tmp_path / "s.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_checkpoint(build_student("tinyvit_toy"), path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", json.dumps({"a": 1}).encode()])
def test_non_checkpoint_file(tmp_path, content):
    (tmp_path / "junk.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pt") as info:
        load_checkpoint(build_student("tinyvit_toy"), tmp_path / "junk.pt")
    assert "\n" not in str(info.value)


def test_mapping_without_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta_only.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_checkpoint(build_student("tinyvit_toy"), tmp_path / "meta_only.pth")


def test_pickle_that_needs_code(tmp_path, toy_student):
    torch.save(toy_student, tmp_path / "whole_module.pth")  # a pickled module, like the official Q-TinySAM
    with pytest.raises(CheckpointError, match="pickle that needs code to load") as info:
        load_checkpoint(build_student("tinyvit_toy"), tmp_path / "whole_module.pth")
    assert "state_dict()" in str(info.value) and "\n" not in str(info.value)


def test_other_architecture_is_named(tmp_path, toy_student):
    torch.save(toy_student.state_dict(), tmp_path / "toy.pth")
    with pytest.raises(CheckpointError) as info:
        build_student("tinyvit_5m", checkpoint=tmp_path / "toy.pth")
    message = str(info.value)
    assert "'tinyvit_toy'" in message and "'tinyvit_5m'" in message
    assert "wrong shape" in message and "\n" not in message


def test_teacher_checkpoint_into_student_lists_keys(tmp_path):
    teacher_state = {k: torch.zeros(v.shape) for k, v in _meta_state("vit_toy").items()}
    save_file(teacher_state, tmp_path / "teacher.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_student("tinyvit_toy"), tmp_path / "teacher.safetensors")
    message = str(info.value)
    assert "'vit_toy'" in message
    assert "missing: image_encoder.patch_embed.seq.0.c.weight" in message
    assert "87 unexpected: image_encoder." in message  # safetensors returns keys sorted, so any teacher key


def test_closest_architecture_recognises_official_layout(reference_state_dict_spec):
    state = {k: torch.empty(v["shape"]) for k, v in reference_state_dict_spec.items()}
    assert closest_architecture(state) == ("tinyvit_5m", 1.0)


def test_save_rejects_other_suffix(tmp_path, toy_student):
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(toy_student, tmp_path / "x.pth")


def _meta_state(name: str) -> dict:
    from tinysam.models.registry import architecture_builders

    with torch.device("meta"):
        return architecture_builders()[name]().state_dict()
