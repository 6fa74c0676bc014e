"""DuQuant's rotations: greedy block rotations and the zigzag permutation, fused as R1 and R2 exactly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from conftest import SAMPLE_TEXT

from spinquant.duquant import (
    DuQuantConfig, block_diagonal, calibration_windows, duquant_rotations, duquant_transform, greedy_block_rotation,
    residual_block, zigzag_permutation,
)
from spinquant.errors import UserError
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.rotation import apply_rotations, load_rotation_file

ROOT = Path(__file__).parent.parent


def outlier_rows(rows: int = 300, d: int = 64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 5] *= 40  # a massive channel, as down_proj's or the residual stream's
    x[:, 37] *= 10
    return x


def test_greedy_rotation_is_orthogonal_and_spreads_the_outlier():
    x = outlier_rows()
    rotations = greedy_block_rotation(x, 16, 64)
    assert rotations.shape == (4, 16, 16)
    eye = torch.eye(16, dtype=torch.float64)
    assert all((r.T @ r - eye).abs().max() < 1e-12 for r in rotations)
    turned = x @ block_diagonal(rotations)
    peaks_before = x.reshape(-1, 4, 16).abs().amax(dim=(0, 2))
    peaks_after = turned.reshape(-1, 4, 16).abs().amax(dim=(0, 2))
    assert (peaks_after <= peaks_before).all()
    assert peaks_after[0] < peaks_before[0] / 2.5  # the 40× channel spread over its block of 16 (√16 = 4 at best)
    assert torch.allclose((turned ** 2).sum(1), (x ** 2).sum(1), rtol=1e-12)


def test_zigzag_deals_the_largest_channels_back_and_forth():
    channel_max = torch.tensor([1.0, 9, 2, 8, 3, 7, 4, 6])  # largest first: 1, 3, 5, 7, 6, 4, 2, 0
    # 4 blocks of 2 dealt 0, 1, 2, 3, 3, 2, 1, 0: block k holds the k-th largest channel and the k-th smallest
    assert zigzag_permutation(channel_max, 2).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    assert sorted(zigzag_permutation(torch.rand(64), 16).tolist()) == list(range(64))


def test_duquant_transform_is_orthogonal_and_lowers_the_peak():
    x = outlier_rows(d=128)
    t = duquant_transform(x, 32, 128)
    assert (t.T @ t - torch.eye(128, dtype=torch.float64)).abs().max() < 1e-12
    assert (x @ t).abs().max() < x.abs().max() / 3


def test_duquant_rotations_keep_the_model_exact_in_float64():
    """No quantization: the model with DuQuant's R1 and R2 fused (random norm gains folded) gives the same float64 logits."""
    model = tiny_llama(tiny_llama_config(hidden=96, intermediate=192, heads=6, kv_heads=2, head_dim=16))
    windows = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    rotations = duquant_rotations(model, windows, DuQuantConfig(block=32, steps=32))
    assert rotations.r1.shape == (96, 96) and len(rotations.r2) == 2 and rotations.r2[0].shape == (16, 16)
    assert not torch.allclose(rotations.r1, torch.eye(96, dtype=torch.float64))
    assert rotations.smoothing is not None and rotations.smoothing[1].values.shape == (2 * 16,)
    apply_rotations(model, rotations)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(96, dtype=torch.float64))  # 1/s, not 1
    with torch.no_grad():
        assert (model(ids).logits - reference).abs().max() < 1e-6


