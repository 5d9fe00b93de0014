"""Evaluation metrics against hand-computed values: the error split, drift distances, prism-eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism.core.errors import ConfigError, DataError
from prism.core.example import Example
from prism.eval.drift import length_distance, mmd2, token_divergence
from prism.eval.metrics import score_responses
from prism.tasks.grids import TASK

SCENE = [["red", "blue"], ["blue", "blue"]]
CAPTION = "row 1: red blue; row 2: blue blue"
REPO = Path(__file__).resolve().parents[1]


def _ex(answer: str, qtype: str = "count") -> Example:
    return Example(messages=[{"role": "user", "content": "q"}], answer=answer,
                   meta={"scene": SCENE, "question_type": qtype})


def _resp(caption: str, answer: str) -> str:
    return f"<caption>{caption}</caption><think>t</think><answer>{answer}</answer>"


def test_error_split_by_hand():
    examples = [_ex("3"), _ex("3"), _ex("3"), _ex("3"), _ex("blue", "most")]
    responses = [
        _resp(CAPTION, "3"),                              # correct
        "<answer>2</answer>",                             # wrong, not format-valid -> format error
        _resp("row 1: red red; row 2: blue blue", "2"),   # wrong, valid, caption wrong -> perception error
        _resp(CAPTION, "4"),                              # wrong, valid, caption right -> reasoning error
        _resp("row 1: red red; row 2: red blue", "blue"),  # correct answer despite a wrong caption
    ]
    m = score_responses(examples, responses, TASK)
    assert m["accuracy"] == pytest.approx(2 / 5) and m["format_rate"] == pytest.approx(4 / 5)
    assert m["error/format"] == pytest.approx(1 / 5)
    assert m["error/perception"] == pytest.approx(1 / 5)
    assert m["error/reasoning"] == pytest.approx(1 / 5)
    assert m["accuracy"] + m["error/format"] + m["error/perception"] + m["error/reasoning"] == pytest.approx(1)
    assert m["caption_match"] == pytest.approx(2 / 5)  # responses 1 and 4
    assert m["reasoning_given_perception"] == pytest.approx(1 / 2)  # of those two, one answered right
    assert m["acc/count"] == pytest.approx(1 / 4) and m["acc/most"] == 1.0


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_drift_of_a_set_to_itself_is_zero_and_grows_with_a_shift():
    tok = _CharTokenizer()
    ref = [_resp("ab", "1"), _resp("abcd", "2"), _resp("abc", "3")]
    assert length_distance(tok, ref, ref) == {"caption": 0.0, "think": 0.0, "answer": 0.0}
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in token_divergence(tok, ref, ref).values())
    # captions two characters longer each: the length distance is exactly 2 for the caption, 0 elsewhere
    longer = [_resp("ab" + "zz", "1"), _resp("abcd" + "zz", "2"), _resp("abc" + "zz", "3")]
    d = length_distance(tok, longer, ref)
    assert d == {"caption": 2.0, "think": 0.0, "answer": 0.0}
    small, big = token_divergence(tok, longer, ref)["caption"], token_divergence(
        tok, [_resp("zzzz", "1")] * 3, ref)["caption"]
    assert 0 < small < big <= 1.0
    assert token_divergence(tok, [_resp("zz", "1")], [_resp("ab", "1")])["caption"] == pytest.approx(1.0)


def test_mmd_is_zero_on_the_same_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = torch.randn(200, 4, generator=g)
    same = mmd2(x, y, bandwidth=1.0)
    assert abs(same) < 0.02
    shifts = [mmd2(x, y + s, bandwidth=1.0) for s in (0.5, 1.0, 2.0)]
    assert same < shifts[0] < shifts[1] < shifts[2]
    # by hand: one point each, distance² 2 -> k = e^{-1}; unbiased within-set terms are empty -> −2e^{-1}
    assert mmd2(torch.zeros(1, 2), torch.ones(1, 2), bandwidth=1.0) == pytest.approx(-2 * torch.e ** -1)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from prism.cli import eval; import sys; sys.argv[0] = 'prism-eval'; eval()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_prism_eval_end_to_end_and_bad_input(tiny_model_dir, tmp_path):
    from prism.tasks.grids.generator import SynthConfig, generate

    generate(SynthConfig(out=str(tmp_path / "d"), n=8, n_curated=4, n_align=4, n_rl=4, n_test=4, seed=5))
    out = tmp_path / "r.json"
    proc = _cli("--model", str(tiny_model_dir), "--data", str(tmp_path / "d/test.jsonl"), "--samples", "2",
                "--max-new-tokens", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {"greedy", "sampled", "drift"} <= set(r) and r["sampled"]["n"] == 8
    assert {"length/caption", "tokens/think", "embedding_mmd"} <= set(r["drift"])
    assert "error/perception" in r["greedy"]
    # data without answers (no answer key, no <answer> in the reference turn): answer metrics skipped with
    # a note, drift still computed
    rows = [json.loads(x) for x in (tmp_path / "d/test.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("answer")
        turn = row["messages"][-1]
        turn["content"] = turn["content"][:turn["content"].index("<answer>")]
        row["images"] = [str(tmp_path / "d" / p) for p in row["images"]]
    (tmp_path / "noans.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    proc = _cli("--model", str(tiny_model_dir), "--data", str(tmp_path / "noans.jsonl"), "--max-new-tokens", "4",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert "greedy" not in r and "drift" in r and "no ground-truth" in r["note"]
    # a model directory without a processor
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((tiny_model_dir / f).read_bytes())
    proc = _cli("--model", str(bare), "--data", str(tmp_path / "d/test.jsonl"))
    assert proc.returncode == 2 and "has no usable processor" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, value, says", [
    ("--limit", "0", "--limit: must be a positive integer, got 0"),
    ("--samples", "-1", "--samples: must be a non-negative integer, got -1"),
    ("--temperature", "-1", "--temperature: must be a non-negative number, got -1.0"),
    ("--max-new-tokens", "0", "--max-new-tokens: must be a positive integer, got 0"),
    ("--chunk-size", "0", "--chunk-size: must be a positive integer, got 0"),
    ("--vllm-gpu-memory-utilization", "1.5", "--vllm-gpu-memory-utilization: must be a fraction in (0, 1], got 1.5"),
    ("--vllm-kv-cache-gb", "0", "--vllm-kv-cache-gb: must be a positive number, got 0.0"),
])
def test_prism_eval_refuses_flags_that_cannot_work(tmp_path, flag, value, says):
    from prism.eval.run import main

    with pytest.raises(ConfigError) as info:  # before anything is loaded: neither path exists
        main(["--model", str(tmp_path / "absent"), "--data", str(tmp_path / "absent.jsonl"), flag, value])
    assert str(info.value) == says


def test_prism_eval_bad_flag_is_one_error_line_and_exit_2(tmp_path):
    proc = _cli("--model", str(tmp_path / "absent"), "--data", str(tmp_path / "absent.jsonl"), "--limit", "0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --limit: must be a positive integer, got 0"] == proc.stderr.strip().splitlines()[-1:]


def _corrupt_copy(tiny_model_dir, tmp_path, fault: str) -> Path:
    import shutil

    d = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    if fault == "config":
        (d / "config.json").write_text('{"model_type": ')
    elif fault == "tokenizer":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer_config.json").unlink()
    elif fault == "weights":
        with open(d / "model.safetensors", "r+b") as f:
            f.truncate((d / "model.safetensors").stat().st_size // 2)
    return d


@pytest.mark.parametrize("fault, names", [("config", "config.json is not valid JSON"),
                                          ("tokenizer", "has no usable processor"),
                                          ("weights", "model.safetensors is truncated or corrupt")])
def test_prism_eval_names_model_and_file_of_a_broken_model_dir(tiny_model_dir, tmp_path, fault, names):
    from prism.eval.run import main

    d = _corrupt_copy(tiny_model_dir, tmp_path, fault)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(DataError) as info:
        main(["--model", str(d), "--data", str(data)])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--model: {d}") and names in msg, msg


def test_prism_eval_cli_broken_model_dir_is_one_error_line_and_exit_2(tiny_model_dir, tmp_path):
    d = _corrupt_copy(tiny_model_dir, tmp_path, "weights")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    proc = _cli("--model", str(d), "--data", str(data))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == proc.stderr.strip().splitlines()[-1:], proc.stderr[-2000:]
    assert errors[0].startswith(f"error: --model: {d / 'model.safetensors'} is truncated or corrupt ("), errors


# ------------------------------------------------------------------------------ answer formats, reference answers


def _turns(question: str, reference: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": reference}] if reference is not None else [])


def test_score_responses_reads_answers_by_format_and_accepts_any_answer():
    geo = Example(messages=_turns("q"), answer="3", meta={"equivalent_answers": ["three"]})
    responses = ["<think>t</think> \\boxed{3}", "\\boxed{three}", _resp(CAPTION, "3"), "\\boxed{2} \\boxed{4}"]
    boxed = score_responses([geo] * 4, responses, answer_format="boxed")
    assert boxed["accuracy"] == pytest.approx(2 / 4)  # the tagged response has no box; the last box of the last is 4
    assert boxed["format_rate"] == pytest.approx(2 / 4)  # prism's tags are no box; two boxes are not one answer
    either = score_responses([geo] * 4, responses, answer_format="either")
    assert either["accuracy"] == pytest.approx(3 / 4) and either["format_rate"] == pytest.approx(3 / 4)
    tagged = score_responses([geo] * 4, responses)  # the default: the <answer> tag
    assert tagged["accuracy"] == pytest.approx(1 / 4) and tagged["format_rate"] == pytest.approx(1 / 4)


def test_an_example_without_answer_is_scored_against_its_reference_turn():
    from prism.eval.metrics import ground_truths

    ref = Example(messages=_turns("q", _resp(CAPTION, "7")))
    boxed_ref = Example(messages=_turns("q", "so \\boxed{7}"))
    assert ground_truths(ref) == ["7"] and ground_truths(boxed_ref) == []
    assert ground_truths(boxed_ref, "boxed") == ["7"] and ground_truths(boxed_ref, "either") == ["7"]
    keyed = Example(messages=_turns("q", _resp(CAPTION, "7")), answer="8")
    assert ground_truths(keyed) == ["8"]  # an answer key wins over the reference turn
    m = score_responses([ref, ref, keyed], [_resp(CAPTION, "7"), _resp(CAPTION, "8"), _resp(CAPTION, "8")])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_held_out_data_accepts_reference_answers_and_names_an_example_with_neither(tmp_path):
    from prism.core.config import load_config
    from prism.loop.run import eval_answer_format, load_eval_data
    from prism.rl.config import RLConfig
    from prism.sft.config import SFTConfig

    rows = [{"messages": _turns("q1", _resp(CAPTION, "3"))},                   # reference answer only
            {"messages": _turns("q2", "x = \\boxed{5}")},                       # a boxed reference only
            {"messages": _turns("q3"), "answer": "4"}]                           # an answer key
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = load_config(SFTConfig, None, [f"data.eval={path}"])
    with pytest.raises(DataError, match=r"eval.jsonl:2: no answer \(no answer key, and no reference response "
                                        r"with an <answer> answer\)$"):
        load_eval_data(sft)  # SFT reads <answer> tags: the boxed reference gives none
    rl = load_config(RLConfig, None, [f"data.eval={path}", "reward.answer_format=either"])
    assert eval_answer_format(sft) == "answer" and eval_answer_format(rl) == "either"
    assert [ex.question for ex in load_eval_data(rl)] == ["q1", "q2", "q3"]
    with pytest.warns(UserWarning, match="skipped 1 example"):
        kept = load_eval_data(load_config(SFTConfig, None, [f"data.eval={path}", "data.skip_bad=true"]))
    assert [ex.question for ex in kept] == ["q1", "q3"]
