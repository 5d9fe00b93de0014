"""`prism-pipeline report`: docs/results.md generated from a pipeline's results.json — nothing hand-edited.

    prism-pipeline report --results runs/pipeline-full/results.json --out docs/results.md \\
        --command "prism-pipeline --config configs/demo/pipeline.yaml --full workdir=runs/pipeline-full" \\
        [--memory memory.json] [--gpu gpu-a.json gpu-b.json ...] \\
        [--align-run runs/align-long --align-command "prism-align --config ..." ...]

The page has the command, versions and machine, how the settings were chosen, the tables (greedy and
sampled accuracy per stage and question type with the caption errors of each drift and the error split,
drift from the references), the plots (copied next to the page), the paired comparisons (per-seed
differences with bootstrap intervals and their verdicts: answer accuracy, the two drifts' caption errors,
the error split), the ALIGN discriminators on caption-only negatives, optionally one longer ALIGN run per
expert, and a plain reading of the numbers computed from them, including where PRISM does not beat SFT→X.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ERROR_KEYS = ("caption_match", "caption_error/colour", "caption_error/layout", "error/format", "error/perception",
              "error/reasoning")


def summarise(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """row -> metric -> [mean, std over seeds, n seeds] for greedy and sampled metrics, drift and the
    discriminator probe (ALIGN rows)."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, by_seed in rows.items():
        values: dict[str, list[float]] = {}
        for result in by_seed.values():
            for group in ("greedy", "sampled", "drift", "probe"):
                for k, v in result.get(group, {}).items():
                    if k != "n":
                        values.setdefault(f"{group}/{k}", []).append(v)
        out[row] = {k: [statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)]
                    for k, v in values.items()}
    return out


def format_table(summary: dict, group: str = "greedy", markdown: bool = False,
                 groups: Sequence[str] | None = None) -> str:
    """The paper-shaped table: rows per stage, columns: average, per-group accuracy (the task's
    `table_groups`; None: every `acc/<group>` found), perception ok and the error split."""
    if groups is None:
        groups = sorted({k.split("/", 2)[2] for m in summary.values() for k in m if k.startswith(f"{group}/acc/")})
    keys = ("accuracy", *(f"acc/{g}" for g in groups), *ERROR_KEYS)
    cols = [k for k in keys if any(f"{group}/{k}" in m for m in summary.values())]
    names = {"accuracy": "avg", "caption_match": "perception ok", "caption_error/colour": "colour cap err",
             "caption_error/layout": "layout cap err", "error/format": "err fmt", "error/perception": "err perc",
             "error/reasoning": "err reas"}
    header = ["", *[names.get(c, c.split("/")[-1]) for c in cols]]

    def cell(m, c):
        if f"{group}/{c}" not in m:
            return "—"
        mean, std, n = m[f"{group}/{c}"]
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")

    body = [[row, *[cell(m, c) for c in cols]] for row, m in summary.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in [header, *body])


def reading(results: dict) -> list[str]:
    """Plain sentences comparing rows, derived from the numbers (never written by hand): per comparison, the
    paired difference of answer accuracy (greedy, sampled) and of the two drifts' caption errors, each with
    what its interval says (`paired_stat`); the discriminators on caption-only negatives; the error split
    of SFT and PRISM."""
    s = results["summary"]
    lines = []

    def said(b: str, a: str, m: Measure) -> str | None:
        stat = paired_stat(results, b, a, m)
        if stat is None:
            return None
        mean, low, high, n, word = stat
        values = " vs ".join(f"{100 * s[row][f'{m.group}/{m.key}'][0]:.1f}%" for row in (b, a))
        interval = f"[{low:+.1f}, {high:+.1f}]" if n > 1 else "(one seed)"
        return f"{m.title} {values}, {mean:+.1f} {interval} **{word}**"

    pairs = [*comparisons(results),
             *((f"SFT→{x}", "SFT") for x in results["config"]["algos"] if f"SFT→{x}" in results["rows"])]
    for b, a in pairs:
        parts = [p for p in (said(b, a, m) for m in (*ACCURACY, *DRIFTS[:2])) if p]
        if parts:
            lines.append(f"{b} vs {a} (paired difference in points, 95% interval): " + "; ".join(parts) + ".")
    for b, a in [(row, "PRISM") for row in results["rows"] if row.startswith("PRISM[")]:
        parts = [p for p in (said(b, a, m) for m in PROBE) if p]
        if parts:
            lines.append(f"Discriminators, {b} vs {a}, pairwise accuracy on caption-only negatives: "
                         + "; ".join(parts) + ".")
    for row in ("SFT", "PRISM"):
        m = s.get(row, {})
        if "greedy/error/perception" in m:
            lines.append(f"{row} errors (greedy): perception {100 * m['greedy/error/perception'][0]:.1f}%, "
                         f"reasoning {100 * m['greedy/error/reasoning'][0]:.1f}%, "
                         f"format {100 * m['greedy/error/format'][0]:.1f}% of test questions.")
    return lines


