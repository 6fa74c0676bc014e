"""Bad inputs end in one line `prog: error: …` naming the file and the fix, exit code 2, nothing written.

Each case runs a CLI's main in-process on the tiny model (tests/bad_inputs.md lists the messages).
"""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT
from export.to_pte import main as export_main
from spinquant.eval import cli as eval_cli
from spinquant.gptq import GPTQConfig, GPTQResult, QuantizedWeight, rotation_id
from spinquant.models import demo_gguf_path, load_model, tiny_llama, tiny_llama_config, train_bpe_tokenizer
from spinquant.rotation import apply_rotations, rotations_for

REAL_ROTATION = Path(__file__).resolve().parents[1] / "spinquant" / "rotations" / "smollm2_w4a8.pt"


def the_error_line(capsys, prog: str) -> str:
    """The one line the CLI printed for the error; progress bars before it are transformers' loading bars."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == captured.err.rstrip("\n").splitlines()[-1]
    assert errors[0].startswith(f"{prog}: error: ")
    return errors[0]


def export_refuses(capsys, out: Path, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        export_main([*argv, "--output-dir", str(out), "--max-seq-len", "32"])
    assert exit_.value.code == 2
    assert not out.exists() or not any(out.iterdir())  # no program, report, tokenizer or temporary file
    return the_error_line(capsys, "export.to_pte")


def eval_refuses(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        eval_cli(list(argv))
    assert exit_.value.code == 2
    return the_error_line(capsys, "spinquant.eval")


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tiny_rotations(hidden: int = 64, head: int = 16, layers: int = 2) -> dict:
    state = {"R1": torch.eye(hidden)}
    state.update({f"model.layers.{i}.self_attn.R2": torch.eye(head) for i in range(layers)})
    return state


def with_nan(state: dict) -> dict:
    state["R1"][3, 5] = float("nan")
    return state


ROTATION_FILES = {
    "random bytes": (lambda: os.urandom(4096), "corrupt, truncated or not a torch file"),
    "truncated": (lambda: REAL_ROTATION.read_bytes()[: REAL_ROTATION.stat().st_size // 2], "corrupt, truncated or not a torch file"),
    "empty": (lambda: b"", "corrupt, truncated or not a torch file"),
    "a list": (lambda: torch_bytes([1, 2, 3]), "holds a list, not a dict of R1 and R2s"),
    "a tensor": (lambda: torch_bytes(torch.eye(64)), "holds a Tensor, not a dict of R1 and R2s"),
    "wrong keys": (lambda: torch_bytes({"weight": torch.eye(64)}), "no 'R1' (not SpinQuant's layout)"),
    "another model's": (lambda: REAL_ROTATION.read_bytes(), "'R1' is (576, 576), the model needs (64, 64)"),
    "too few layers": (lambda: torch_bytes({k: v for k, v in tiny_rotations().items() if "layers.1" not in k}), "no 'model.layers.1.self_attn.R2'"),
    "not orthogonal": (lambda: torch_bytes({**tiny_rotations(), "R1": torch.eye(64) * 2}), "'R1' is not orthonormal"),
    "non-tensor values": (lambda: torch_bytes({**tiny_rotations(), "R1": [[1.0]]}), "'R1' is a list, not a tensor"),
    "integer tensor": (lambda: torch_bytes({**tiny_rotations(), "R1": torch.eye(64, dtype=torch.long)}), "'R1' is a torch.int64 tensor, not a float matrix"),
    "NaN": (lambda: torch_bytes(with_nan(tiny_rotations())), "'R1' has NaN or infinite entries"),
}


@pytest.mark.parametrize("case", ROTATION_FILES)
def test_a_bad_rotation_file_is_one_line_for_the_export(case, tiny_hf_dir, tmp_path, capsys):
    make, problem = ROTATION_FILES[case]
    bad = tmp_path / "rotation.pt"
    bad.write_bytes(make())
    line = export_refuses(capsys, tmp_path / "out", "--model", str(tiny_hf_dir), "--rotation", str(bad))
    assert problem in line and str(bad) in line and "python -m spinquant.optimize" in line


@pytest.mark.parametrize("case", ["random bytes", "truncated", "a list", "NaN"])
def test_a_bad_rotation_file_is_one_line_for_the_evaluation(case, tiny_hf_dir, tmp_path, capsys):
    make, problem = ROTATION_FILES[case]
    bad = tmp_path / "rotation.pt"
    bad.write_bytes(make())
    text = tiny_hf_dir.parent / "text.txt"
    line = eval_refuses(capsys, "--model", str(tiny_hf_dir), "--rotation", str(bad), "--text", str(text), "--seqlen", "64")
    assert problem in line and str(bad) in line and "python -m spinquant.optimize" in line


@pytest.mark.demo
def test_a_truncated_gguf_is_refused_before_transformers_reads_it(tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    with demo_gguf_path("smollm2-135m").open("rb") as f:
        cut.write_bytes(f.read(5_000_000))
    line = export_refuses(capsys, tmp_path / "out", "--model", str(cut))
    assert f"{cut} is truncated or corrupt" in line and "download it again" in line


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(os.urandom(1000))
    line = export_refuses(capsys, tmp_path / "out", "--model", str(fake))
    assert f"{fake} is not a GGUF file" in line


def test_a_gguf_cut_inside_its_header_is_refused(tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF" + os.urandom(96))
    line = export_refuses(capsys, tmp_path / "out", "--model", str(cut))
    assert f"{cut} is truncated or corrupt" in line


def test_a_gguf_of_another_architecture_is_refused(tmp_path, capsys):
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = eval_refuses(capsys, "--model", str(path))
    assert f"{path} is a 'gpt2' model; a GGUF file is read as a Llama only" in line


def edited_copy(tiny_hf_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, copy)
    edit(copy)
    return copy


def set_model_type(model_dir: Path, model_type: str) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": model_type}))


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


HF_DIRS = {
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights (model.safetensors or pytorch_model.bin)"),
    "truncated weights": (lambda d: cut_in_half(d / "model.safetensors"), "model.safetensors is truncated or corrupt"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), "config.json is not valid JSON"),
    "a gpt2 config": (lambda d: set_model_type(d, "gpt2"), "is a 'gpt2' model; supported families: llama, mistral, qwen2, qwen3, phi3"),
    "no tokenizer": (lambda d: [(d / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer"),
}


@pytest.mark.parametrize("case", HF_DIRS)
def test_a_broken_hf_directory_is_one_line(case, tiny_hf_dir, tmp_path, capsys):
    edit, problem = HF_DIRS[case]
    model_dir = edited_copy(tiny_hf_dir, tmp_path, edit)
    line = export_refuses(capsys, tmp_path / "out", "--model", str(model_dir))
    assert problem in line and str(model_dir) in line


def test_a_llama_with_biases_exports_and_passes_the_check(tiny_hf_dir, tmp_path, capsys):
    """attention_bias and mlp_bias: the fused q/k/v and gate/up linears carry their biases, rotated with them."""
    config = tiny_llama_config(vocab=len(load_model(str(tiny_hf_dir)).tokenizer))
    config.attention_bias = config.mlp_bias = True
    model = tiny_llama(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # large enough that a dropped or misplaced bias fails the check
    model.save_pretrained(tmp_path / "biased")
    load_model(str(tiny_hf_dir)).tokenizer.save_pretrained(tmp_path / "biased")
    export_main(["--model", str(tmp_path / "biased"), "--rotation", "hadamard", "--max-seq-len", "32", "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["verify"]["mean_kl"] < 1e-4 and report["verify"]["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def gptq_shapes(tiny_hf_dir) -> dict[str, tuple[int, int]]:
    """Every linear GPTQ quantizes in the tiny model's export under R4 with an 8da4w lm_head (lm_head too), with its weight's shape."""
    model = load_model(str(tiny_hf_dir)).model
    apply_rotations(model, rotations_for("r4", model.config))
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def gptq_file(path: Path, shapes: dict, model: str, rotation: str = "r4", group: int = 32) -> Path:
    """A GPTQ result as spinquant.eval --gptq-output saves it, of zeros: only what it was made for matters here."""
    weights = {name: QuantizedWeight(torch.zeros(out, n, dtype=torch.int8), torch.ones(out, n // group, dtype=torch.bfloat16)) for name, (out, n) in shapes.items()}
    GPTQResult(weights, GPTQConfig(group=group), model, rotation_id(rotation, 0), "calib.txt", "0" * 64, 1, 0.0).save(path)
    return path


GPTQ_FILES = {
    "another model": (lambda p, shapes, model: gptq_file(p, shapes, "smollm2-135m"), "was made for the model smollm2-135m, the export is of"),
    "another rotation": (lambda p, shapes, model: gptq_file(p, shapes, model, rotation="hadamard"), "was made under rotation hadamard:seed0, the export uses r4"),
    "another group size": (lambda p, shapes, model: gptq_file(p, shapes, model, group=64), "was made with group size 64, the export uses --group-size 32"),
    "other shapes": (
        lambda p, shapes, model: gptq_file(p, {name: (out * 2, n) for name, (out, n) in shapes.items()}, model),
        "holds (128, 64) integers with (128, 2) scales for model.layers.0.self_attn.q_proj, whose weight is (64, 64)",
    ),
    "other linears": (lambda p, shapes, model: gptq_file(p, {f"x.{k}": v for k, v in shapes.items()}, model), "has no weights for model.layers.0.mlp.down_proj.linear"),
    "no lm_head": (lambda p, shapes, model: gptq_file(p, {k: v for k, v in shapes.items() if k != "lm_head"}, model),
                   "was made without a GPTQ lm_head; this quantization's lm_head is an int4 one in its groups"),
    "truncated": (lambda p, shapes, model: cut_in_half(gptq_file(p, shapes, model)), "corrupt, truncated or not a torch file"),
    "random bytes": (lambda p, shapes, model: p.write_bytes(os.urandom(3000)), "corrupt, truncated or not a torch file"),
    "a rotation file": (lambda p, shapes, model: shutil.copy(REAL_ROTATION, p), "has no 'weights': it is not a saved GPTQ result"),
    "a list": (lambda p, shapes, model: p.write_bytes(torch_bytes([1, 2])), "holds a list: it is not a saved GPTQ result"),
}


@pytest.mark.parametrize("case", GPTQ_FILES)
def test_a_gptq_file_that_does_not_fit_is_one_line(case, tiny_hf_dir, gptq_shapes, tmp_path, capsys):
    make, problem = GPTQ_FILES[case]
    path = tmp_path / "gptq.pt"
    make(path, gptq_shapes, str(tiny_hf_dir))
    line = export_refuses(capsys, tmp_path / "out", "--model", str(tiny_hf_dir), "--rotation", "r4", "--lm-head", "8da4w", "--gptq-file", str(path))
    assert problem in line and str(path) in line and "--gptq-output FILE" in line


@pytest.mark.parametrize(
    "argv,problem",
    [
        (["--max-seq-len", "0"], "--max-seq-len 0 is too small; it must be at least 2"),
        (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1, not 0"),
        (["--kv-cache", "int3"], "--kv-cache int3 is not supported; choose one of fp32, int8"),
        (["--kv-cache", "int4"], "--kv-cache int4: the program's attention kernel reads float32 or int8 rows, not int4; use int8"),
        (["--max-seq-len", "4096"], "--max-seq-len 4096 is above the model's context of 256 tokens"),
        (["--group-size", "48"], "--group-size 48 is not supported"),
        (["--rotation", "hadamrd"], "unknown rotation 'hadamrd'"),
        (["--gptq-file", "missing.pt"], "GPTQ file not found: missing.pt"),
    ],
)
def test_bad_export_flags_are_one_line(argv, problem, tiny_hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main(["--model", str(tiny_hf_dir), "--output-dir", str(tmp_path / "out"), "--max-seq-len", "32", *argv])
    assert exit_.value.code == 2
    assert problem in the_error_line(capsys, "export.to_pte")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_r3_on_a_head_dimension_without_a_hadamard_matrix_is_one_line(tmp_path, capsys):
    """head_dim 10 = 5·2: no Hadamard matrix of that size, so R3 cannot turn the heads an int8 cache quantizes."""
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXT, 300)
    config = tiny_llama_config(hidden=40, intermediate=128, heads=4, kv_heads=2, vocab=len(tokenizer))
    tiny_llama(config, dtype=torch.float32).save_pretrained(tmp_path / "head10")
    tokenizer.save_pretrained(tmp_path / "head10")
    line = export_refuses(capsys, tmp_path / "out", "--model", str(tmp_path / "head10"), "--rotation", "hadamard", "--kv-cache", "int8")
    assert "head dimension 10 has none" in line and "(--no-r3)" in line


@pytest.mark.parametrize(
    "yaml_text,problem",
    [("- a\n- b\n", "must be a mapping of option: value"), ("modle: x\n", "unknown option(s) modle")],
)
def test_a_bad_config_file_is_one_line(yaml_text, problem, tmp_path, capsys):
    config = tmp_path / "export.yaml"
    config.write_text(yaml_text)
    line = export_refuses(capsys, tmp_path / "out", "--config", str(config))
    assert problem in line and str(config) in line


def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    config = tmp_path / "export.yaml"
    config.write_text("model: [\n")
    line = export_refuses(capsys, tmp_path / "out", "--config", str(config))
    assert f"config file {config} is not valid YAML" in line


def test_an_output_dir_that_is_a_file_is_one_line(tiny_hf_dir, tmp_path, capsys):
    taken = tmp_path / "out"
    taken.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        export_main(["--model", str(tiny_hf_dir), "--output-dir", str(taken), "--max-seq-len", "32"])
    assert exit_.value.code == 2 and f"--output-dir {taken} is a file; give a directory" in the_error_line(capsys, "export.to_pte")
    assert taken.read_text() == "not a directory"


@pytest.mark.parametrize(
    "text,problem",
    [
        (lambda tmp: tmp, "text file not found"),
        (lambda tmp: (tmp / "latin1.txt").write_bytes("café".encode("latin-1")) and tmp / "latin1.txt", "is not UTF-8 text"),
    ],
)
def test_a_bad_evaluation_text_is_one_line(text, problem, tiny_hf_dir, tmp_path, capsys):
    path = text(tmp_path)
    line = eval_refuses(capsys, "--model", str(tiny_hf_dir), "--text", str(path))
    assert problem in line and str(path) in line


def test_a_corrupt_rotation_record_is_one_line(tiny_hf_dir, tmp_path, capsys):
    from spinquant.eval import cli as eval_cli

    rotation = tmp_path / "r.pt"
    rotation.write_bytes(b"")
    rotation.with_suffix(".json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        eval_cli(["--model", str(tiny_hf_dir), "--rotation", str(rotation), "--text", str(tiny_hf_dir.parent / "text.txt")])
    assert exit_.value.code == 2 and "r.json, the record beside the rotation file, is not a JSON object" in the_error_line(capsys, "spinquant.eval")
