"""`export.to_pte --rotation learn`: learned once per model and recipe, kept beside the model, resumed after an interruption;
`--rotation duquant`: searched once per model, likewise."""

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import SAMPLE_TEXT
from export.to_pte import main as export_main
from spinquant import optimize
from spinquant.models import train_bpe_tokenizer
from spinquant.rotation_cache import model_sha256


@pytest.fixture
def qwen3_dir(tmp_path):
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXT, 300)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path / "qwen3"
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT.replace("Boulter", "Smith"))
    return path


def export(model: Path, out: Path, *extra: str) -> dict:
    export_main(["--model", str(model), "--rotation", "learn", "--learn-iters", "4", "--max-seq-len", "32",
                 "--calib-text", str(model.parent / "calib.txt"), "--output-dir", str(out), *extra])
    return json.loads((out / "export_report.json").read_text())


def counting_steps(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count optimizer steps (train_step calls); raise KeyboardInterrupt at call `fail_at`, as a user's Ctrl-C."""
    calls, real = [], optimize.train_step

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(optimize, "train_step", step)
    return calls


def test_learns_once_beside_the_model_and_exports(qwen3_dir, tmp_path, monkeypatch, capsys):
    steps = counting_steps(monkeypatch)
    report = export(qwen3_dir, tmp_path / "out")
    rotation = Path(report["options"]["rotation"])
    assert rotation.parent == qwen3_dir / "spinquant-rotations" and rotation.name.startswith(model_sha256(str(qwen3_dir))[:16] + "-w4a8-")
    assert report["rotation"]["from_rotation_learn"] and report["rotation"]["r1"]
    assert json.loads(rotation.with_suffix(".json").read_text())["iters"] == 4 and len(steps) == 4
    assert report["verify"]["mean_kl"] < 1e-3
    assert "learning rotations on the CPU: about" in capsys.readouterr().err

    again = export(qwen3_dir, tmp_path / "again")
    assert len(steps) == 4 and again["options"]["rotation"] == str(rotation)  # cached: no step learned twice
    assert f"learned rotation: {rotation} (cached)" in capsys.readouterr().err


def test_another_recipe_or_plan_learns_its_own(qwen3_dir, tmp_path):
    rtn = Path(export(qwen3_dir, tmp_path / "rtn")["options"]["rotation"])
    int8 = Path(export(qwen3_dir, tmp_path / "int8", "--qlinear", "8da8w")["options"]["rotation"])
    longer = Path(export(qwen3_dir, tmp_path / "longer", "--learn-iters", "5")["options"]["rotation"])
    assert "-executorch-" in int8.name and "-w4a8-" in rtn.name and len({rtn, int8, longer}) == 3


def test_an_interrupted_run_resumes(qwen3_dir, tmp_path, monkeypatch):
    counting_steps(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        export(qwen3_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list((qwen3_dir / "spinquant-rotations").glob("*.ckpt"))
    steps = counting_steps(monkeypatch)
    report = export(qwen3_dir, tmp_path / "out", "--resume")
    assert len(steps) == 2  # steps 1-2 came from the checkpoint
    assert report["verify"]["mean_kl"] < 1e-3


def test_resume_without_learning_is_refused(qwen3_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main(["--model", str(qwen3_dir), "--rotation", "hadamard", "--resume", "--output-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "--resume continues learning rotations" in capsys.readouterr().err


def test_duquant_is_searched_once_beside_the_model_and_exports(qwen3_dir, tmp_path, capsys):
    (qwen3_dir.parent / "calib.txt").write_text(SAMPLE_TEXT * 2)  # DuQuant's 8 windows of 256 tokens
    report = export(qwen3_dir, tmp_path / "out", "--rotation", "duquant", "--no-gptq")
    rotation = Path(report["options"]["rotation"])
    assert rotation.parent == qwen3_dir / "spinquant-rotations" and "-duquant-" in rotation.name
    assert report["rotation"]["from_rotation_duquant"] and not report["rotation"]["from_rotation_learn"]
    assert "DuQuant's rotations" in report["stage_seconds"] and report["verify"]["mean_kl"] < 1e-3
    again = export(qwen3_dir, tmp_path / "again", "--rotation", "duquant", "--no-gptq")
    assert again["options"]["rotation"] == str(rotation) and f"DuQuant rotation: {rotation} (cached)" in capsys.readouterr().err
