"""Distillation training: learning, NaN stop, exact resume after SIGKILL, DDP, configs of every experiment."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_config, run_python, run_script, run_script_ok, small_train_run
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from safetensors.torch import load_file

from tinysam import build_student, build_teacher
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.distill.datamodule import DistillDataModule, collate_with_embeddings
from tinysam.distill.losses import DistillLoss
from tinysam.distill.module import DistillModule
from tinysam.distill.prompts import HardPromptSampler

EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


def precompute_train_store(tmp_path, *overrides: str) -> None:
    """The teacher store of a 16-image toy world's training split, computed by precompute.py."""
    run_script_ok(
        "precompute.py",
        [
            f"paths.root_dir={tmp_path}",
            "data.toyworld.n_train=16",
            "data.toyworld.n_val=0",
            "splits=[train]",
            "num_workers=0",
            *overrides,
        ],
        cwd=tmp_path,
    )


def test_a_few_steps_lower_the_loss(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=8, n_val=0))
    dm = DistillDataModule("toy", [str(world / "train")], [], 256, None, batch_size=8, num_workers=0)
    dm.setup("fit")
    batch = collate_with_embeddings([dm.train_set[i] for i in range(8)])
    torch.manual_seed(0)
    teacher = build_teacher("vit_toy")
    with torch.no_grad():
        batch["teacher_embedding"] = teacher.image_encoder(batch["image"])
    module = DistillModule(
        build_student("tinyvit_toy"), teacher, DistillLoss(), HardPromptSampler(max_rounds=0, seed=0)
    )
    module.log = lambda *args, **kwargs: None
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        module.sampler.load_state_dict(HardPromptSampler(max_rounds=0, seed=0).state_dict())  # same prompts
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_non_finite_loss_names_step_and_term(toy_student):
    module = DistillModule(toy_student, None, DistillLoss(0, 0, 0, 1), HardPromptSampler())
    with pytest.raises(FloatingPointError, match=r"step 0: term 'gt' = nan"):
        module._check_finite({"gt": torch.tensor(float("nan")), "total": torch.tensor(1.0)})


def test_teacher_terms_without_teacher_are_refused(toy_student):
    with pytest.raises(ValueError, match="teacher=null"):
        DistillModule(toy_student, None, DistillLoss(), HardPromptSampler())


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    overrides = small_train_run(killed, steps=16, every=3)  # 4 batches an epoch: step 3 is mid-epoch
    proc = run_script("train.py", overrides, cwd=killed)
    ckpt_dir = killed / "outputs" / "train" / "toy_distill" / "checkpoints"
    deadline = time.time() + 400
    while time.time() < deadline and not (ckpt_dir / "last.ckpt").exists():  # written atomically by Lightning
        time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "student.safetensors").exists(), "the run was killed before its end"
    out = run_script_ok("train.py", overrides + ["ckpt_path=last"], cwd=killed)
    assert "resuming data at epoch 0, batch 3" in out or "resuming data at epoch 1, batch 2" in out, out[-3000:]
    run_script_ok("train.py", small_train_run(clean, steps=16, every=3), cwd=clean)
    resumed = load_file(ckpt_dir / "student.safetensors")
    uninterrupted = load_file(clean / "outputs" / "train" / "toy_distill" / "checkpoints" / "student.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    dump = tmp_path / "ranks"
    overrides = small_train_run(tmp_path, steps=3, every=100) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "+callbacks.rank_dump._target_=rank_dump.RankDump",
        f"+callbacks.rank_dump.dirpath={dump}",
    ]
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO / 'tests'}{os.pathsep}{env_path}"
    try:
        precompute_train_store(tmp_path)
        run_script_ok("train.py", overrides, cwd=tmp_path)
    finally:
        os.environ["PYTHONPATH"] = env_path
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    student = build_student("tinyvit_toy")
    initial = student.state_dict()
    parameters = [name for name, _ in student.named_parameters()]  # BatchNorm running stats are per-rank buffers
    assert len(parameters) > 200
    assert any(not torch.equal(rank0[k], initial[k]) for k in parameters if k.startswith("image_encoder")), "it trained"
    for key in parameters:
        assert torch.equal(rank0[key], rank1[key]), key


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(tmp_path, experiment):
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.root_dir={tmp_path}", "paths.output_dir=out"])
    assert cfg.run_name == experiment
    loss = instantiate(cfg.distill)
    sampler = instantiate(cfg.prompts)
    assert isinstance(loss, DistillLoss) and isinstance(sampler, HardPromptSampler)
    assert cfg.student._target_.startswith("tinysam.models.build.")
    if cfg.get("teacher"):
        assert cfg.teacher.name in {"vit_toy", "vit_h", "vit_l", "vit_b"}
    if cfg.student.checkpoint:  # weights are checked here; the meta model below is the architecture alone
        assert Path(cfg.student.checkpoint).is_file(), cfg.student.checkpoint
    with torch.device("meta"):  # no memory; loading real weights into meta tensors would only warn per tensor
        student = instantiate(cfg.student, checkpoint=None)
    assert student.image_encoder.img_size == cfg.data.image_size
    assert cfg.module._target_ == "tinysam.distill.module.DistillModule"


