import pytest
import torch

from spinquant.errors import UserError
from spinquant.hadamard import random_orthogonal_matrix
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.rotation import Rotations, apply_rotations, rotate_input_side, rotated_parts, rotations_for

# hidden 64/96/576, MLP 128/1536/1792, head_dim 16/32/64, GQA 1/3/4, tied and untied.
CONFIGS = {
    "h64-mlp128-hd16-gqa1-tied": dict(hidden=64, intermediate=128, heads=4, kv_heads=4, head_dim=16, tied=True),
    "h96-mlp1536-hd32-gqa3-untied": dict(hidden=96, intermediate=1536, heads=3, kv_heads=1, head_dim=32, tied=False),
    "h576-mlp1792-hd64-gqa3-tied": dict(hidden=576, intermediate=1792, heads=9, kv_heads=3, head_dim=64, tied=True),
    "h64-mlp1536-hd16-gqa4-untied": dict(hidden=64, intermediate=1536, heads=8, kv_heads=2, head_dim=16, tied=False),
    "h96-mlp1792-hd32-gqa4-tied": dict(hidden=96, intermediate=1792, heads=4, kv_heads=1, head_dim=32, tied=True),
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", ["none", "r4", "hadamard", "orthogonal"])
@pytest.mark.parametrize("name", CONFIGS)
def test_rotated_model_keeps_logits_in_float64(name, spec):
    model = tiny_llama(tiny_llama_config(**CONFIGS[name]))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    apply_rotations(model, rotations_for(spec, model.config, seed=3, r3=spec != "none"))
    assert (logits(model, ids) - ref).abs().max() < 1e-6


def test_rotation_really_changes_weights_and_folds_norms():
    model = tiny_llama(tiny_llama_config(**CONFIGS["h96-mlp1536-hd32-gqa3-untied"]))
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    apply_rotations(model, rotations_for("hadamard", model.config))
    layer = model.model.layers[0]
    assert not torch.allclose(layer.self_attn.q_proj.weight, q_before)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_tied_embeddings_are_untied_before_r1():
    model = tiny_llama(tiny_llama_config(**CONFIGS["h64-mlp128-hd16-gqa1-tied"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_rotations(model, rotations_for("orthogonal", model.config))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings


def test_r4_keeps_norms_and_puts_online_hadamard_on_down_proj():
    model = tiny_llama(tiny_llama_config(**CONFIGS["h96-mlp1536-hd32-gqa3-untied"]))
    gain = model.model.layers[0].input_layernorm.weight.clone()
    apply_rotations(model, rotations_for("r4", model.config))
    assert torch.equal(model.model.layers[0].input_layernorm.weight, gain)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "OnlineHadamardLinear"


def spinquant_file(path, hidden, head_dim, layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {"R1": random_orthogonal_matrix(hidden, gen).float()}
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.R2"] = random_orthogonal_matrix(head_dim, gen).float()
    torch.save(state, path)
    return path


def test_learned_rotation_file_in_spinquant_layout(tmp_path):
    model = tiny_llama(tiny_llama_config(**CONFIGS["h96-mlp1792-hd32-gqa4-tied"]))
    ids = torch.randint(0, 128, (1, 16))
    ref = logits(model, ids)
    path = spinquant_file(tmp_path / "R.bin", 96, 32, 2)
    rot = rotations_for(str(path), model.config)
    assert rot.r1.shape == (96, 96) and len(rot.r2) == 2 and rot.r4
    apply_rotations(model, rot)
    # The file holds float32 matrices: orthonormal to ~1e-7, so the function is kept to that.
    assert (logits(model, ids) - ref).abs().max() < 1e-5


def test_rotation_file_of_wrong_shape_is_refused(tmp_path):
    config = tiny_llama_config(**CONFIGS["h96-mlp1792-hd32-gqa4-tied"])
    path = spinquant_file(tmp_path / "R.bin", 64, 32, 2)
    with pytest.raises(UserError, match=r"'R1' is \(64, 64\), the model needs \(96, 96\)"):
        rotations_for(str(path), config)
    with pytest.raises(UserError, match="not found"):
        rotations_for(str(tmp_path / "missing.bin"), config)
    with pytest.raises(UserError, match="unknown rotation 'spin'"):
        rotations_for("spin", config)


def test_unsupported_mlp_size_is_refused_before_any_change():
    model = tiny_llama(tiny_llama_config(hidden=64, intermediate=272, heads=4, kv_heads=4))  # 272 = 17·16
    with pytest.raises(UserError, match="no Hadamard matrix of size 272"):
        apply_rotations(model, Rotations(r4=True))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"


@pytest.mark.demo
def test_demo_model_rotated_keeps_logits_in_float32(demo):
    import copy

    model = copy.deepcopy(demo.model)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    apply_rotations(model, rotations_for("hadamard", model.config, r3=True))
    assert (logits(model, ids) - ref).abs().max() < 1e-3


def test_rotating_rows_in_blocks_is_the_dense_float64_product():
    embedding = torch.nn.Embedding(10000, 32)  # two whole blocks of rows and a partial one
    r = random_orthogonal_matrix(32, torch.Generator().manual_seed(0))
    dense = (embedding.weight.detach().double() @ r).float()
    rotate_input_side(embedding, r)
    assert (embedding.weight - dense).abs().max() <= 1e-7 * dense.abs().max()


def test_a_bf16_model_is_widened_to_float32_one_part_at_a_time():
    model = tiny_llama(tiny_llama_config(layers=3), dtype=torch.bfloat16)
    order = ["model.layers.0", "model.layers.1", "model.layers.2", "model.embed_tokens", "lm_head"]
    done = []
    for part in rotated_parts(model, rotations_for("hadamard", model.config)):
        done.append(part)
        for name in order:
            dtypes = {p.dtype for p in model.get_submodule(name).parameters()}
            assert dtypes == ({torch.float32} if name in done else {torch.bfloat16}), (part, name)
    assert done == order
    assert {t.dtype for t in (*model.parameters(), *model.buffers())} == {torch.float32}
