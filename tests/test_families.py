"""Mistral, Qwen2/2.5, Qwen3 and Phi-3 beside Llama: rotations fuse exactly, learning and GPTQ run, the export's check passes.

Tiny random models with random norm gains (Qwen3's q_norm/k_norm too) and Qwen2's q/k/v biases, so that folding
and turning biases are exercised; Phi-3's fused qkv_proj/gate_up_proj with partial rotary, as Phi-4-mini has.
"""

import copy

import pytest
import torch
from transformers import (MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

import spinquant
from conftest import SAMPLE_TEXT
from gptq_reference import whole_model_gptq
from spinquant.models import randomize_norm_gains, train_bpe_tokenizer
from export.to_pte import main as export_main
from export.to_pte import run
from export.options import ExportOptions
from spinquant import optimize
from spinquant.gptq import gptq_model
from spinquant.hadamard import random_orthogonal_matrix
from spinquant.rotation import rotations_for

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "qwen2": lambda vocab: Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPE)),
    "mistral": lambda vocab: MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=64, **SHAPE)),
    "qwen3": lambda vocab: Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, head_dim=16, tie_word_embeddings=True, **SHAPE)),
    # Phi-4-mini's RoPE: 3/4 of each head, longrope factors (its short ones below original_max_position_embeddings).
    "phi3": lambda vocab: Phi3ForCausalLM(Phi3Config(
        vocab_size=vocab, partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0, original_max_position_embeddings=128,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.5, 2.0, 1.0, 3.0, 1.2], long_factor=[4.0] * 6), **SHAPE)),
}


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    randomize_norm_gains(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXT, 300)
    path = tmp_path_factory.mktemp(request.param) / request.param
    randomized(FAMILIES[request.param](len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "calib.txt").write_text(SAMPLE_TEXT.replace("Boulter", "Smith"))
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_rotation_fuses_exactly(family, tmp_path):
    model = randomized(FAMILIES[family](128)).double()
    gen = torch.Generator().manual_seed(1)
    learned_style = tmp_path / "R.pt"
    torch.save({"R1": random_orthogonal_matrix(64, gen), **{f"model.layers.{i}.self_attn.R2": random_orthogonal_matrix(16, gen) for i in range(2)}},
               learned_style)
    ids = torch.randint(0, 128, (2, 24), generator=gen)
    with torch.no_grad():
        reference = model(ids).logits
        with_r3 = rotations_for("hadamard", model.config, r3=True)  # R3 after RoPE (and Qwen3's q_norm/k_norm, Phi-3's partial RoPE)
        for rotation in ("none", "r4", "hadamard", "orthogonal", str(learned_style), with_r3):
            rotated = spinquant.prepare(copy.deepcopy(model), rotation)(ids).logits
            assert (rotated - reference).abs().max() < 1e-6, rotation  # transformers' RMSNorm computes in float32


def test_gptq_and_the_export_check(family_dir, tmp_path):
    loaded = spinquant.load_model(str(family_dir))
    model = spinquant.prepare(loaded.model, "hadamard", spinquant.setting("w4a8"), spinquant.GPTQConfig(windows=4, seqlen=64),
                              tokenizer=loaded.tokenizer, calib_text=family_dir.parent / "calib.txt")
    linears = {name for name, m in model.model.layers.named_modules(prefix="model.layers") if isinstance(m, torch.nn.Linear)}
    assert set(model.spinquant.gptq.weights) == linears and len(linears) == 2 * (4 if "phi3" in family_dir.name else 7)
    report = run(ExportOptions(model=str(family_dir), rotation="hadamard", max_seq_len=64, output_dir=tmp_path).check())
    assert report["verify"]["mean_kl"] < 1e-3  # a wrong program is off by nats; top-1 flips at near-ties of a random model


def test_layer_at_a_time_gptq_equals_the_whole_model_reference(family_dir):
    """gptq_model computes each layer's parts once (attention, o_proj, the MLP's inner input): the same integers as rerunning
    both whole models for every group, on each family's layer layout (Phi-3's fused projections, Qwen3's q_norm/k_norm)."""
    model = spinquant.prepare(spinquant.load_model(str(family_dir)).model, "hadamard")
    windows = torch.randint(0, model.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    got = gptq_model(model, windows, spinquant.GPTQConfig(), torch.device("cpu"), progress=False, lm_head=True)
    want = whole_model_gptq(reference, windows, spinquant.GPTQConfig(), lm_head=True)
    assert set(got) == set(want) and all(torch.equal(got[n].qdata, want[n].qdata) for n in want)


def test_rotation_learning_runs(family_dir, tmp_path):
    args = ["--model", str(family_dir), "--calib-text", str(family_dir.parent / "calib.txt"), "--seqlen", "32", "--iters", "2",
            "--batch-size", "2", "--device", "cpu", "--output", str(tmp_path / "R.pt")]
    optimize.main(args)
    assert spinquant.prepare(spinquant.load_model(str(family_dir)).model, str(tmp_path / "R.pt")).spinquant.rotations.r1.shape == (64, 64)


def test_a_sliding_window_shorter_than_the_cache_is_refused_before_export(tmp_path, capsys):
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXT, 300)
    path = tmp_path / "mistral"
    randomized(FAMILIES["mistral"](len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(SystemExit) as exit_:
        export_main(["--model", str(path), "--max-seq-len", "128", "--output-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "--max-seq-len 128 is above the model's sliding window of 64 tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
