"""The real recipe's code path at real sizes, on CPU in bf16-mixed, so that a dtype mix-up fails here and not
in the first paid GPU hour: ``experiment=tinysam_sa1b`` (TinyViT-5M at 1024 px, full-stage losses, hard
prompts, hard mask weighting) with a random SAM ViT-B teacher, on SA-1B-sized images (1500 x 2250, 100
masks each): precompute, train, resume, evaluate."""

from __future__ import annotations

import json

from helpers import run_script_ok
from safetensors.torch import load_file

from tinysam.data.synthetic import write_sa1b_like


def test_real_recipe_runs_in_bf16_mixed_on_cpu(tmp_path):
    data = write_sa1b_like(tmp_path / "sa1b", count=2)
    teacher = ["teacher=sam_vit_b", "teacher.checkpoint=null", f"paths.root_dir={tmp_path}"]
    source = ["data=sa1b", f"data.train_dirs=[{data}]", "data.num_workers=0"]
    out = run_script_ok(
        "precompute.py", [*teacher, *source, "trainer.precision=bf16-mixed", "batch_size=1", "num_workers=0"], tmp_path
    )
    store = tmp_path / "data" / "cache" / "embeddings" / "sa1b-vit_b"
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["complete"] and manifest["image_size"] == 1024, out[-2000:]

    train = [
        "experiment=tinysam_sa1b",
        "trainer=cpu",  # the experiment's bf16-mixed precision stays
        *teacher,
        f"data.train_dirs=[{data}]",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.max_masks=16",
        "prompts.prompts_per_image=4",
        "module.warmup_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "logger=csv",
        "~callbacks.progress_bar",
        "threads=2",
    ]
    out = run_script_ok("train.py", [*train, "trainer.max_steps=2"], tmp_path, timeout=1200)
    assert "bf16" in out and "nan" not in out.lower(), out[-3000:]
    run_dir = tmp_path / "outputs" / "train" / "tinysam_sa1b"
    first = load_file(run_dir / "checkpoints" / "student.safetensors")
    timing = json.loads((run_dir / "results.json").read_text())
    assert timing["global_step"] == 2 and timing["seconds_per_batch"] > 0 and timing["peak_memory_mib"] > 500, timing
    out = run_script_ok("train.py", [*train, "trainer.max_steps=3", "ckpt_path=last"], tmp_path, timeout=1200)
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out, out[-3000:]
    resumed = load_file(run_dir / "checkpoints" / "student.safetensors")
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 3
    assert all(v.dtype == first[k].dtype for k, v in resumed.items()), "the student is exported in its own dtypes"
    assert any(not (resumed[k] == first[k]).all() for k in first), "the resumed step changed the weights"

    metrics = tmp_path / "eval"
    run_script_ok(
        "evaluate.py",
        [
            "task=prompt_miou",
            "dataset=sa1b_folder",
            f"dataset.images={data}",
            "model=tinyvit_5m",
            f"checkpoint={run_dir / 'checkpoints' / 'student.safetensors'}",
            "task.clicks=1",
            "device=cpu",
            f"output_dir={metrics}",
        ],
        tmp_path,
        timeout=1200,
    )
    report = json.loads((metrics / "metrics.json").read_text())
    assert report["objects"]["all"] == 200 and set(report["miou"]) == {"box", "1_click"}
