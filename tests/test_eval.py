import json
import math
import shutil

import pytest
import torch

from spinquant.errors import UserError
from spinquant.data import token_windows
from spinquant.eval import cli, main
from spinquant.metrics import perplexity
from spinquant.models import load_model, tiny_llama, tiny_llama_config


def test_perplexity_is_exp_of_mean_token_nll():
    model = tiny_llama(tiny_llama_config(), dtype=torch.float32)
    windows = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(math.exp(nll), rel=1e-5)


def test_windows_are_non_overlapping_and_tail_dropped(tiny_hf_dir):
    tok = load_model(str(tiny_hf_dir)).tokenizer
    text = (tiny_hf_dir.parent / "text.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    w = token_windows(tok, text, 64, None)
    assert w.shape == (len(ids) // 64, 64)
    assert w.flatten().tolist() == ids[: w.numel()]
    assert token_windows(tok, text, 64, 2).shape == (2, 64)
    with pytest.raises(UserError, match="fewer than one window"):
        token_windows(tok, "a b", 64, None)


def test_windows_can_start_after_the_first(tiny_hf_dir):
    tok = load_model(str(tiny_hf_dir)).tokenizer
    text = (tiny_hf_dir.parent / "text.txt").read_text()
    every = token_windows(tok, text, 16, None)
    assert torch.equal(token_windows(tok, text, 16, 3, first=2), every[2:5])
    assert torch.equal(token_windows(tok, text, 16, None, first=2), every[2:])
    with pytest.raises(UserError, match=f"fewer than {len(every) + 1} windows"):
        token_windows(tok, text, 16, None, first=len(every))


def test_cli_on_local_hf_dir_writes_json(tiny_hf_dir, tmp_path):
    out = tmp_path / "r.json"
    args = ["--model", str(tiny_hf_dir), "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "64"]
    fp = main(args + ["--output", str(out)])
    q = main(args + ["--rotation", "hadamard", "--quant", "w4a4kv4", "--kv-group", "16"])
    saved = json.loads(out.read_text())
    assert saved["perplexity"] == fp["perplexity"] and len(saved["text_sha256"]) == 64
    assert q["quant"]["k_bits"] == 4 and q["perplexity"] != fp["perplexity"]
    rotated_fp = main(args + ["--rotation", "hadamard"])
    assert rotated_fp["perplexity"] == pytest.approx(fp["perplexity"], rel=1e-4)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "llama-9000", "--text", __file__], "unknown model 'llama-9000'"),  # any existing text
        (["--text", "/nonexistent.txt"], "text file not found: /nonexistent.txt"),
        (["--quant", "w2a2"], "unknown quantization setting 'w2a2'"),
        (["--w-clip", "1.2"], "--w-clip 1.2: a clip ratio is in (0, 1]"),
        (["--w-clip", "0.8", "--w-clip-search"], "give --w-clip (a fixed ratio) or --w-clip-search"),
    ],
)
def test_cli_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv + ["--max-windows", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_an_unsupported_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="'gpt2' model; supported families: llama, mistral, qwen2, qwen3, phi3"):
        load_model(str(tmp_path))


@pytest.mark.demo
def test_demo_model_is_smollm2(demo):
    c = demo.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.intermediate_size == 1536 and demo.model.lm_head.weight is demo.model.model.embed_tokens.weight
    windows = token_windows(demo.tokenizer, "The capital of France is Paris. " * 100, 128, 1)
    assert 1 < perplexity(demo.model, windows, progress=False) < 20


@pytest.mark.demo
def test_demo_model_cached_directory_is_the_gguf_model(demo):
    from spinquant.models import demo_gguf_path, load_gguf

    from_gguf = load_gguf(demo_gguf_path("smollm2-135m"))
    cached, original = demo.model.state_dict(), from_gguf.model.state_dict()
    assert cached.keys() == original.keys() and all(torch.equal(cached[k], original[k]) for k in cached)
    text = "The capital of France is Paris. Ünïcödé, digits 12345 and <|im_end|>"
    assert demo.tokenizer(text)["input_ids"] == from_gguf.tokenizer(text)["input_ids"]
    assert demo.tokenizer.eos_token_id == from_gguf.tokenizer.eos_token_id and demo.tokenizer.bos_token_id == from_gguf.tokenizer.bos_token_id


def test_a_demo_conversion_another_process_finished_first_is_used(tiny_hf_dir, tmp_path, monkeypatch):
    """Two evaluations started at once both convert the GGUF; the one that loses the rename takes the winner's directory."""
    from spinquant import models

    monkeypatch.setenv("SPINQUANT_CACHE", str(tmp_path))
    target = tmp_path / "demo" / "hf"

    def convert_while_the_other_process_wins(path):
        shutil.copytree(tiny_hf_dir, target)
        return models.load_model(str(tiny_hf_dir))

    monkeypatch.setattr(models, "demo_gguf_path", lambda name: tmp_path / "demo.gguf")
    monkeypatch.setattr(models, "load_gguf", convert_while_the_other_process_wins)
    assert models.demo_hf_dir("demo") == target
    assert (target / "config.json").is_file() and not list(target.parent.glob(".hf-*"))
