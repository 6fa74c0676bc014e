import copy

import pytest
import torch
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerGroup, quantize_

from spinquant.errors import UserError
from spinquant.models import tiny_llama, tiny_llama_config
from spinquant.pipeline import prepare
from spinquant.quant import QuantConfig, fake_quantize, fake_quantize_weight_mse, quantize_model, setting


def outlier_input(rows=7, n=1536, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen)
    x[:, 5] *= 80  # an outlier channel, as at SmolLM2's down_proj input
    return x


@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a8_matches_torchao_8da4w(group):
    torch.manual_seed(group)
    linear = torch.nn.Linear(1536, 96, bias=False)
    x = outlier_input()
    reference = copy.deepcopy(linear)
    quantize_(reference, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group)))
    ours = torch.nn.functional.linear(fake_quantize(x, 8, 0, symmetric=False), fake_quantize(linear.weight, 4, group, symmetric=True))
    expected = reference(x)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.allclose(ours, linear(x), atol=1e-3)  # it really quantized


def test_int4_weights_match_torchao_weight_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 32, bias=False)
    reference = copy.deepcopy(linear)
    quantize_(reference, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    assert torch.allclose(reference.weight.dequantize(), fake_quantize(linear.weight, 4, 32, symmetric=True), atol=1e-7)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False), (3, True)])
def test_fake_quantize_uses_at_most_2_pow_bits_levels_per_group(bits, symmetric):
    x = torch.randn(4, 128, dtype=torch.float64)
    q = fake_quantize(x, bits, 32, symmetric).unflatten(-1, (4, 32))
    for row in q.flatten(0, 1):
        assert row.unique().numel() <= 2**bits
    err = (q.flatten(-2) - x).abs().max()
    assert 0 < err < (x.abs().max() * 2 / (2**bits - 1))


def test_asymmetric_activations_keep_zero_exact():
    x = torch.rand(3, 64) + 0.5
    x[:, 0] = 0.0
    assert torch.equal(fake_quantize(x, 8, 0, symmetric=False)[:, 0], torch.zeros(3))


def test_clip_ratio_clips():
    x = torch.linspace(-1, 1, 64)[None]
    # Symmetric scale is clip·max / 127.5 and the code -128 is reachable, as in torchao.
    assert fake_quantize(x, 8, 0, symmetric=True, clip=0.5).abs().max() <= 0.5 * 128 / 127.5 + 1e-6


def test_fixed_weight_clip_is_a_ratio_of_each_groups_range():
    """--w-clip r: each group's scale is r·max|w| / 7.5 (float64 reference, one group at a time); lm_head is never clipped."""
    from spinquant.quant import lm_head_config, quantize_weight

    w = torch.randn(8, 64, dtype=torch.float64)
    ours = quantize_weight(w, QuantConfig(w_bits=4, w_group=32, w_clip=0.8))
    groups = w.unflatten(-1, (2, 32))
    scale = 0.8 * groups.abs().amax(-1, keepdim=True) / 7.5
    reference = (torch.clamp(torch.round(groups / scale), -8, 7) * scale).flatten(-2)
    assert (ours - reference).abs().max() < 1e-12
    assert not torch.allclose(ours, quantize_weight(w, QuantConfig(w_bits=4, w_group=32)))
    assert lm_head_config(QuantConfig(w_bits=4, w_clip=0.8)).w_clip == 1.0


def test_mse_clip_search_never_worse_than_round_to_nearest():
    w = torch.randn(64, 256, dtype=torch.float64)
    w[:, ::50] *= 10
    rtn = (fake_quantize(w, 4, 32, True) - w).pow(2).sum()
    mse = (fake_quantize_weight_mse(w, 4, 32, True) - w).pow(2).sum()
    assert mse < rtn


def test_bits_16_is_identity_and_bad_group_refused():
    x = torch.randn(2, 48)
    assert fake_quantize(x, 16) is x
    with pytest.raises(UserError, match="group size 32 does not divide the dimension 48"):
        fake_quantize(x, 4, 32)


def test_quantize_model_weights_activations_and_kv():
    config = tiny_llama_config(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(0, 128, (1, 16))
    ref = tiny_llama(config, dtype=torch.float32)
    with torch.no_grad():
        fp = ref(ids).logits
        outputs = {}
        for name in ("w4a16", "w4a8", "w4a4kv4"):
            model = quantize_model(tiny_llama(config, dtype=torch.float32), setting(name, kv_group=16))
            outputs[name] = model(ids).logits
            assert torch.equal(model.lm_head.weight, ref.lm_head.weight)  # lm_head stays float by default
    errors = {k: (v - fp).abs().max().item() for k, v in outputs.items()}
    assert 0 < errors["w4a16"] < errors["w4a4kv4"]
    assert errors["w4a16"] != errors["w4a8"]


def test_group_that_does_not_divide_a_layer_is_refused():
    model = tiny_llama(tiny_llama_config(hidden=96, intermediate=192, heads=3, kv_heads=3), dtype=torch.float32)
    with pytest.raises(UserError, match="group size 64 does not divide .*96 inputs"):
        quantize_model(model, setting("w4a16", w_group=64))


def test_export_setting_matches_the_torchao_model_the_export_lowers():
    """`w4a8-export` fake quantization computes what spinquant/torchao_quant.py's torchao model computes."""
    from spinquant.torchao_quant import ProgramQuant, quantize_for_export

    torch.manual_seed(0)
    model = tiny_llama(tiny_llama_config(), dtype=torch.float32).requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    fake = quantize_model(copy.deepcopy(model), setting("w4a8-export"))
    torchao = quantize_for_export(copy.deepcopy(model), ProgramQuant())
    decoder_only = quantize_model(copy.deepcopy(model), setting("w4a8"))
    with torch.no_grad():
        expected, ours, other = torchao(ids).logits, fake(ids).logits, decoder_only(ids).logits
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (other - expected).abs().max() > 1e-2 * expected.abs().max()  # the embedding and lm_head settings matter


def test_r3_spreads_an_outlier_key_channel_before_low_bit_keys():
    """Keys with one large channel per head: int4 keys quantized per head lose the other channels, unless R3's
    Hadamard spreads the outlier over all of them first (q·kᵀ is unchanged by it in float)."""
    model = tiny_llama(tiny_llama_config(hidden=64, heads=4, kv_heads=2), dtype=torch.float32)
    for layer in model.model.layers:
        layer.self_attn.k_proj.weight.data[::16] *= 40  # channel 0 of each 16-wide key head
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        errors = {}
        for r3 in (True, False):
            qc = QuantConfig(k_bits=4, kv_group=0, r3=r3)
            quantized = prepare(copy.deepcopy(model), "hadamard", qc)
            errors[r3] = (quantized(ids).logits - reference).abs().mean().item()
        assert prepare(copy.deepcopy(model), "hadamard", QuantConfig(r3=True)).spinquant.rotations.r3 is False  # float K/V: no R3
    assert errors[True] < errors[False] / 2