def test_default_experiment_is_the_toy_distillation(tmp_path):
    cfg = compose_config("train", [f"paths.root_dir={tmp_path}"])
    assert cfg.run_name == "toy_distill" and cfg.teacher.name == "vit_toy" and cfg.student.name == "tinyvit_toy"
    assert Path(cfg.teacher.checkpoint).is_file(), "the shipped toy teacher"


def test_a_wrong_key_fails_at_start(tmp_path):
    with pytest.raises(ConfigCompositionException, match="outptu_weight"):
        compose_config("train", [f"paths.root_dir={tmp_path}", "distill.outptu_weight=0"])


def test_multirun_sweep(tmp_path):
    overrides = ["-m", "distill.output_weight=0,1", "trainer.max_steps=2"] + [
        o for o in small_train_run(tmp_path, steps=2, every=100) if not o.startswith("trainer.max_steps")
    ]
    out = run_script_ok("train.py", overrides, cwd=tmp_path)
    sweep = tmp_path / "outputs" / "train" / "toy_distill-multirun"
    assert (sweep / "0" / "results.json").is_file() and (sweep / "1" / "results.json").is_file(), out[-2000:]


def test_bad_samples_are_counted_per_pass(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=6, n_val=0))
    (world / "train" / "sa_3.json").write_text("{broken")
    dm = DistillDataModule("toy", [str(world / "train")], [], 256, None, batch_size=4, num_workers=0)
    dm.setup("fit")
    used = sum(len(dm.on_before_batch_transfer(b, 0).get("name", [])) for b in dm.train_dataloader())
    assert used == 5
    assert "skipped 1 of 6 samples (1 malformed JSON)" in dm.end_pass("train")
    assert dm.skips["train"].seen == 0


def test_training_refuses_a_store_of_another_teacher_checkpoint(tmp_path):
    from tinysam.data.embedding_store import read_manifest

    overrides = small_train_run(tmp_path, steps=1, every=100)
    precompute_train_store(tmp_path, "teacher.checkpoint=null")
    store = tmp_path / "data" / "cache" / "embeddings" / "toyworld-vit_toy"
    assert read_manifest(store)["teacher_checkpoint_sha256"] == "random-init:seed=0"
    proc = run_script("train.py", overrides, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "teacher_checkpoint_sha256='random-init:seed=0' but teacher_checkpoint_sha256=" in out


def test_masks_are_chosen_anew_each_epoch(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=4, n_val=0, min_objects=8, max_objects=12))
    dm = DistillDataModule("toy", [str(world / "train")], [], 256, None, batch_size=4, num_workers=0, max_masks=2)
    dm.setup("fit")

    def boxes_by_name(epoch: int) -> dict[str, list]:
        dm.train_sampler.set_epoch(epoch)
        batch = next(iter(dm.train_dataloader()))
        return {name: batch["boxes"][i].tolist() for i, name in enumerate(batch["name"])}

    first, again, second = boxes_by_name(0), boxes_by_name(0), boxes_by_name(1)
    assert first == again, "an epoch's choice is reproducible"
    assert first.keys() == second.keys() and any(first[n] != second[n] for n in first), "another epoch, other masks"


def test_same_command_gives_the_same_weights_whatever_the_threads_and_workers(tmp_path):
    """The run pins its thread count (``threads``): a different OMP_NUM_THREADS and an extra DataLoader
    worker change nothing, bit for bit (unpinned, the 1-thread run differs by ~1e-4 after 8 steps)."""
    a, b = tmp_path / "a", tmp_path / "b"
    runs = []
    for root, env, workers in ((a, {"OMP_NUM_THREADS": "1"}, 0), (b, {}, 1)):
        root.mkdir()
        overrides = small_train_run(root, steps=8, every=100)
        overrides = [o for o in overrides if not o.startswith("data.num_workers")] + [f"data.num_workers={workers}"]
        code, out = run_python([str(REPO / "train.py"), "threads=2", *overrides], root, env=env)
        assert code == 0, out[-3000:]
        run = root / "outputs" / "train" / "toy_distill"
        weights = load_file(run / "checkpoints" / "student.safetensors")
        runs.append((weights, json.loads((run / "results.json").read_text())))
    (wa, ra), (wb, rb) = runs
    assert ra["threads"] == rb["threads"] == 2
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_layer_norm_weight_gradient_depends_on_the_thread_count():
    """Why ``threads`` is pinned: PyTorch sums LayerNorm's weight gradient in per-thread chunks, so 1 and 2
    threads round differently (within float32 rounding of the sum: relative 1e-5), while matmuls,
    convolutions and their gradients are identical."""
    torch.manual_seed(0)
    x, w = torch.randn(4096, 160), torch.ones(160)
    weights = torch.linspace(0, 1, x.numel()).view_as(x)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            wn = w.clone().requires_grad_()
            (torch.nn.functional.layer_norm(x, (160,), wn) * weights).sum().backward()
            grads.append(wn.grad)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(grads[0], grads[1])
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-3)
