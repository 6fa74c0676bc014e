"""The compact GPTQ file (spinquant/gptq_compact.py): integers stored as differences from round to nearest."""

import dataclasses

import pytest
import torch

from spinquant.errors import UserError
from spinquant.gptq import GPTQConfig, GPTQResult, QuantizedWeight, gptq_linears, round_to_nearest
from spinquant.gptq_compact import PACKAGED, load_gptq_file, save_compact
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quant import setting
from spinquant.rotation import default_rotation


@pytest.fixture(scope="module")
def rotated(tiny_hf_dir):
    return prepare(load_model(str(tiny_hf_dir)).model, "r4", setting("fp"))


def gptq_like(model, seed: int = 0) -> GPTQResult:
    """Round to nearest with one weight in five moved by ±1 (and a few by ±2 or to the ends of the range), and scales
    moved by up to ±20% as the tuning moves them: GPTQ's integers as far as the file can tell."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, linear in gptq_linears(model, lm_head=True).items():
        rtn = round_to_nearest(linear.weight.data, GPTQConfig(clip_search=False))
        step = torch.randint(-1, 2, rtn.qdata.shape, generator=gen) * (torch.rand(rtn.qdata.shape, generator=gen) < 0.2)
        step += 2 * (torch.rand(rtn.qdata.shape, generator=gen) < 0.005)
        q = (rtn.qdata + step).clamp(-8, 7).to(torch.int8)
        q[0, :3] = torch.tensor([-8, 7, 0], dtype=torch.int8)
        scale = (rtn.scale.float() * (0.8 + 0.4 * torch.rand(rtn.scale.shape, generator=gen))).to(torch.bfloat16)
        weights[name] = QuantizedWeight(q, scale)
    return GPTQResult(weights, GPTQConfig(), "tiny", "r4", "calib.txt", "0" * 64, 4, 1.0)


def test_round_trip_is_exact_in_about_a_bit_per_weight(rotated, tmp_path, capsys):
    result = gptq_like(rotated)
    save_compact(result, rotated, tmp_path / "g.gptq")
    compact = load_gptq_file(tmp_path / "g.gptq")
    got = compact.decoded(rotated, "g.gptq")
    assert set(got.weights) == set(result.weights) and got.config == result.config and got.rotation == "r4"
    for name, qw in result.weights.items():
        assert torch.equal(got.weights[name].qdata, qw.qdata) and torch.equal(got.weights[name].scale, qw.scale)
    assert "differs" not in capsys.readouterr().err
    weights = sum(qw.qdata.numel() for qw in result.weights.values())
    # The differences' entropy is 0.67 bits a weight; lzma learns it slowly: 1.9 bits on these 81k weights, 0.69 on the demo's 106M.
    assert sum(len(d) for d in compact.deltas) * 8 / weights < 2.5


def test_a_machine_that_rounds_differently_is_told(rotated, tiny_hf_dir, tmp_path, capsys):
    result = gptq_like(rotated)
    save_compact(result, rotated, tmp_path / "g.gptq")
    name = "model.layers.0.mlp.up_proj"
    nudged = prepare(load_model(str(tiny_hf_dir)).model, "r4", setting("fp"))
    nudged.get_submodule(name).weight.data[0, 5] += result.weights[name].scale[0, 0].float()
    got = load_gptq_file(tmp_path / "g.gptq").decoded(nudged, "g.gptq")
    assert not torch.equal(got.weights[name].qdata, result.weights[name].qdata)
    assert "its integers' sha256 differs" in capsys.readouterr().err


def test_a_corrupt_or_misfit_compact_file_is_one_line(rotated, tmp_path):
    result = gptq_like(rotated)
    path = tmp_path / "g.gptq"
    save_compact(result, rotated, path)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "deltas": state["deltas"][1:]}, tmp_path / "short.gptq")
    with pytest.raises(UserError, match="holds 16 parts of differences, not 17: corrupt"):
        load_gptq_file(tmp_path / "short.gptq").decoded(rotated, "short.gptq")
    torch.save({**state, "deltas": state["deltas"][::-1]}, tmp_path / "swapped.gptq")
    with pytest.raises(UserError, match=r"holds \d+ differences for \d+ weights: corrupt"):
        load_gptq_file(tmp_path / "swapped.gptq").decoded(rotated, "swapped.gptq")
    torch.save({**state, "scales": state["scales"][:100]}, tmp_path / "cut.gptq")
    with pytest.raises(UserError, match="compact GPTQ file .*cut.gptq is corrupt"):
        load_gptq_file(tmp_path / "cut.gptq")
    torch.save({**state, "shapes": {"x.weird": [4, 64]}}, tmp_path / "other.gptq")
    with pytest.raises(UserError, match="for x.weird, which this model's weights do not match"):
        load_gptq_file(tmp_path / "other.gptq").decoded(rotated, "other.gptq")


def test_e8p_codes_are_refused(rotated, tmp_path):
    result = dataclasses.replace(gptq_like(rotated), config=GPTQConfig(codebook="e8p", bits=2))
    with pytest.raises(UserError, match="E8P codes are already 2 bits"):
        save_compact(result, rotated, tmp_path / "g.gptq")


@pytest.mark.demo
def test_the_packaged_result_decodes_exactly_on_this_machine(capsys):
    model = prepare(load_model("smollm2-135m").model, default_rotation("smollm2-135m"), setting("fp"))
    result = load_gptq_file(PACKAGED["smollm2-135m"]).decoded(model, "packaged")
    assert len(result.weights) == 210 and "lm_head" not in result.weights and result.config.tune_steps == 200
    assert "differs" not in capsys.readouterr().err  # the integers the GPU machine's GPTQ and tuning chose, bit for bit
