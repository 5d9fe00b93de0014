"""`prism-pipeline` end to end on a 2-step-per-stage config, reuse of finished stages, the results page,
and bad pipeline configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prism.core.config import ConfigError, load_config
from prism.pipeline import Pipeline, PipelineConfig
from prism.report import format_table
from prism.report import render

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "sft": ["train.max_steps=2", "train.micro_batch_size=4", "train.save_every=0", "logging.tensorboard=false",
            "optim.lr=1e-3"],
    "rl": ["train.max_steps=2", "train.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
           "logging.tensorboard=false", "train.save_every=0"],
    "align": ["train.max_steps=2", "train.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
              "warmup.steps=1", "warmup.pairs_per_step=2", "warmup.eval_pairs=2", "logging.tensorboard=false",
              "train.save_every=0"],
}


def _config(tmp_path: Path, **extra) -> Path:
    cfg = {
        "workdir": str(tmp_path / "work"),
        "synth": {"n": 24},
        "seeds": [0],
        "algos": ["grpo"],
        "sft": {"config": str(REPO / "configs/sft/public.yaml"), "overrides": SMALL["sft"]},
        "rl": {"config": str(REPO / "configs/rl/demo.yaml"), "overrides": SMALL["rl"]},
        "align": {"config": str(REPO / "configs/align/demo.yaml"), "overrides": SMALL["align"]},
        "eval": {"limit": 3, "samples": 1, "max_new_tokens": 6},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_pipeline_end_to_end_then_reuses_every_stage(tmp_path, tiny_model_dir):
    path = _config(tmp_path, model_path=str(tiny_model_dir))
    results = Pipeline(load_config(PipelineConfig, path)).run()
    assert list(results["rows"]) == ["SFT", "SFT→grpo", "PRISM", "PRISM+grpo"]
    for row in results["rows"].values():
        r = row["0"]
        assert {"greedy", "sampled", "drift"} <= set(r) and "error/perception" in r["greedy"]
    work = tmp_path / "work"
    assert json.loads((work / "results.json").read_text())["summary"]["SFT"]["greedy/accuracy"][2] == 1
    for png in results["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = {"sft/seed0", "rl-sft-grpo/seed0", "align-default/seed0", "rl-prism-grpo/seed0"}
    assert set(results["trained"]) == stages and set(results["timings_s"]) == {*stages, "stages", "total"}
    table = format_table(results["summary"])
    assert "PRISM+grpo" in table and "err perc" in table

    # a second run trains nothing and reads every evaluation back
    again = Pipeline(load_config(PipelineConfig, path)).run()
    assert again["trained"] == []
    for stage in stages:  # a reused stage's time is read back from its metrics log
        assert 0 < again["timings_s"][stage] <= 1.5 * results["timings_s"][stage] + 1, stage
    assert again["rows"] == json.loads(json.dumps(results["rows"]))

    page = render(again, ["plots/accuracy_per_stage.png"], "prism-pipeline --config x.yaml")
    assert "| PRISM+grpo |" in page and "prism-pipeline --config x.yaml" in page and "## Reading" in page
    assert "not measured — no GPU was available" in page
    memory = {"measured_mb": {"generation": 51.0}, "where": "CPU resident set size", "measured_setting": "tiny",
              "projected_gb": {"4B policy: training peak": 23.4}, "projected_setting": "8 GPUs"}
    page = render(again, [], "x", memory, [GPU_RUN])
    assert "| generation | 51.0 |" in page and "| 4B policy: training peak | 23.4 |" in page
    assert "| 1.7b | 8 x 2048 | chunked | no | yes | 500 | 32768 | 50.0% | 40.0 |" in page


GPU_RUN = {"device": "H100", "size": "1.7b", "attn": "sdpa", "batch": 8, "seq": 2048, "loss": "chunked",
           "checkpointing": False, "compile": True, "sft_step_s": 0.5, "sft_mfu": 0.5, "peak_tflops": 989.0,
           "sft_tokens_per_s": 32768.0, "sft_peak_mem_gb": 40.0, "rollout_sequences": 128,
           "rollout_tokens_per_s": 2e3, "rollout_fraction_of_bandwidth_bound": 0.03}


def test_gpu_section_has_a_row_per_setup_and_judges_the_mfu_target():
    from prism.report import gpu_lines

    oom = {**GPU_RUN, "loss": "full", "compile": False, "sft_oom": True}
    slow = {**GPU_RUN, "compile": False, "sft_step_s": 0.72, "sft_mfu": 0.257, "sft_tokens_per_s": 22821.0,
            "sft_peak_mem_gb": 67.1}
    for k in ("rollout_sequences", "rollout_tokens_per_s", "rollout_fraction_of_bandwidth_bound"):
        oom.pop(k)
    text = "\n".join(gpu_lines([slow, oom]))
    assert "| 1.7b | 8 x 2048 | chunked | no | no | 720 | 22821 | 25.7% | 67.1 |" in text
    assert "| 1.7b | 8 x 2048 | full | no | no | out of memory | | | |" in text
    assert "Rollouts (1.7b, prism's HF-generate engine, 128 sequences at once): 2000 tokens/s, 3.0%" in text
    assert "SFT MFU target (>= 45%): **not met** — best 25.7%" in text
    assert "target (>= 45%): met — best 50.0% (1.7b, batch 8 x 2048, compiled layers)" in "\n".join(gpu_lines([GPU_RUN]))


def test_bad_pipeline_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="algos"):
        load_config(PipelineConfig, _config(tmp_path, algos=["ppo"]))
    with pytest.raises(ConfigError, match="ablations"):
        load_config(PipelineConfig, _config(tmp_path, ablations=["no_such_stage"]))
    with pytest.raises(ConfigError, match="unknown config key 'stages'"):
        load_config(PipelineConfig, _config(tmp_path, stages=["sft"]))
    cfg = load_config(PipelineConfig, _config(tmp_path, sft={"config": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        Pipeline(cfg).sft(0)


def test_curves_are_averaged_over_seeds_step_by_step():
    from prism.plots import mean_over_seeds

    curves = {"seed0/PRISM": {"disc/perception/acc": [[1, 0.5], [2, 0.7]]},
              "seed1/PRISM": {"disc/perception/acc": [[1, 0.7], [2, 0.9], [3, 1.0]]},
              "seed0/SFT→grpo": {"rollout/reward": [[1, 0.25]]}}
    out = mean_over_seeds(curves)
    assert out["PRISM"]["disc/perception/acc"] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.8)), (3, 1.0)]
    assert out["SFT→grpo"]["rollout/reward"] == [(1, 0.25)]

