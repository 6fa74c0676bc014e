"""spinquant.prepare, the library's one call: as the README shows it, a saved GPTQ result, and refusals before any work."""

import copy

import pytest
import torch

import spinquant
from spinquant.errors import UserError
from spinquant.models import tiny_llama, tiny_llama_config


def test_readme_library_use_and_a_saved_gptq_result_give_the_same_model(tiny_hf_dir, tmp_path):
    calib = tiny_hf_dir.parent / "text.txt"
    loaded = spinquant.load_model(str(tiny_hf_dir))
    model = spinquant.prepare(loaded.model, "hadamard", spinquant.setting("w4a8"), spinquant.GPTQConfig(windows=4, seqlen=64),
                              tokenizer=loaded.tokenizer, calib_text=calib)
    assert model.spinquant.rotation == "hadamard" and model.spinquant.gptq.windows == 4
    model.spinquant.gptq.save(tmp_path / "gptq.pt")
    again = spinquant.prepare(spinquant.load_model(str(tiny_hf_dir)).model, "hadamard", spinquant.setting("w4a8"), tmp_path / "gptq.pt")
    ids = torch.tensor([[5, 17, 33, 2, 60, 7, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        rtn = spinquant.prepare(spinquant.load_model(str(tiny_hf_dir)).model, "hadamard", spinquant.setting("w4a8"))(ids).logits
    assert not torch.equal(model(ids).logits, rtn)  # the saved integers, not round to nearest


def test_full_precision_prepare_keeps_the_models_function():
    model = tiny_llama(tiny_llama_config(), dtype=torch.float64)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        reference = model(ids).logits
        rotated = spinquant.prepare(model, "hadamard", spinquant.QuantConfig())(ids).logits
    assert (rotated - reference).abs().max() < 1e-6  # transformers' RMSNorm computes in float32


def test_settings_that_cannot_work_are_refused_before_the_model_changes():
    model = tiny_llama(tiny_llama_config(), dtype=torch.float64)
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(UserError, match="GPTQ is asked for int4 in groups of 64; this quantization needs int4 in groups of 32"):
        spinquant.prepare(model, "hadamard", spinquant.setting("w4a8"), spinquant.GPTQConfig(group=64))
    with pytest.raises(UserError, match=r"use --qlinear 8da4w \(or e8p2, e8p4\), not 8da8w"):
        spinquant.prepare(model, "hadamard", spinquant.ProgramQuant(qlinear="8da8w"), spinquant.GPTQConfig())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)


def every_tensor(model) -> dict[str, torch.Tensor]:
    """Each parameter and buffer by name, a torchao tensor by its parts (qdata, scale, zero point)."""
    tensors = {}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        parts = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else []
        tensors |= {f"{name}.{part}": getattr(t, part) for part in parts} if parts else {name: t}
    return tensors


def assert_same_tensors(model, other) -> None:
    ours, theirs = every_tensor(model), every_tensor(other)
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name


@pytest.fixture(scope="module")
def bf16_dir(tiny_hf_dir, tmp_path_factory):
    """tiny_hf_dir's model stored in bf16, as Hugging Face ships Llama 3.2."""
    loaded = spinquant.load_model(str(tiny_hf_dir))
    path = tmp_path_factory.mktemp("bf16") / "tiny"
    loaded.model.to(torch.bfloat16).save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("rotation", ["none", "r4", "hadamard"])
@pytest.mark.parametrize("quant", [spinquant.ProgramQuant(), spinquant.setting("w4a8")], ids=["torchao", "fake"])
def test_a_bf16_checkpoint_loaded_in_bf16_is_prepared_to_the_float32_loads_weights(bf16_dir, tiny_hf_dir, rotation, quant):
    narrow = spinquant.load_model(str(bf16_dir), None).model
    assert narrow.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert spinquant.load_model(str(tiny_hf_dir), None).model.lm_head.weight.dtype == torch.float32  # a float32 checkpoint stays so
    wide = spinquant.load_model(str(bf16_dir)).model
    assert_same_tensors(spinquant.prepare(narrow, rotation, quant), spinquant.prepare(wide, rotation, quant))


def test_quantizing_each_part_as_it_is_rotated_gives_the_whole_model_schedules_weights():
    from spinquant.rotation import apply_rotations, rotations_for
    from spinquant.torchao_quant import quantize_for_export

    model = tiny_llama(tiny_llama_config(layers=3), dtype=torch.float32)
    whole = quantize_for_export(apply_rotations(copy.deepcopy(model), rotations_for("hadamard", model.config)), spinquant.ProgramQuant())
    assert_same_tensors(spinquant.prepare(model, "hadamard", spinquant.ProgramQuant()), whole)
