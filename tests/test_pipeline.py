"""spinquant.prepare, the library's one call: as the README shows it, a saved GPTQ result, and refusals before any work."""

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
    with pytest.raises(UserError, match="use --qlinear 8da4w, not 8da8w"):
        spinquant.prepare(model, "hadamard", spinquant.ProgramQuant(qlinear="8da8w"), spinquant.GPTQConfig())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
