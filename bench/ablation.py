"""The toy distillation ablation over seeds: mean ± std per variant, learning curves, resumable.

    python bench/ablation.py [--seeds 0 1 2] [--out bench/results/ablation] [--val-every 100] [KEY=VALUE ...]

Each (variant, seed) is one ``python train.py experiment=<variant> seed=<seed>`` in its own folder
under ``--out`` (the toy world's seed stays 0: only the training seed varies). A run that was
stopped resumes from its last checkpoint (``ckpt_path=auto``); a finished one (its
``results.json``) is not run again, so the command can be repeated until everything is done.
Extra ``KEY=VALUE`` overrides go to every run (more steps, more images). At the end it writes
``table.md`` (held-out mIoU, mean ± std over seeds, each adjacent pair of variants compared with
the spread) and ``curves.png`` (student-vs-teacher mIoU against step, mean and a one-std band).
The default folder is tracked by git except for checkpoints, so finished runs travel with the repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "toy_undistilled": "undistilled (GT terms only)",
    "toy_embedding_only": "embedding only",
    "toy_no_hard_prompts": "full-stage, no hard prompts",
    "toy_distill": "full-stage + hard prompts (default)",
}
COLUMNS = [("box", "gt"), ("box", "teacher"), ("point", "gt"), ("point", "teacher")]


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def train(out: Path, variant: str, seed: int, val_every: int, extra: list[str]) -> dict:
    """Run (or resume, or reuse) one training; its final held-out metrics."""
    folder = run_dir(out, variant, seed)
    results = folder / "results.json"
    if not results.is_file():
        print(f"training {variant} seed {seed} -> {folder}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "commit.txt").write_text(commit() + "\n")  # the code this run measures
        with (folder / "stdout.log").open("a") as log:  # Hydra's own log of the run is train.log beside it
            subprocess.run(
                [
                    sys.executable,
                    str(REPO / "train.py"),
                    f"experiment={variant}",
                    f"seed={seed}",
                    f"hydra.run.dir={folder}",
                    "logger=csv",
                    f"trainer.val_check_interval={val_every}",
                    "ckpt_path=auto",
                    *extra,
                ],
                cwd=REPO,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    return json.loads(results.read_text())


def curve(folder: Path, kind: str) -> dict[int, float]:
    """Step -> student-vs-teacher validation mIoU from the run's CSV log (the last value logged per step)."""
    points: dict[int, float] = {}
    for path in sorted(folder.glob("csv/**/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                value = row.get(f"val/{kind}_miou_teacher")
                if value:
                    points[int(row["step"]) + 1] = float(value)  # Lightning logs validation at the last step run
    return points


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    """Markdown: mean ± std per variant and metric, then adjacent variants compared with their spread."""
    lines = [
        f"| variant ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | "
        + " | ".join(f"{k} vs {ref}" for k, ref in COLUMNS)
        + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    stats = {}
    for variant, runs in results.items():
        stats[variant] = {c: mean_std([r[f"val/{c[0]}_miou_{c[1]}"] for r in runs]) for c in COLUMNS}
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in stats[variant].values()]
        lines.append(f"| {VARIANTS[variant]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| step up | " + " | ".join(f"{k} vs {ref}" for k, ref in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    names = list(results)
    for a, b in zip(names, names[1:]):
        cells = []
        for c in COLUMNS:
            (ma, sa), (mb, sb) = stats[a][c], stats[b][c]
            spread = (sa**2 + sb**2) ** 0.5  # std of the difference of two single runs
            if len(seeds) < 2:
                verdict = "one seed: spread unknown"
            else:
                verdict = "beyond 1 std" if abs(mb - ma) > spread else "**within noise**"
            cells.append(f"{100 * (mb - ma):+.1f} pt ({verdict}, 1 std = {100 * spread:.1f})")
        lines.append(f"| {VARIANTS[a]} -> {VARIANTS[b]} | " + " | ".join(cells) + " |")
    return lines


def plot(out: Path, variants: list[str], seeds: list[int]) -> Path:
    """curves.png: per variant, mean student-vs-teacher mIoU against step with a one-std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("box", "point")):
        for variant in variants:
            curves = [curve(run_dir(out, variant, s), kind) for s in seeds]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            mean = [statistics.fmean(c[t] for c in curves) for t in steps]
            std = [statistics.stdev(c[t] for c in curves) if len(curves) > 1 else 0.0 for t in steps]
            ax.plot(steps, mean, marker="o", ms=3, label=VARIANTS[variant])
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_title(f"{kind} prompt: student vs teacher (held-out)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mIoU (mean ± std, {len(seeds)} seeds)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def commit() -> str:
    """The commit the numbers are measured on (with ``-dirty`` when the tree has changes)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ablation")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--report", action="store_true", help="no training: report the seeds every variant finished")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every run")
    args = parser.parse_args()
    out = args.out.resolve()
    seeds = args.seeds
    if args.report:
        seeds = [s for s in seeds if all((run_dir(out, v, s) / "results.json").is_file() for v in args.variants)]
        if not seeds:
            raise SystemExit("ablation: no seed has finished every variant yet; run without --report")
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in seeds:  # seed-major: an interrupted bench has every variant at the same number of seeds
        for variant in args.variants:
            results[variant].append(train(out, variant, seed, args.val_every, args.overrides))
    commits = sorted({(run_dir(out, v, s) / "commit.txt").read_text().strip() for v in args.variants for s in seeds})
    text = [
        f"Measured on commit {', '.join(f'`{c}`' for c in commits)}; overrides: {' '.join(args.overrides) or 'none'}.",
        "",
        *table(results, seeds),
    ]
    (out / "table.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {out / 'table.md'} and {plot(out, args.variants, seeds)}")


if __name__ == "__main__":
    main()