def test_other_families_stay_exact_and_fused_projections_refuse_smoothing():
    """Qwen2's q/k/v biases are smoothed with their rows; Phi-3 fuses q/k/v and gate/up, so only the rotations apply."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from spinquant.models import randomize_norm_gains

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, max_position_embeddings=256)
    torch.manual_seed(0)
    qwen = randomize_norm_gains(Qwen2ForCausalLM(Qwen2Config(**shape)).double().eval())
    with torch.no_grad():
        qwen.model.layers[0].self_attn.v_proj.bias.normal_()
        ids, windows = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (2, 24))
        reference = qwen(ids).logits
        apply_rotations(qwen, duquant_rotations(qwen, windows, DuQuantConfig(block=32, steps=16)))
        assert (qwen(ids).logits - reference).abs().max() < 1e-6

    phi = Phi3ForCausalLM(Phi3Config(pad_token_id=0, **shape)).double().eval()
    with pytest.raises(UserError, match="this model family fuses them: DuQuant's rotations alone are python -m spinquant.duquant --no-smoothing"):
        duquant_rotations(phi, windows, DuQuantConfig(block=32, steps=16))
    assert duquant_rotations(phi, windows, DuQuantConfig(block=32, steps=16, alpha=None)).smoothing is None


def test_smoothing_scales_are_smoothquants():
    from spinquant.smoothing import smoothing_scales

    a, w = torch.tensor([8.0, 1.0, 0.0, 2.0]), torch.tensor([2.0, 4.0, 1.0, 0.0])
    s = smoothing_scales(a, w, 0.6)
    assert torch.allclose(s[:2], torch.tensor([8 ** 0.6 / 2 ** 0.4, 1 / 4 ** 0.4], dtype=torch.float64), rtol=1e-15)
    assert s[2:].tolist() == [1.0, 1.0]  # a channel never seen, or never read, is left alone


def test_default_block_divides_the_hidden_size_and_a_bad_one_is_refused():
    assert residual_block(576, None) == 64 and residual_block(4096, None) == 128 and residual_block(96, None) == 32
    with pytest.raises(UserError, match="--block 128 does not divide the hidden size 576"):
        residual_block(576, 128)


def test_short_calibration_text_is_refused(tiny_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    with pytest.raises(UserError, match="fewer than one window of 256"):
        calibration_windows(tokenizer, "too short", DuQuantConfig())
    text = (tiny_hf_dir.parent / "text.txt").read_text()
    with pytest.raises(UserError, match=r"gives \d+ windows of 64 tokens; DuQuant's search takes 1000: a longer text, or fewer --windows"):
        calibration_windows(tokenizer, text, DuQuantConfig(windows=1000, seqlen=64))


def test_cli_writes_a_rotation_file_that_loads(tiny_hf_dir, tmp_path):
    out = tmp_path / "duquant.pt"
    run = [sys.executable, "-m", "spinquant.duquant", "--model", str(tiny_hf_dir), "--calib-text", str(tiny_hf_dir.parent / "text.txt"),
           "--windows", "2", "--seqlen", "64", "--steps", "16", "--output", str(out)]
    result = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rotations = load_rotation_file(out, AutoConfig.from_pretrained(tiny_hf_dir))
    assert rotations.r1.shape == (64, 64) and rotations.smoothing[0].down.shape == (128,)
    state = torch.load(out)
    del state["model.layers.1.smoothing.down"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="smoothing scales without 'model.layers.1.smoothing.down'"):
        load_rotation_file(tmp_path / "partial.pt", AutoConfig.from_pretrained(tiny_hf_dir))
    assert '"method": "duquant"' in out.with_suffix(".json").read_text()

    bad = subprocess.run([*run[:-2], "--block", "48", "--output", str(tmp_path / "b.pt")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "spinquant.duquant: error: --block 48 does not divide the hidden size 64: pick a divisor of it, at least 2"
    assert not (tmp_path / "b.pt").exists()


def test_eval_rotation_duquant_searches_once_beside_the_model(tiny_hf_dir, tmp_path, capsys):
    """`--rotation duquant`: DuQuant's default search on the calibration text, kept beside the model and reused."""
    from spinquant import eval as spinquant_eval

    model = tmp_path / "tiny"
    shutil.copytree(tiny_hf_dir, model)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 2)  # 8 windows of 256 tokens of the tiny tokenizer's
    run = ["--model", str(model), "--rotation", "duquant", "--calib-text", str(tmp_path / "calib.txt"), "--quant", "w4a8",
           "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64", "--max-windows", "2"]
    first = spinquant_eval.main(run)
    rotation = Path(first["rotation"])
    assert rotation.parent == model / "spinquant-rotations" and "-duquant-" in rotation.name
    record = json.loads(rotation.with_suffix(".json").read_text())
    assert record["method"] == "duquant" and record["alpha"] == 0.6 and record["windows"] == 8
    assert load_rotation_file(rotation, AutoConfig.from_pretrained(model)).smoothing is not None
    again = spinquant_eval.main(run)
    assert again["rotation"] == str(rotation) and again["perplexity"] == first["perplexity"]
    assert f"DuQuant rotation: {rotation} (cached)" in capsys.readouterr().err
    with pytest.raises(UserError, match="is the calibration text of the rotation"):
        spinquant_eval.main([*run[:-6], "--text", str(tmp_path / "calib.txt")])
