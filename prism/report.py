"""`prism-pipeline report`: docs/results.md generated from a pipeline's results.json — nothing hand-edited.

    prism-pipeline report --results runs/pipeline-full/results.json --out docs/results.md \\
        --command "prism-pipeline --config configs/demo/pipeline.yaml --full workdir=runs/pipeline-full" \\
        [--memory memory.json] [--gpu gpu-a.json gpu-b.json ...]

The page has the command, versions and machine, the tables (greedy and sampled accuracy per stage and
question type with the error split, drift, ablations), the plots (copied next to the page), and a plain
reading of the numbers, computed from them: which rows beat which, by how much relative to the
seed-to-seed spread, including where PRISM does not beat SFT→X.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Sequence

ERROR_KEYS = ("caption_match", "error/format", "error/perception", "error/reasoning")


def summarise(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """row -> metric -> [mean, std over seeds, n seeds] for greedy and sampled metrics and drift."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, by_seed in rows.items():
        values: dict[str, list[float]] = {}
        for result in by_seed.values():
            for group in ("greedy", "sampled", "drift"):
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
    names = {"accuracy": "avg", "caption_match": "perception ok", "error/format": "err fmt",
             "error/perception": "err perc", "error/reasoning": "err reas"}
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


def _acc(summary: dict, row: str, group: str = "greedy") -> tuple[float, float, int] | None:
    v = summary.get(row, {}).get(f"{group}/accuracy")
    return tuple(v) if v else None


def reading(results: dict) -> list[str]:
    """Plain sentences comparing rows, derived from the numbers (never written by hand)."""
    s = results["summary"]
    algos = results["config"]["algos"]
    lines = []

    def cmp(a: str, b: str, group: str) -> str | None:
        x, y = _acc(s, a, group), _acc(s, b, group)
        if not x or not y:
            return None
        diff = 100 * (x[0] - y[0])
        noise = 100 * max(x[1], y[1])
        verdict = ("within the seed-to-seed spread" if abs(diff) <= noise and x[2] > 1 else
                   "better" if diff > 0 else "worse")
        spread = f" (largest std over seeds {noise:.1f} points)" if x[2] > 1 else " (one seed: no spread measured)"
        return (f"{a} vs {b} ({group}): {100 * x[0]:.1f}% vs {100 * y[0]:.1f}%, {diff:+.1f} points — "
                f"{verdict}{spread}.")

    for group in ("greedy", "sampled"):
        for line in (cmp("PRISM", "SFT", group), *(cmp(f"PRISM+{x}", f"SFT→{x}", group) for x in algos),
                     *(cmp(f"SFT→{x}", "SFT", group) for x in algos)):
            if line:
                lines.append(line)
    for row in ("SFT", "PRISM"):
        m = s.get(row, {})
        if "greedy/error/perception" in m:
            lines.append(f"{row} errors (greedy): perception {100 * m['greedy/error/perception'][0]:.1f}%, "
                         f"reasoning {100 * m['greedy/error/reasoning'][0]:.1f}%, "
                         f"format {100 * m['greedy/error/format'][0]:.1f}% of test questions.")
    for row in s:
        if row.startswith("PRISM[") and _acc(s, "PRISM"):
            line = cmp(row, "PRISM", "greedy")
            if line:
                lines.append(line)
    return lines


def comparisons(results: dict) -> list[tuple[str, str]]:
    """(row B, row A) pairs the page compares as B − A: PRISM vs SFT, PRISM+X vs SFT→X, each ablation vs PRISM."""
    rows = results["rows"]
    pairs = [("PRISM", "SFT"), *((f"PRISM+{x}", f"SFT→{x}") for x in results["config"]["algos"]),
             *((row, "PRISM") for row in rows if row.startswith("PRISM["))]
    return [(b, a) for b, a in pairs if b in rows and a in rows]