def comparisons(results: dict) -> list[tuple[str, str]]:
    """(row B, row A) pairs the page compares as B − A: PRISM vs SFT, PRISM+X vs SFT→X, each ablation vs PRISM."""
    rows = results["rows"]
    pairs = [("PRISM", "SFT"), *((f"PRISM+{x}", f"SFT→{x}") for x in results["config"]["algos"]),
             *((row, "PRISM") for row in rows if row.startswith("PRISM["))]
    return [(b, a) for b, a in pairs if b in rows and a in rows]


@dataclass(frozen=True)
class Measure:
    """One metric compared B − A: `group` (greedy / sampled / probe) and `key` of a stage's evaluation,
    in points (x100); `higher` says which direction is better (accuracy: up; an error rate: down)."""

    title: str
    group: str
    key: str
    higher: bool = True


ACCURACY = (Measure("greedy", "greedy", "accuracy"), Measure("sampled", "sampled", "accuracy"))
DRIFTS = (Measure("colour-caption errors", "greedy", "caption_error/colour", higher=False),
          Measure("layout-caption errors", "greedy", "caption_error/layout", higher=False),
          Measure("row_count accuracy", "greedy", "acc/row_count"))
PROBE = (Measure("perception expert, layout negatives", "probe", "layout/perception"),
         Measure("perception expert, colour negatives", "probe", "colour/perception"))
ERROR_SPLIT = (Measure("perception errors", "greedy", "error/perception", higher=False),
               Measure("reasoning errors", "greedy", "error/reasoning", higher=False))


def paired_stat(results: dict, b: str, a: str, m: Measure, level: float = 0.95
                ) -> tuple[float, float, float, int, str] | None:
    """(mean, low, high, seeds, verdict) of the per-seed differences B − A of `m` in points, each seed's B
    and A sharing its SFT checkpoint and test questions: the percentile-bootstrap `level` interval of their
    mean and what it says (prism.eval.stats; for a lower-is-better `m`, "better" means the interval is below
    0). None when no seed has the metric in both rows."""
    from prism.eval.stats import bootstrap_interval, paired_differences, verdict

    values = {name: {int(seed): 100 * r[m.group][m.key] for seed, r in results["rows"][name].items()
                     if m.key in r.get(m.group, {})} for name in (b, a)}
    try:
        diffs = paired_differences(values[a], values[b])
    except ValueError:
        return None
    mean, low, high = bootstrap_interval(diffs, level)
    if len(diffs) < 2:
        return mean, low, high, 1, "one seed: no interval"
    return mean, low, high, len(diffs), verdict(low, high) if m.higher else verdict(-high, -low)


