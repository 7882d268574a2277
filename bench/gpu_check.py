"""Every real-scale path on the accelerator in one command, a line per step with its figure.

    python bench/gpu_check.py --quick            # one GPU, at most about 8 minutes
    python bench/gpu_check.py                    # + training throughput at batch 8 and 16, the SA-1B cost
    python bench/gpu_check.py --device cpu --tiny   # the same steps at toy sizes (the test suite runs this)

Steps, in order (a failed step is reported and the next one runs; the exit code is 1 if any failed):
1. the device tests (``tests/test_device.py`` with ``TINYSAM_TEST_DEVICE``);
2. precompute: a random SAM ViT-H teacher embeds 16 toy-world images at 1024 px (tiny: the toy teacher);
3. train: ``experiment=tinysam_sa1b`` (TinyViT-5M at 1024 px, bf16-mixed) for 50 steps on that store,
   then resumed for 10 (tiny: the toy student, 2 steps resumed for 1);
4. ``bench/inference.py`` on the device (tiny: eager only, one run);
5. segment everything at 1024 px: dense (eager and factored decoder) and adaptive on a shipped photo;
6. (full mode) training steps per second and peak memory at batch 8 and 16;
7. (full mode) the data feed: SA-1B-sized images loaded per second by one worker, and from it and the
   step time, the GPU-hours of the paper's recipe (8 epochs over 1% of SA-1B) and the workers per GPU.

Every figure also goes to ``<out>/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SA1B_IMAGES = 11_000_000  # SA-1B's image count; the paper distils on 1% of it for 8 epochs
PAPER_IMAGES, PAPER_EPOCHS = SA1B_IMAGES // 100, 8


def run(args: list[str], env: dict | None = None, cwd: Path = REPO, timeout: float = 1800) -> str:
    """Run ``python args...`` in ``cwd``; its output, or an error with the output's tail."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(args[:2])} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return done.stdout


class Check:
    """The steps' shared settings (sizes by mode) and their results."""

    def __init__(self, device: str, tiny: bool, out: Path) -> None:
        self.device, self.tiny, self.out = device, tiny, out
        self.results: dict[str, dict] = {}
        side = 256 if tiny else 1024
        self.data = [
            "data=toyworld",
            f"data.image_size={side}",
            f"data.toyworld.image_size={side}",
            f"data.toyworld.n_train={4 if tiny else 16}",
            "data.toyworld.n_val=0",
            "data.val_dirs=[]",
            f"paths.root_dir={out}",
        ]
        self.teacher = ["teacher=toy"] if tiny else ["teacher=sam_vit_h", "teacher.checkpoint=null"]
        self.trainer = ["trainer=cpu"] if device == "cpu" else ["trainer=gpu"]

    def train(self, run_name: str, steps: int, batch: int, resume: bool = False) -> dict:
        """``train.py`` on the store of step 2 for ``steps`` steps in bf16-mixed; its ``results.json``."""
        recipe = ["experiment=toy_distill"] if self.tiny else ["experiment=tinysam_sa1b", "student=tinyvit_5m"]
        overrides = [
            *recipe,
            *self.data,
            *self.teacher,
            *self.trainer,
            "trainer.precision=bf16-mixed",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=-1",
            f"data.batch_size={batch}",
            f"data.num_workers={0 if self.tiny else 4}",
            "prompts.prompts_per_image=8",
            "module.warmup_steps=5",
            "module.image_log_every=0",
            "callbacks.model_checkpoint.every_n_train_steps=25",
            "logger=csv",
            "~callbacks.progress_bar",
            f"run_name={run_name}",
        ]
        run([str(REPO / "train.py"), *overrides, *(["ckpt_path=last"] if resume else [])], cwd=self.out)
        return json.loads((self.out / "outputs" / "train" / run_name / "results.json").read_text())


def device_tests(check: Check) -> str:
    # tiny: the training test is left to step 3, which trains the same way (the suite runs it on its own)
    select = ["-k", "not training"] if check.tiny else []
    out = run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py", *select],
        {"TINYSAM_TEST_DEVICE": check.device},
    )
    summary = out.strip().splitlines()[-1]
    check.results["device_tests"] = {"summary": summary}
    return summary


def precompute(check: Check) -> str:
    start = time.perf_counter()
    run(
        [str(REPO / "precompute.py"), *check.data, *check.teacher, *check.trainer, "splits=[train]", "num_workers=0"],
        cwd=check.out,
    )
    seconds = time.perf_counter() - start
    images = 4 if check.tiny else 16
    teacher = "toy teacher" if check.tiny else "random SAM ViT-H"
    check.results["precompute"] = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
    return f"{teacher}: {images} images in {seconds:.1f} s, {images / seconds:.2f} images/s (start-up included)"


def train(check: Check) -> str:
    steps, more = (2, 1) if check.tiny else (50, 10)
    first = check.train("gpu_check", steps, batch=2 if check.tiny else 8)
    resumed = check.train("gpu_check", steps + more, batch=2 if check.tiny else 8, resume=True)
    if resumed["global_step"] != steps + more:
        raise RuntimeError(f"the resumed run ended at step {resumed['global_step']}, not {steps + more}")
    check.results["train"] = {"first": first, "resumed": resumed}
    return (
        f"{steps} bf16-mixed steps: {first['seconds_per_batch']:.3f} s/step, peak {first['peak_memory_mib']:.0f} MiB; "
        f"resumed to step {resumed['global_step']}"
    )


