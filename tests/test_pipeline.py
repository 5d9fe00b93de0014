"""`prism-pipeline` end to end on a 2-step-per-stage config, reuse of finished stages, the results page,
bad pipeline configs, the plan of stage configs checked before anything runs, and where relative paths
of a pipeline file lead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prism.core.config import ConfigError, load_config
from prism.pipeline import FULL, Pipeline, PipelineConfig, load_pipeline_config
from prism.report import format_table, render

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
        kinds = {k: v for k, v in r["greedy"].items() if k.startswith("caption_error/")}  # what is wrong, by drift
        assert r["greedy"]["caption_match"] == 1 or kinds
        assert all(0 < v <= 1 - r["greedy"]["caption_match"] + 1e-9 for v in kinds.values())
    # the ALIGN row's discriminator is probed with caption-only negatives of each kind; only the
    # perception expert sees a caption change (the reasoning expert has no pair that differs)
    probe = results["rows"]["PRISM"]["0"]["probe"]
    assert set(probe) == {"layout/perception", "colour/perception"} and all(0 <= v <= 1 for v in probe.values())
    assert all("probe" not in results["rows"][row]["0"] for row in ("SFT", "SFT→grpo", "PRISM+grpo"))
    assert results["summary"]["PRISM"]["probe/layout/perception"][0] == probe["layout/perception"]
    work = tmp_path / "work"
    assert json.loads((work / "results.json").read_text())["summary"]["SFT"]["greedy/accuracy"][2] == 1
    for png in results["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = {"sft/seed0", "rl-sft-grpo/seed0", "align-default/seed0", "rl-prism-grpo/seed0"}
    assert set(results["trained"]) == stages and set(results["timings_s"]) == {*stages, "stages", "total"}
    table = format_table(results["summary"])
    assert "PRISM+grpo" in table and "err perc" in table

    # the same run with its stages in 2 worker processes (1 thread each, as here): the same results
    (tmp_path / "parallel").mkdir()
    parallel = Pipeline(load_config(PipelineConfig, _config(
        tmp_path / "parallel", model_path=str(tiny_model_dir), processes=2, threads=2))).run()
    assert parallel["rows"] == results["rows"] and set(parallel["trained"]) == set(results["trained"])
    assert parallel["curves"] == results["curves"]

    # a second run trains nothing and reads every evaluation back
    again = Pipeline(load_config(PipelineConfig, path)).run()
    assert again["trained"] == []
    for stage in stages:  # a reused stage's time is read back from its metrics log
        assert 0 < again["timings_s"][stage] <= 1.5 * results["timings_s"][stage] + 1, stage
    assert again["rows"] == json.loads(json.dumps(results["rows"]))

    # a finished stage or generated data made with other settings is never reused silently
    changed = load_config(PipelineConfig, _config(tmp_path, model_path=str(tiny_model_dir), rl={
        "config": str(REPO / "configs/rl/demo.yaml"), "overrides": [*SMALL["rl"], "optim.lr=0.5"]}))
    with pytest.raises(ConfigError, match=r"^rl-sft-grpo/seed0: .*checkpoint-\d+ was trained with other settings "
                       r"\(optim.lr: .* -> 0.5\); choose another workdir"):
        Pipeline(changed).run()
    changed = load_config(PipelineConfig, _config(tmp_path, model_path=str(tiny_model_dir), synth={"n": 30}))
    with pytest.raises(ConfigError, match=r"^synth: .*data was made with other settings \(synth.n: 24 -> 30\)"):
        Pipeline(changed).run()

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
    assert "Rollouts (1.7b, backend hf, 128 sequences at once): 2000 tokens/s, 3.0%" in text
    assert "SFT MFU target (>= 45%): **not met** — best 25.7%" in text
    assert "target (>= 45%): met — best 50.0% (1.7b, batch 8 x 2048, compiled layers)" in "\n".join(gpu_lines([GPU_RUN]))
    # a rollouts-only file (--skip-sft, several backends): no table row, one line per backend with its ratio
    rollouts = {"device": "H200", "size": "1.7b", "attn": "sdpa", "peak_tflops": 989.0, "rollout_sequences": 128,
                "rollout_backend": "native+compile", "rollout_tokens_per_s": 8e3,
                "rollout_fraction_of_bandwidth_bound": 0.08,
                "rollouts": [{"backend": "native+compile", "tokens_per_s": 8e3, "fraction_of_bandwidth_bound": 0.08,
                              "ratio_to_hf": 4.0},
                             {"backend": "hf", "tokens_per_s": 2e3, "fraction_of_bandwidth_bound": 0.02,
                              "ratio_to_hf": 1.0}]}
    text = "\n".join(gpu_lines([slow, rollouts]))  # files from two devices: each row and line names its own
    assert text.startswith("SFT step on H100 and H200 (") and text.count("| 1.7b (H100) |") == 1
    assert "Rollouts (1.7b (H200), backend native+compile, 128 sequences at once): 8000 tokens/s, 4.00x hf, 8.0%" \
        in text
    assert "Rollouts (1.7b (H200), backend hf, 128 sequences at once): 2000 tokens/s, 1.00x hf, 2.0%" in text


def test_bad_pipeline_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="algos"):
        load_config(PipelineConfig, _config(tmp_path, algos=["ppo"]))
    with pytest.raises(ConfigError, match="ablations"):
        load_config(PipelineConfig, _config(tmp_path, ablations=["no_such_stage"]))
    with pytest.raises(ConfigError, match="unknown config key 'stages'"):
        load_config(PipelineConfig, _config(tmp_path, stages=["sft"]))
    cfg = load_config(PipelineConfig, _config(tmp_path, sft={"config": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="^sft/seed0: .*missing.yaml: config file not found$"):
        Pipeline(cfg).plan()


def _nothing_may_run(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the pipeline built, generated or trained something before checking every stage")

    monkeypatch.setattr(Pipeline, "prepare", fail)
    for fn in ("train_sft", "train_rl", "train_align", "build_tiny"):
        monkeypatch.setattr(f"prism.pipeline.{fn}", fail)


@pytest.mark.parametrize("extra, error", [
    ({"rl": {"config": str(REPO / "configs/rl/demo.yaml"), "overrides": [*SMALL["rl"], "rollout.group_size=1"]}},
     r"^rl-sft-grpo/seed0: \S*configs/rl/demo.yaml \+ overrides: rollout.group_size: 1 with grpo: "),
    ({"align": {"config": "/no/such/align.yaml"}}, r"^align-default/seed0: /no/such/align.yaml: config file not found$"),
    ({"align": {"config": str(REPO / "configs/align/demo.yaml"), "overrides": ["algo.kl_coef=0.1"]}},
     r"^align-default/seed0: \S*configs/align/demo.yaml \+ overrides: algo.kl_coef: ALIGN has no KL term"),
    ({"sft": {"config": str(REPO / "configs/sft/public.yaml"), "overrides": ["optim.nope=1"]}},
     r"^sft/seed0: \S*configs/sft/public.yaml \+ overrides: unknown config key 'optim.nope'$"),
    # valid for grpo, refused for gspo: every X of every seed is checked, not only the first stage's
    ({"algos": ["grpo", "gspo"], "seeds": [0, 1],
      "rl": {"config": str(REPO / "configs/rl/demo.yaml"), "overrides": ["algo.clip_ratio_c=3"]}},
     r"^rl-sft-gspo/seed0: \S*configs/rl/demo.yaml \+ overrides: algo: Value error, clip_ratio_c: dual-clip"),
])
def test_a_bad_stage_config_stops_in_one_line_before_anything_runs(tmp_path, monkeypatch, extra, error):
    _nothing_may_run(monkeypatch)
    pipeline = Pipeline(load_config(PipelineConfig, _config(tmp_path, **extra)))
    with pytest.raises(ConfigError, match=error) as e:
        pipeline.run()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "work").exists()  # no tiny model, no data, no stage output


def test_the_plan_holds_every_stage_of_a_full_run_with_the_configs_it_trains_with(tmp_path, monkeypatch):
    _nothing_may_run(monkeypatch)
    cfg = load_pipeline_config(_config(tmp_path), FULL)
    stages = Pipeline(cfg).plan()
    assert not (tmp_path / "work").exists()
    per_seed = ["sft", "rl-sft-grpo", "rl-sft-dapo", "rl-sft-gspo", "align-default", "rl-prism-grpo", "rl-prism-dapo",
                "rl-prism-gspo", "align-dense", "align-text_only", "align-alpha0", "align-alpha1"]
    assert [s.name for s in stages] == [f"{n}/seed{seed}" for seed in range(5) for n in per_seed]
    assert cfg.synth["n_test"] == 1000 and cfg.eval.limit is None  # the whole 1,000-question test split
    by_name = {s.name: s for s in stages}
    work = tmp_path / "work"
    sft = by_name["sft/seed1"]
    assert sft.row == "SFT" and sft.cfg.model.path == str(work / "tiny-model") and sft.cfg.train.seed == 1
    assert sft.cfg.data.train == str(work / "data/public.jsonl") and sft.cfg.train.max_steps == 2
    aligned = by_name["align-default/seed1"]
    assert aligned.cfg.model.path == aligned.cfg.discriminator.path == str(sft.checkpoint)
    assert aligned.cfg.rollout.group_size == 2  # the stage's pipeline overrides are applied
    rl = by_name["rl-prism-dapo/seed1"]
    assert (rl.row, rl.cfg.algo.name, rl.cfg.model.path) == ("PRISM+dapo", "dapo", str(aligned.checkpoint))
    assert rl.cfg.train.output_dir == str(work / "seed1/prism-dapo") and rl.cfg.data.task == "grids"
    assert by_name["align-dense/seed2"].cfg.discriminator.dense and by_name["align-alpha0/seed2"].cfg.align.alpha == 0
    assert by_name["align-dense/seed2"].row == "PRISM[dense]"
    assert len({s.cfg.train.output_dir for s in stages}) == len(stages)


def test_given_model_and_data_are_checked_before_anything_runs(tmp_path, monkeypatch):
    _nothing_may_run(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("public", "align", "test"):
        (data / f"{split}.jsonl").write_text("")
    with pytest.raises(ConfigError, match="^model_path: .*no-model: not a directory$"):
        Pipeline(load_config(PipelineConfig, _config(tmp_path, model_path=str(tmp_path / "no-model")))).run()
    cfg = load_config(PipelineConfig, _config(tmp_path, model_path=str(tmp_path), data_dir=str(data)))
    with pytest.raises(ConfigError, match="^data_dir: .*rl.jsonl: file not found$"):
        Pipeline(cfg).run()
    assert not (tmp_path / "work").exists()


def test_relative_paths_in_a_pipeline_file_are_taken_against_its_folder(tmp_path, monkeypatch):
    project = tmp_path.resolve() / "project"
    for stage, name in (("sft", "public"), ("align", "demo"), ("rl", "demo")):
        (project / "configs" / stage).mkdir(parents=True)
        (project / "configs" / stage / "run.yaml").write_text((REPO / f"configs/{stage}/{name}.yaml").read_text())
    (project / "model").mkdir()
    (project / "data").mkdir()
    for split in ("public", "align", "rl", "test"):
        (project / "data" / f"{split}.jsonl").write_text("")
    (project / "pipelines").mkdir()
    (project / "pipelines/p.yaml").write_text(yaml.safe_dump({
        "workdir": "out", "model_path": "../model", "data_dir": "../data",
        **{stage: {"config": f"../configs/{stage}/run.yaml"} for stage in ("sft", "align", "rl")}}))
    elsewhere = tmp_path.resolve() / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_pipeline_config("../project/pipelines/p.yaml")
    assert cfg.sft.config == "../project/configs/sft/run.yaml" and cfg.model_path == "../project/model"
    assert cfg.workdir == "out"  # an output: relative to the current directory
    stages = Pipeline(cfg).plan()
    assert Path(stages[0].cfg.model.path).resolve() == project / "model"
    assert Path(stages[0].cfg.data.train).resolve() == project / "data/public.jsonl"
    assert Path(stages[0].cfg.train.output_dir).resolve() == elsewhere / "out/seed0/sft"
    assert not (elsewhere / "out").exists()

    # paths given on the command line, and the defaults, stay relative to the current directory
    cfg = load_pipeline_config(project / "pipelines/p.yaml", ["data_dir=mine", "rl={config: r.yaml}"])
    assert (cfg.data_dir, cfg.rl.config) == ("mine", "r.yaml")
    assert cfg.align.config == str(project / "configs/align/run.yaml")
    cfg = load_pipeline_config(None, ["sft.config=s.yaml"])
    assert (cfg.sft.config, cfg.align.config) == ("s.yaml", "configs/align/demo.yaml")


def test_the_demo_pipeline_runs_from_the_repo_root_and_from_anywhere(tmp_path, monkeypatch):
    _nothing_may_run(monkeypatch)
    monkeypatch.chdir(REPO)  # make demo
    cfg = load_pipeline_config("configs/demo/pipeline.yaml")
    assert [cfg.sft.config, cfg.align.config, cfg.rl.config] == [
        "configs/sft/public.yaml", "configs/align/demo.yaml", "configs/rl/demo.yaml"]
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline_config(REPO / "configs/demo/pipeline.yaml", FULL)
    assert Path(cfg.rl.config) == REPO / "configs/rl/demo.yaml" and cfg.workdir == "runs/pipeline"
    assert len(Pipeline(cfg).plan()) == 60  # 5 seeds x 12 stages
    assert not (tmp_path / "runs").exists()


def test_curves_are_averaged_over_seeds_step_by_step():
    from prism.plots import mean_over_seeds

    curves = {"seed0/PRISM": {"disc/perception/acc": [[1, 0.5], [2, 0.7]]},
              "seed1/PRISM": {"disc/perception/acc": [[1, 0.7], [2, 0.9], [3, 1.0]]},
              "seed0/SFT→grpo": {"rollout/reward": [[1, 0.25]]}}
    out = mean_over_seeds(curves)
    assert out["PRISM"]["disc/perception/acc"] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.8)), (3, 1.0)]
    assert out["SFT→grpo"]["rollout/reward"] == [(1, 0.25)]


def test_a_longer_align_run_is_shown_per_expert_with_its_drifts_and_what_moved(tmp_path):
    from prism.plots import align_experts
    from prism.report import long_align_section
    from prism.tracking import metric_rows

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"config": {"bias_rate": 0.6, "layout_drift": "flip_rows",
                                                           "layout_rate": 0.6}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": str(data / "align.jsonl")}}))
    rows = [{"step": 0, "warmup/perception_acc": 1.0}]  # the warm start's row has no game metrics
    rows += [{"step": s, "disc/perception/gap": 4.0 - s, "disc/reasoning/gap": 7.0, "disc/perception/acc": 0.9,
              "disc/reasoning/acc": 0.95, "rollout/caption_match": 0.1 * s, "rollout/accuracy": 0.5,
              "rollout/caption_error/layout": 0.7} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = long_align_section(run, "prism-align --config x.yaml", "plots/a.png", window=2)
    page = "\n".join(lines)
    assert lines[0] == ("### 4 ALIGN steps, public pool with the colour bias (60% of yellow cells) and flip_rows in "
                        "60% of captions")
    assert "| steps | perception gap | reasoning gap | perception acc | reasoning acc | rollout caption match | " \
           "rollout answer acc | rollout layout-caption err |" in page  # no colour column: not logged
    assert "| first (1–2) | 2.50 | 7.00 | 0.90 | 0.95 | 0.15 | 0.50 | 0.70 |" in page
    assert "| last (3–4) | 0.50 | 7.00 | 0.90 | 0.95 | 0.35 | 0.50 | 0.70 |" in page
    assert "First to last 2 steps: perception gap 2.50 → 0.50; reasoning gap 7.00 → 7.00;" in page
    png = align_experts(metric_rows(run), tmp_path / "a.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