def paired(results: dict, measures: Sequence[Measure] = ACCURACY, level: float = 0.95,
           pairs: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """A markdown table of `paired_stat` per comparison (rows; default `comparisons`) and measure
    (columns: mean [interval] and verdict)."""
    head = "| comparison (B − A) | seeds | " + " | ".join(
        f"{m.title}: mean [{100 * level:.0f}% interval] | " for m in measures) + "|"
    lines = [head, "|---|---|" + "---|---|" * len(measures)]
    for b, a in comparisons(results) if pairs is None else pairs:
        cells, n = [], 0
        for m in measures:
            stat = paired_stat(results, b, a, m, level)
            if stat is None:
                cells += ["—", ""]
                continue
            mean, low, high, n_seeds, word = stat
            n = max(n, n_seeds)
            cells += [f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]", word]
        lines.append(f"| {b} − {a} | {n} | " + " | ".join(cells) + " |")
    return lines


def probe_section(results: dict) -> list[str]:
    """The ALIGN rows' discriminators on caption-only negatives (`Pipeline.probe`): mean ± std over seeds
    per row and kind, and each ablation paired against PRISM. [] when no row was probed."""
    s = results["summary"]
    rows = [r for r in s if any(k.startswith("probe/") for k in s[r])]
    if not rows:
        return []
    keys = sorted({k for r in rows for k in s[r] if k.startswith("probe/")})
    lines = ["## The discriminators on caption-only negatives", "",
             "After ALIGN, each row's discriminator scores the test references against the same references with "
             "only the caption made wrong: `layout` (rows listed bottom-up, every colour count kept) or `colour` "
             "(one cell recoloured). The number is the pairwise accuracy (% of pairs where the reference scores "
             "higher; 50 is chance) of each expert that sees the change. A text-only perception expert reads the "
             "caption without the image, so on layout negatives it has nothing to go on.", "",
             "| row | " + " | ".join(k.split("/", 1)[1].replace("/", ": ") for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(
            (f"{100 * s[r][k][0]:.1f}" + (f" ± {100 * s[r][k][1]:.1f}" if s[r][k][2] > 1 else "")) if k in s[r]
            else "—" for k in keys) + " |")
    lines += ["", "Against chance (per seed, accuracy − 50, with its 95% bootstrap interval over seeds):", ""]
    for r in rows:
        parts = []
        for k in keys:
            stat = against_chance(results, r, k)
            if stat is not None:
                mean, low, high, n, word = stat
                parts.append(f"{k.split('/', 1)[1].replace('/', ' ')} {mean:+.1f} [{low:+.1f}, {high:+.1f}] "
                             f"{word if n > 1 else '(one seed)'}")
        lines.append(f"- {r}: " + "; ".join(parts) + ".")
    ablations = [(r, "PRISM") for r in rows if r.startswith("PRISM[") and "PRISM" in rows]
    if ablations:
        lines += ["", *paired(results, PROBE, pairs=ablations)]
    return lines + [""]


def against_chance(results: dict, row: str, key: str, level: float = 0.95
                   ) -> tuple[float, float, float, int, str] | None:
    """(mean, low, high, seeds, verdict) of a probe accuracy `key` ("probe/<kind>/<expert>") minus 50 points
    over the row's seeds: "above chance" / "below chance" when the bootstrap interval excludes 0, else "at
    chance". None when no seed has it."""
    from prism.eval.stats import bootstrap_interval

    group, _, metric = key.partition("/")
    diffs = [100 * r[group][metric] - 50 for r in results["rows"][row].values() if metric in r.get(group, {})]
    if not diffs:
        return None
    mean, low, high = bootstrap_interval(diffs, level)
    word = "above chance" if low > 0 else "below chance" if high < 0 else "at chance"
    return mean, low, high, len(diffs), word


def long_align_section(run_dir: Path, command: str, plot_rel: str, window: int = 25) -> list[str]:
    """A longer ALIGN run's per-expert picture: what its public pool drifted in (the meta.json beside its
    data.train, when there is one), its plot, and each expert's score gap and pairwise accuracy and the
    rollouts' caption match, answer accuracy and caption errors per drift, averaged over the first, middle
    and last `window` steps of its metrics.jsonl, with the change from first to last in words."""
    import yaml

    from prism.tracking import metric_rows

    rows = [r for r in metric_rows(run_dir) if "disc/perception/gap" in r]
    if not rows:
        return []
    n = len(rows)
    spans = {"first": rows[:window], "middle": rows[max(0, n // 2 - window // 2): n // 2 + (window + 1) // 2],
             "last": rows[-window:]}
    keys = {"perception gap": "disc/perception/gap", "reasoning gap": "disc/reasoning/gap",
            "perception acc": "disc/perception/acc", "reasoning acc": "disc/reasoning/acc",
            "rollout caption match": "rollout/caption_match", "rollout answer acc": "rollout/accuracy",
            "rollout colour-caption err": "rollout/caption_error/colour",
            "rollout layout-caption err": "rollout/caption_error/layout"}
    keys = {name: key for name, key in keys.items() if any(key in r for r in rows)}
    pool = "public pool: drifts not recorded"
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        meta = Path(yaml.safe_load(config.read_text())["data"]["train"]).parent / "meta.json"
        if meta.is_file():
            synth = json.loads(meta.read_text()).get("config", {})
            pool = f"public pool with the colour bias ({100 * synth.get('bias_rate', 0):.0f}% of yellow cells)"
            if synth.get("layout_drift", "none") != "none":
                pool += f" and {synth['layout_drift']} in {100 * synth['layout_rate']:.0f}% of captions"
    means = {name: {key: statistics.fmean(v) for key in keys.values() if (v := [r[key] for r in span if key in r])}
             for name, span in spans.items()}
    lines = [f"### {rows[-1]['step']} ALIGN steps, {pool}", "",
             "One seed, from that seed's SFT checkpoint, otherwise the PRISM row's settings:", "",
             f"```bash\n{command}\n```", "", f"![align_experts]({plot_rel})", "",
             "| steps | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, span in spans.items():
        lines.append(f"| {name} ({span[0]['step']}–{span[-1]['step']}) | " + " | ".join(
            f"{means[name][key]:.2f}" if key in means[name] else "—" for key in keys.values()) + " |")
    moved = [f"{name} {means['first'][key]:.2f} → {means['last'][key]:.2f}" for name, key in keys.items()
             if key in means["first"] and key in means["last"]]
    return lines + ["", f"First to last {window} steps: " + "; ".join(moved) + ".", ""]


def long_align_intro(window: int = 25) -> list[str]:
    return ["## Perception and reasoning over longer ALIGN runs", "",
            f"Means over windows of {window} steps: gap = teacher − policy score of the expert; acc = its pairwise "
            "accuracy on (teacher, policy) pairs that differ in its section; the rollouts' caption match, answer "
            "accuracy and caption errors per drift (when logged).", ""]


def efficiency(memory: dict | None, gpu: list[dict] | None) -> list[str]:
    """The memory report and the GPU throughput figures (benchmarks/*.py --out), or what is missing."""
    lines = ["## Memory and GPU efficiency", ""]
    if memory:
        lines += [f"Measured ({memory['measured_setting']}; peak {memory['where']} above each phase's start, "
                  "`benchmarks/memory_report.py`):", "", "| phase | MB |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in memory["measured_mb"].items()]
        lines += ["", f"Projected per GPU ({memory['projected_setting']}; analytic planning estimate, not a "
                  "measurement):", "", "| | GB |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in memory["projected_gb"].items()]
    else:
        lines.append("No memory report given (`python benchmarks/memory_report.py --out FILE`, then `--memory FILE`).")
    lines.append("")
    lines += gpu_lines(gpu) if gpu else [
        "SFT MFU and rollout throughput: not measured — no GPU was available for this page "
        "(`python benchmarks/gpu_throughput.py --out FILE` on one, then `--gpu FILE`)."]
    return lines + [""]


def gpu_lines(runs: list[dict]) -> list[str]:
    """One table row per `benchmarks/gpu_throughput.py --out` file, the rollout figures, and the MFU
    target (>= 45%) against the best measured set-up."""
    first = runs[0]
    devices = list(dict.fromkeys(r["device"] for r in runs))

    def model(r: dict) -> str:  # with the device when the files come from several
        return f"{r['size']} ({r['device']})" if len(devices) > 1 else r["size"]

    lines = [f"SFT step on {' and '.join(devices)} (`benchmarks/gpu_throughput.py`, Qwen3-VL-shaped random weights, "
             f"bf16, {first['attn']} attention; MFU against {first['peak_tflops']:.0f} TFLOP/s dense bf16):", "",
             "| model | batch x tokens | loss | checkpointing | compiled layers | step ms | tokens/s | MFU | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "sft_mfu" not in r and not r.get("sft_oom"):
            continue  # a rollouts-only file (--skip-sft)
        setup = (f"| {model(r)} | {r['batch']} x {r['seq']} | {r.get('loss', 'full')} | "
                 f"{'yes' if r.get('checkpointing') else 'no'} | {'yes' if r.get('compile') else 'no'} |")
        if r.get("sft_oom"):
            lines.append(f"{setup} out of memory | | | |")
        else:
            lines.append(f"{setup} {1000 * r['sft_step_s']:.0f} | {r['sft_tokens_per_s']:.0f} | "
                         f"{100 * r['sft_mfu']:.1f}% | {r['sft_peak_mem_gb']:.1f} |")
    lines.append("")
    for r in runs:
        if "rollouts" in r:  # one row per backend measured on the same model and prompts
            for g in r["rollouts"]:
                ratio = f", {g['ratio_to_hf']:.2f}x hf" if "ratio_to_hf" in g else ""
                lines.append(f"Rollouts ({model(r)}, backend {g['backend']}, {r['rollout_sequences']} sequences at "
                             f"once): {g['tokens_per_s']:.0f} tokens/s{ratio}, "
                             f"{100 * g['fraction_of_bandwidth_bound']:.1f}% of the memory-bandwidth bound.")
        elif "rollout_tokens_per_s" in r:
            lines.append(f"Rollouts ({model(r)}, backend {r.get('rollout_backend', 'hf')}, "
                         f"{r.get('rollout_sequences', '?')} sequences at once): {r['rollout_tokens_per_s']:.0f} "
                         f"tokens/s, {100 * r['rollout_fraction_of_bandwidth_bound']:.1f}% of the memory-bandwidth "
                         f"bound.")
    measured = [r for r in runs if "sft_mfu" in r and not r.get("sft_oom")]
    if measured:
        best = max(measured, key=lambda r: r["sft_mfu"])
        verdict = "met" if best["sft_mfu"] >= 0.45 else "**not met**"
        lines += ["", f"SFT MFU target (>= 45%): {verdict} — best {100 * best['sft_mfu']:.1f}% "
                  f"({model(best)}, batch {best['batch']} x {best['seq']}"
                  f"{', compiled layers' if best.get('compile') else ''})."]
    return lines


def render(results: dict, plots_rel: list[str], command: str, memory: dict | None = None,
           gpu: list[dict] | None = None, long_align: list[str] | None = None) -> str:
    """The page; `long_align`: the lines of `long_align_section`, when a longer ALIGN run is shown."""
    m = results["machine"]
    s = results["summary"]
    synth = results["config"].get("synth", {})
    drifts = "yellow captioned as blue in part of its cells"
    if synth.get("layout_drift", "none") != "none":
        how = {"flip_rows": "rows listed bottom-up", "swap_rows": "two rows swapped"}.get(synth["layout_drift"],
                                                                                         synth["layout_drift"])
        drifts += f"; {how} in {100 * synth.get('layout_rate', 0.5):.0f}% of its captions"
    drifts += "; terse reasoning"
    test_size = ", ".join(sorted({f"{int(r['greedy']['n'])} questions" for by_seed in results["rows"].values()
                                  for r in by_seed.values() if "n" in r.get("greedy", {})})) or "size not recorded"
    has_drifts = any(k.startswith("greedy/caption_error/") for row in s.values() for k in row)
    drift_rows = [r for r in s if "sampled/accuracy" in s[r] and "drift/embedding_mmd" in s[r]]
    drift = ["| | caption len W1 | think len W1 | caption tokens JS | think tokens JS | embedding MMD² |",
             "|---|---|---|---|---|---|"]
    for r in drift_rows:
        d = s[r]
        drift.append(f"| {r} | " + " | ".join(
            f"{d[k][0]:.3f}" if k in d else "—" for k in (
                "drift/length/caption", "drift/length/think", "drift/tokens/caption", "drift/tokens/think",
                "drift/embedding_mmd")) + " |")
    cfg = results["config"]
    parts = [
        "# Results: the PRISM comparison at toy scale",
        "",
        "Generated by `prism-pipeline report` from `results.json`; do not edit by hand.",
        "",
        "## How it was produced",
        "",
        f"```bash\n{command}\n```",
        "",
        f"- seeds: {cfg['seeds']}; RL algorithms X: {cfg['algos']}; ALIGN ablations: {cfg['ablations'] or 'none'}",
        f"- machine: {m['platform']}, {m['cpu_count']} CPU cores, CUDA: {m['cuda']}, torch threads {m['threads']}",
        f"- versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
        f"- time: {results['timings_s'].get('stages', results['timings_s']['total']) / 60:.1f} min of training summed "
        f"over the stages (their training steps, read from their logs; stages may have run in parallel "
        f"processes), "
        f"{results['timings_s']['total'] / 60:.1f} min for the invocation that wrote results.json",
        "",
        "Model: the tiny random Qwen3-VL of `prism-tiny`, trained from scratch. Data: `prism-synth` colour grids; "
        f"SFT on the drifted public pool ({drifts}), ALIGN against the curated references, RL on the rl split, "
        f"evaluation on the test split ({test_size}). Numbers are % of test questions, mean ± std over seeds.",
        "",
        "How the settings were chosen: every branch and seed trains with the same stage configs (the pipeline's "
        f"`{cfg['sft']['config']}`, `{cfg['align']['config']}`, `{cfg['rl']['config']}`, the demo's), fixed before "
        "any comparison on this page was run; only the branch's own setting differs (the RL algorithm, the "
        "ablation's one switch). Nothing was tuned per branch or after looking at these numbers.",
        "",
        "## Greedy accuracy per stage",
        "",
        format_table(s, "greedy", markdown=True, groups=results.get("table_groups")),
        "",
        "## Sampled pass@1 (temperature 1)",
        "",
        format_table(s, "sampled", markdown=True, groups=results.get("table_groups")),
        "",
        "## Drift of sampled responses from the references (lower is closer)",
        "",
        *drift,
        "",
        "## Plots",
        "",
        *[f"![{Path(p).stem}]({p})" for p in plots_rel],
        "",
        "## Paired comparisons",
        "",
        "Each seed's two rows start from that seed's SFT checkpoint and are evaluated on the same test "
        "questions, so the comparison is the per-seed difference (in points), its mean and a 95% "
        "percentile-bootstrap interval over seeds: better / worse when the interval excludes 0, else not "
        "distinguishable. For error rates, lower is better.",
        "",
        "### Answer accuracy",
        "",
        *paired(results),
        "",
        *(["### The two drifts (greedy captions)",
           "",
           "Each drift measured on its own (a caption can have both): colour-caption errors, % of captions "
           "with a colour count wrong (the colour bias, yellow seen as blue); layout-caption errors, % with "
           "cells misplaced (rows out of order, as in the flipped public captions only the image shows, or "
           "every count right and still wrong). `row_count` is the question type a misplaced row answers "
           "wrongly.",
           "",
           *paired(results, DRIFTS), ""] if has_drifts else []),
        "### Perception / reasoning error split (greedy)",
        "",
        *paired(results, ERROR_SPLIT),
        "",
        *probe_section(results),
        *(long_align or []),
        "## Reading",
        "",
        *[f"- {line}" for line in reading(results)],
        "",
        *efficiency(memory, gpu),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="prism-pipeline report", description="Write the results page from results.json.")
    p.add_argument("--results", required=True)
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--command", default="prism-pipeline --config configs/demo/pipeline.yaml --full")
    p.add_argument("--memory", help="JSON of benchmarks/memory_report.py --out")
    p.add_argument("--gpu", nargs="+", help="JSON files of benchmarks/gpu_throughput.py --out (one per set-up)")
    p.add_argument("--align-run", action="append", help="a longer ALIGN run's output directory, shown per expert "
                   "(its metrics.jsonl; repeat for several)")
    p.add_argument("--align-command", action="append", help="the command that made each --align-run, in order")
    a = p.parse_args(argv)
    results = json.loads(Path(a.results).read_text())
    memory = json.loads(Path(a.memory).read_text()) if a.memory else None
    gpu = [json.loads(Path(f).read_text()) for f in a.gpu] if a.gpu else None
    out = Path(a.out)
    (out.parent / "plots").mkdir(parents=True, exist_ok=True)
    rel = []
    for plot in results.get("plots", []):
        dest = out.parent / "plots" / Path(plot).name
        shutil.copy2(plot, dest)
        rel.append(f"plots/{dest.name}")
    long_align = None
    if a.align_run:
        from prism.plots import align_experts
        from prism.tracking import metric_rows

        commands = a.align_command or []
        if len(commands) != len(a.align_run):
            p.error(f"--align-command: give one per --align-run ({len(a.align_run)}), got {len(commands)}")
        long_align = long_align_intro()
        for i, (run, command) in enumerate(zip(a.align_run, commands)):
            plot = align_experts(metric_rows(Path(run)), out.parent / "plots" / f"align_experts_{i}.png")
            long_align += long_align_section(Path(run), command, f"plots/{Path(plot).name}")
    text = render(results, rel, a.command, memory, gpu, long_align)
    out.write_text(text)
    print(f"wrote {out}")
    return text
