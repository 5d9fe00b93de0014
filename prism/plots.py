"""The pipeline's plots: accuracy per stage, the ALIGN discriminator's per-expert gap and accuracy,
and the RL reward over steps (curves averaged over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path


def mean_over_seeds(curves: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """{"seed0/PRISM": {key: [[step, v], ...]}, ...} -> {"PRISM": {key: [(step, mean over seeds), ...]}}."""
    grouped: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run, c in curves.items():
        row = run.split("/", 1)[1]
        for key, points in c.items():
            for step, v in points:
                grouped.setdefault(row, {}).setdefault(key, {}).setdefault(step, []).append(v)
    return {row: {key: [(step, statistics.fmean(vs)) for step, vs in sorted(by_step.items())]
                  for key, by_step in keys.items()} for row, keys in grouped.items()}


LEGEND = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}


def make_plots(results: dict, out: Path) -> list[str]:
    """PNG plots: accuracy per stage; ALIGN expert gap and discriminator accuracy; RL reward over steps."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    curves = mean_over_seeds(results["curves"])
    paths = [accuracy_per_stage(results["summary"], out / "accuracy_per_stage.png")]
    align_rows = {k: v for k, v in curves.items() if k.startswith("PRISM") and "+" not in k}
    if align_rows:
        paths.append(align_discriminator(align_rows, out / "align_discriminator.png"))
    rl_rows = {k: v for k, v in curves.items() if "→" in k or "+" in k}
    if rl_rows:
        paths.append(rl_reward(rl_rows, out / "rl_reward.png"))
    return paths


def accuracy_per_stage(summary: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary)), 4))
    names = list(summary)
    for i, (group, label) in enumerate((("greedy", "greedy"), ("sampled", "sampled pass@1 (T=1)"))):
        means = [100 * summary[r].get(f"{group}/accuracy", [0, 0, 0])[0] for r in names]
        stds = [100 * summary[r].get(f"{group}/accuracy", [0, 0, 0])[1] for r in names]
        ax.bar([x + 0.4 * i for x in range(len(names))], means, 0.4, yerr=stds, label=label, capsize=3)
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("test answer accuracy (%)")
    ax.set_xlabel("stage")
    ax.set_title("Accuracy per stage")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def align_discriminator(align_rows: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (row, c) in enumerate(align_rows.items()):
        colour = f"C{i % 10}"
        for expert, style in (("perception", "-"), ("reasoning", "--")):
            for ax, key in ((a1, f"disc/{expert}/gap"), (a2, f"disc/{expert}/acc")):
                if c.get(key):
                    s_, v = zip(*c[key])
                    ax.plot(s_, v, style, color=colour, label=f"{row} {expert}")
    a1.set_xlabel("ALIGN step")
    a1.set_ylabel("teacher − policy score")
    a1.set_title("Per-expert score gap (mean over seeds)")
    a2.set_xlabel("ALIGN step")
    a2.set_ylabel("discriminator pairwise accuracy")
    a2.set_title("Discriminator accuracy (mean over seeds)")
    a2.axhline(0.5, color="gray", lw=0.5)
    if a2.get_legend_handles_labels()[0]:  # small test runs may log no curve
        a2.legend(**LEGEND)
    fig.tight_layout()
    return _save(fig, path)


def align_experts(rows: list[dict], path: Path, window: int = 10) -> str:
    """One ALIGN run's metrics.jsonl rows: per expert, the score gap and the pairwise accuracy over steps
    (thin: every step; thick: the mean of the last `window` steps), and the rollouts' caption match,
    answer accuracy and caption errors per drift (when logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float]) -> list[float]:
        return [statistics.fmean(values[max(0, i + 1 - window): i + 1]) for i in range(len(values))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = ((axes[0], ("disc/perception/gap", "disc/reasoning/gap"), "teacher − policy score", "Score gap per expert"),
              (axes[1], ("disc/perception/acc", "disc/reasoning/acc"), "pairwise accuracy", "Discriminator accuracy"),
              (axes[2], ("rollout/caption_match", "rollout/accuracy", "rollout/caption_error/colour",
                         "rollout/caption_error/layout"), "fraction of rollouts", "Policy rollouts"))
    for ax, keys, ylabel, title in panels:
        for i, key in enumerate(keys):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, color=f"C{i}", lw=0.5, alpha=0.4)
            ax.plot(steps, smooth(list(values)), color=f"C{i}", lw=2, label=key.split("/", 1)[1])
        ax.set_xlabel("ALIGN step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[1].axhline(0.5, color="gray", lw=0.5)
    fig.tight_layout()
    return _save(fig, path)


def rl_reward(rl_rows: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row, c in rl_rows.items():
        if c.get("rollout/reward"):
            s_, v = zip(*c["rollout/reward"])
            ax.plot(s_, v, "--" if row.startswith("PRISM") else "-", label=row)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the rollouts")
    ax.set_title("RL reward over steps (mean over seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**LEGEND)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)