def inference(check: Check) -> str:
    args = [str(REPO / "bench" / "inference.py"), "--device", check.device]
    if check.tiny:
        args += ["--backends", "eager", "--runs", "1", "--batches", "1"]
    out = run(args)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| backend")]
    check.results["inference"] = {"table": rows, "output": out[-4000:]}
    eager = rows[0].split("|")[2].strip() if rows else "?"
    return f"{len(rows)} backends; eager encoder {eager} ms; " + out.strip().splitlines()[-1]


def everything(check: Check) -> str:
    import torch

    from tinysam import AdaptiveMaskGenerator, DenseMaskGenerator, load_model
    from tinysam.assets import asset_path, photos
    from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng
    from tinysam.data.transforms import load_image

    if check.tiny:
        model = load_model("vit_toy", asset_path("toy_teacher_stuff.safetensors"), check.device)
        image = generate_image(image_rng(0, "val", 0), ToyWorldConfig(out="unused", stuff_regions=4)).image
        thresholds = {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.85, "points_per_side": 8}
    else:
        model = load_model("tinyvit_5m", REPO / "tests" / "reference" / "tinysam_vit_t_seed0.safetensors", check.device)
        image = load_image(photos()[0])
        thresholds = {}
    rows = {
        "dense": DenseMaskGenerator(model, **thresholds),
        "dense, factored": DenseMaskGenerator(model, backend="factored", **thresholds),
        "adaptive, factored": AdaptiveMaskGenerator(model, backend="factored", **thresholds),
    }
    seconds = {}
    for name, generator in rows.items():
        generator.generate(image)  # warm-up: kernels, allocator
        if check.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generator.generate(image)
        if check.device != "cpu":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    check.results["everything"] = {"image": list(image.shape[:2]), "seconds_per_image": seconds}
    return ", ".join(f"{name} {s:.2f} s/image" for name, s in seconds.items()) + f" ({image.shape[1]}x{image.shape[0]})"


def throughput(check: Check) -> str:
    figures = {}
    for batch in (2, 4) if check.tiny else (8, 16):
        results = check.train(f"gpu_check_b{batch}", 3 if check.tiny else 20, batch)
        figures[batch] = {
            "steps_per_s": 1 / results["seconds_per_batch"],
            "peak_memory_mib": results["peak_memory_mib"],
        }
    check.results["throughput"] = figures
    return "; ".join(
        f"batch {b}: {f['steps_per_s']:.2f} steps/s, {b * f['steps_per_s']:.1f} images/s, peak {f['peak_memory_mib']:.0f} MiB"
        for b, f in figures.items()
    )


def cost(check: Check) -> str:
    from tinysam.data.sa1b import SA1BDataset
    from tinysam.data.synthetic import write_sa1b_like

    folder = write_sa1b_like(
        check.out / "sa1b_like",
        count=4,
        size=(150, 225) if check.tiny else (1500, 2250),
        masks=10 if check.tiny else 100,
    )
    dataset = SA1BDataset([folder], image_size=256 if check.tiny else 1024, max_masks=64)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset.load(index, 0)
    per_worker = len(dataset) / (time.perf_counter() - start)
    batch = max(check.results["throughput"])
    gpu_rate = batch * check.results["throughput"][batch]["steps_per_s"]  # images/s one GPU trains on
    gpu_hours = PAPER_EPOCHS * PAPER_IMAGES / gpu_rate / 3600
    precompute_hours = PAPER_IMAGES / check.results["precompute"]["images_per_s"] / 3600
    workers = math.ceil(gpu_rate / per_worker)
    check.results["cost"] = {
        "images_per_s_per_worker": per_worker,
        "train_images_per_s_per_gpu": gpu_rate,
        "train_gpu_hours": gpu_hours,
        "precompute_gpu_hours": precompute_hours,
        "workers_per_gpu": workers,
    }
    return (
        f"one worker loads {per_worker:.1f} SA-1B-sized images/s; training at {gpu_rate:.1f} images/s per GPU "
        f"(batch {batch}) needs {workers} workers per GPU; the paper's recipe ({PAPER_EPOCHS} epochs x "
        f"{PAPER_IMAGES} images) takes {gpu_hours:.0f} GPU-hours of training + {precompute_hours:.0f} of precompute"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the default) or cpu")
    parser.add_argument("--quick", action="store_true", help="steps 1-5 only (about 8 minutes on one GPU)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU run of the script itself")
    parser.add_argument("--out", default="outputs/gpu_check", help="where runs and gpu_check.json go")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(args.device, args.tiny, out)
    steps: list[tuple[str, Callable[[Check], str]]] = [
        ("device tests", device_tests),
        ("precompute", precompute),
        ("train", train),
        ("inference bench", inference),
        ("everything", everything),
    ]
    if not args.quick:
        steps += [("training throughput", throughput), ("SA-1B cost", cost)]
    failed = []
    for number, (name, step) in enumerate(steps, 1):
        start = time.perf_counter()
        try:
            figure = step(check)
        except Exception as err:  # a step's failure is reported; the next step still runs
            failed.append(name)
            figure = f"FAILED: {err}".splitlines()[0]
            check.results.setdefault("errors", {})[name] = traceback.format_exc()[-4000:]
        print(f"[{number}/{len(steps)}] {name} ({time.perf_counter() - start:.0f} s): {figure}", flush=True)
    from tinysam.io import atomic_write_text

    check.results["device"] = args.device
    atomic_write_text(out / "gpu_check.json", json.dumps(check.results, indent=1, default=str))
    print(f"{len(steps) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