def paired(results: dict, level: float = 0.95) -> list[str]:
    """A markdown table of per-seed differences B − A of test accuracy (points), each seed's B and A
    sharing its SFT checkpoint, with the percentile-bootstrap interval of their mean and its verdict
    (prism.eval.stats), greedy and sampled."""
    from prism.eval.stats import bootstrap_interval, paired_differences, verdict

    lines = [f"| comparison (B − A) | seeds | greedy: mean [{100 * level:.0f}% interval] | | "
             f"sampled: mean [{100 * level:.0f}% interval] | |", "|---|---|---|---|---|---|"]
    for b, a in comparisons(results):
        cells = []
        for group in ("greedy", "sampled"):
            acc = {name: {int(seed): 100 * r[group]["accuracy"] for seed, r in results["rows"][name].items()
                          if "accuracy" in r.get(group, {})} for name in (b, a)}
            try:
                diffs = paired_differences(acc[a], acc[b])
            except ValueError:
                cells += ["—", ""]
                continue
            mean, low, high = bootstrap_interval(diffs, level)
            cells += [f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]",
                      verdict(low, high) if len(diffs) > 1 else "one seed: no interval"]
        n = len(set(results["rows"][a]) & set(results["rows"][b]))
        lines.append(f"| {b} − {a} | {n} | " + " | ".join(cells) + " |")
    return lines


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
    lines = [f"SFT step on {first['device']} (`benchmarks/gpu_throughput.py`, Qwen3-VL-shaped random weights, bf16, "
             f"{first['attn']} attention; MFU against {first['peak_tflops']:.0f} TFLOP/s dense bf16):", "",
             "| model | batch x tokens | loss | checkpointing | compiled layers | step ms | tokens/s | MFU | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "sft_mfu" not in r and not r.get("sft_oom"):
            continue  # a rollouts-only file (--skip-sft)
        setup = (f"| {r['size']} | {r['batch']} x {r['seq']} | {r.get('loss', 'full')} | "
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
                lines.append(f"Rollouts ({r['size']}, backend {g['backend']}, {r['rollout_sequences']} sequences at "
                             f"once): {g['tokens_per_s']:.0f} tokens/s{ratio}, "
                             f"{100 * g['fraction_of_bandwidth_bound']:.1f}% of the memory-bandwidth bound.")
        elif "rollout_tokens_per_s" in r:
            lines.append(f"Rollouts ({r['size']}, backend {r.get('rollout_backend', 'hf')}, "
                         f"{r.get('rollout_sequences', '?')} sequences at once): {r['rollout_tokens_per_s']:.0f} "
                         f"tokens/s, {100 * r['rollout_fraction_of_bandwidth_bound']:.1f}% of the memory-bandwidth "
                         f"bound.")
    measured = [r for r in runs if "sft_mfu" in r and not r.get("sft_oom")]
    if measured:
        best = max(measured, key=lambda r: r["sft_mfu"])
        verdict = "met" if best["sft_mfu"] >= 0.45 else "**not met**"
        lines += ["", f"SFT MFU target (>= 45%): {verdict} — best {100 * best['sft_mfu']:.1f}% "
                  f"({best['size']}, batch {best['batch']} x {best['seq']}"
                  f"{', compiled layers' if best.get('compile') else ''})."]
    return lines


def render(results: dict, plots_rel: list[str], command: str, memory: dict | None = None,
           gpu: list[dict] | None = None) -> str:
    m = results["machine"]
    s = results["summary"]
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
        "SFT on the drifted public pool (yellow captioned as blue in part of its cells, terse reasoning), ALIGN "
        "against the curated references, RL on the rl split, evaluation on the test split. Numbers are % of test "
        "questions, mean ± std over seeds.",
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
        "questions, so the comparison is the per-seed difference (points of test accuracy), its mean and "
        "a 95% percentile-bootstrap interval over seeds: better / worse when the interval excludes 0, "
        "else not distinguishable.",
        "",
        *paired(results),
        "",
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
    text = render(results, rel, a.command, memory, gpu)
    out.write_text(text)
    print(f"wrote {out}")
    return text
