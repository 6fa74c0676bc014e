import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from export.options import ExportOptions
from export.to_pte import run
from runner.generate import Sampling, generate, main, next_token, top_p_filter
from runner.pte import PteProgram, load_runtime_kernels
from spinquant.errors import UserError
from spinquant.models import load_model

PROMPT = "Robert Boulter is an English"

# The C++ runner compiles against re2's and nlohmann/json's headers (runner/README.md), which
# CMake's find_path looks for in the system include folders.
HAS_TOKENIZER_HEADERS = all(
    any(Path(folder, header).is_file() for folder in ("/usr/include", "/usr/local/include"))
    for header in ("re2/re2.h", "nlohmann/json.hpp")
)
needs_tokenizer_headers = pytest.mark.skipif(not HAS_TOKENIZER_HEADERS, reason="needs libre2-dev and nlohmann-json3-dev (apt)")


@pytest.fixture(scope="module", params=[dict(rotation="r4"), dict(rotation="hadamard", kv_cache="int8")], ids=["fp32-kv", "int8-kv-r3"])
def program_dir(request, tiny_hf_dir, tmp_path_factory):
    """The tiny model exported with the online Hadamard (r4), and with an int8 KV cache and R3, as a user's output
    directory; calls of at most 4 tokens, so that every runner prefills the test prompts in chunks."""
    opts = ExportOptions(model=str(tiny_hf_dir), max_seq_len=32, prefill_chunk=4, output_dir=tmp_path_factory.mktemp("pte"), **request.param)
    run(opts.check())
    return opts.output_dir


@pytest.fixture(scope="module")
def full_logits_program_dir(program_dir, tmp_path_factory):
    """The same program with every position's logits, as perplexity and runner.compare need."""
    options = json.loads((program_dir / "export_report.json").read_text())["options"]
    opts = ExportOptions(**{**options, "full_logits": True, "prefill_chunk": ExportOptions.prefill_chunk,
                            "output_dir": tmp_path_factory.mktemp("pte-full")})
    run(opts.check())
    return opts.output_dir


def greedy_reference(program: PteProgram, ids: list[int], n: int) -> list[int]:
    """Slow and plain: the whole sequence re-run from position 0 for every new token."""
    out = list(ids)
    for _ in range(n):
        out.append(int(program.prefill(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def test_greedy_generation_with_the_cache_equals_recomputing_everything(program_dir):
    program = PteProgram(program_dir / "model.pte")
    ids = AutoTokenizer.from_pretrained(program_dir)(PROMPT, add_special_tokens=False)["input_ids"]
    ends = set(program.metadata()["get_eos_ids"])
    new, stats = generate(program, ids, 8)
    expected = greedy_reference(program, ids, 8)
    cut = next((i for i, t in enumerate(expected) if t in ends), len(expected))
    assert new == expected[:cut]
    assert stats.prompt_tokens == len(ids) and stats.new_tokens == len(new) and stats.prefill_tokens_per_s > 0


def test_generation_stops_when_the_cache_is_full(program_dir):
    program = PteProgram(program_dir / "model.pte")
    new, _ = generate(program, [5] * 30, 100, Sampling(temperature=1.0))
    assert len(new) <= 32 - 30
    with pytest.raises(UserError, match="the prompt has 32 tokens; the program holds 1 to 31"):
        generate(program, [5] * 32, 4)


def test_top_p_keeps_the_smallest_likely_set():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64)
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([0, 0.5, 0, 0.25], dtype=torch.float64) / 0.75)
    assert torch.allclose(top_p_filter(probs, 1e-9), torch.tensor([0, 1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(top_p_filter(probs, 1.0), probs)


def test_sampling_follows_the_distribution_and_greedy_is_argmax():
    logits = torch.tensor([0.0, 1.0, 2.0])
    assert next_token(logits, Sampling(), torch.Generator()) == 2
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([next_token(logits, Sampling(temperature=1.0), gen) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, torch.softmax(logits.double(), 0).float(), atol=0.03)
    only_top = {next_token(logits, Sampling(temperature=1.0, top_p=0.5), gen) for _ in range(200)}
    assert only_top == {2}


def test_cli_runs_in_a_fresh_process_and_streams_the_greedy_text(program_dir):
    """Only the runner imported: every kernel the program needs must come with it."""
    cmd = [sys.executable, "-m", "runner.generate", "--pte", str(program_dir / "model.pte"), "--prompt", PROMPT, "--max-new-tokens", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(program_dir)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(generate(PteProgram(program_dir / "model.pte"), ids, 6)[0], skip_special_tokens=True)
    assert done.stdout == expected + "\n"
    assert "decode" in done.stderr and "tokens/s" in done.stderr


def test_executorch_llm_runner_gives_the_same_greedy_text(program_dir):
    """ExecuTorch's own TextLLMRunner (what the Android/iOS demo apps run) reads our metadata and signature."""
    from executorch.extension.llm.runner import _llm_runner

    load_runtime_kernels()
    runner = _llm_runner.TextLLMRunner(str(program_dir / "model.pte"), str(program_dir / "tokenizer.json"))
    pieces: list[str] = []
    runner.generate(PROMPT, _llm_runner.GenerationConfig(echo=False, max_new_tokens=6, temperature=0.0), token_callback=pieces.append)
    tokenizer = AutoTokenizer.from_pretrained(program_dir)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ours = tokenizer.decode(generate(PteProgram(program_dir / "model.pte"), ids, 6)[0])
    assert "".join(pieces) == ours and len(ids) > 4  # a prompt longer than a call: prefilled in chunks


@pytest.fixture(scope="module")
def cpp_runner():
    """The C++ runner, built once per source version (<cache>/runner/<hash>/, runner.cpp_build)."""
    from runner.cpp_build import runner_executable

    return runner_executable()


def run_cpp(cpp_runner, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(cpp_runner), *argv], capture_output=True, text=True, timeout=120)


def cpp_generated_ids(stderr: str) -> list[int]:
    line = next(line for line in stderr.splitlines() if line.startswith("generated ids: "))
    return [int(t) for t in line.removeprefix("generated ids: ").split(",") if t]


@needs_tokenizer_headers
def test_cpp_runner_greedy_ids_equal_the_python_runner(program_dir, cpp_runner):
    ids = AutoTokenizer.from_pretrained(program_dir)(PROMPT, add_special_tokens=False)["input_ids"]
    done = run_cpp(cpp_runner, "--pte", str(program_dir / "model.pte"), "--ids", ",".join(map(str, ids)), "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    expected, _ = generate(PteProgram(program_dir / "model.pte"), ids, 8)
    assert expected  # else the comparison says nothing
    assert done.stdout == ",".join(map(str, expected)) + "\n"
    assert cpp_generated_ids(done.stderr) == expected
    assert "prefill" in done.stderr and "decode" in done.stderr and "tokens/s" in done.stderr


@needs_tokenizer_headers
def test_cpp_runner_stops_when_the_cache_is_full(program_dir, cpp_runner):
    done = run_cpp(cpp_runner, "--pte", str(program_dir / "model.pte"), "--ids", ",".join(["5"] * 30), "--max-new-tokens", "100")
    assert done.returncode == 0, done.stderr[-2000:]
    expected, _ = generate(PteProgram(program_dir / "model.pte"), [5] * 30, 100)
    assert cpp_generated_ids(done.stderr) == expected and len(expected) <= 32 - 30


@needs_tokenizer_headers
def test_cpp_runner_text_through_pytorch_tokenizers_equals_the_python_runner(program_dir, cpp_runner):
    done = run_cpp(cpp_runner, "--pte", str(program_dir / "model.pte"), "--prompt", PROMPT, "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(program_dir)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected, _ = generate(PteProgram(program_dir / "model.pte"), ids, 6)
    assert cpp_generated_ids(done.stderr) == expected
    assert done.stdout == tokenizer.decode(expected) + "\n"


@needs_tokenizer_headers
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ids", ",".join(["5"] * 32)], "the prompt has 32 tokens; the program holds 1 to 31"),
        (["--ids", "1,x"], "--ids x: not an integer"),
        (["--ids", "1", "--prompt", "hi"], "give exactly one of --ids and --prompt"),
        (["--prompt", "hi", "--tokenizer", "/no/tokenizer.json"], "tokenizer not found: /no/tokenizer.json"),
    ],
)
def test_cpp_runner_bad_input_is_a_one_line_error(program_dir, cpp_runner, argv, message):
    done = run_cpp(cpp_runner, "--pte", str(program_dir / "model.pte"), *argv)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"spinquant_runner: error: {message}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature -1.0 must be at least 0"),
        (["--chat"], "--chat: this tokenizer has no chat template"),
    ],
)
def test_bad_input_is_a_one_line_error(program_dir, argv, message):
    cmd = [sys.executable, "-m", "runner.generate", "--pte", str(program_dir / "model.pte"), "--prompt", "hi", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]  # lines before it are the libraries' import-time notices
    assert done.returncode == 2 and last.startswith("runner.generate: error: ") and message in last
    assert "Traceback" not in done.stderr


def test_missing_program_is_refused(tmp_path):
    with pytest.raises(UserError, match="program not found"):
        main(["--pte", str(tmp_path / "nope.pte"), "--prompt", "hi"])


def test_the_shipped_program_returns_the_last_position_and_the_full_one_every_position(program_dir, full_logits_program_dir):
    ids = torch.tensor([[5, 17, 33, 2, 60, 7, 11]])
    last, full = PteProgram(program_dir / "model.pte"), PteProgram(full_logits_program_dir / "model.pte")
    every = full.prefill_logits(ids, chunk=4)
    assert last.forward(ids[:, :4], torch.arange(4)).shape == (1, 1, every.shape[-1]) and every.shape[:2] == (1, 7)
    assert torch.allclose(last.prefill(ids, chunk=4), every[:, -1:], atol=1e-4)
    with pytest.raises(UserError, match="returns the last position's logits only; perplexity and comparisons need a program exported with --full-logits"):
        last.prefill_logits(ids, chunk=4)


def test_compare_refuses_a_program_with_the_last_logits_only(program_dir, tmp_path):
    from runner.compare import main as compare_main

    with pytest.raises(UserError, match="returns the last position's logits only; compare needs every position's"):
        compare_main(["--pte", str(program_dir / "model.pte"), "--output", str(tmp_path / "cmp")])


def test_compare_separates_quantization_from_export_error(full_logits_program_dir, tiny_hf_dir, tmp_path):
    from runner.compare import main as compare_main
    from spinquant.data import token_windows
    from spinquant.metrics import perplexity, perplexity_of

    out = tmp_path / "cmp"
    text = tiny_hf_dir.parent / "text.txt"
    result = compare_main(["--pte", str(full_logits_program_dir / "model.pte"), "--text", str(text), "--seqlen", "16", "--max-windows", "3", "--output", str(out)])
    loaded = load_model(str(tiny_hf_dir))
    windows = token_windows(loaded.tokenizer, text.read_text(), 16, 3)
    program = PteProgram(full_logits_program_dir / "model.pte")
    assert result["perplexity"]["pte"] == pytest.approx(perplexity_of(program.prefill_logits, windows, progress=False), rel=1e-6)
    assert result["perplexity"]["hf_fp32"] == pytest.approx(perplexity(loaded.model, windows, progress=False), rel=1e-6)
    assert result["mean_kl_pte_vs_eager"] < 1e-6  # the tiny program matches its eager model to 1e-3
    assert result["mean_kl_vs_hf_fp32"]["pte"] == pytest.approx(result["mean_kl_vs_hf_fp32"]["eager_quantized"], abs=1e-5)
    assert result["mean_kl_vs_hf_fp32"]["pte"] > 0 and len(result["kl_by_position"]["pte"]) == 16
    for suffix in (".md", ".json", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_compare_needs_the_export_report(program_dir, tmp_path):
    from runner.compare import main as compare_main

    (tmp_path / "model.pte").write_bytes((program_dir / "model.pte").read_bytes())
    with pytest.raises(UserError, match="no export_report.json beside"):
        compare_main(["--pte", str(tmp_path / "model.pte")])


def test_activation_maxima_are_taken_where_quantization_sees_them(tiny_hf_dir, tmp_path):
    from spinquant.activations import SITES, channel_max, main as activations_main
    from spinquant.hadamard import hadamard_matrix
    from spinquant.rotation import apply_rotations, rotations_for

    model = load_model(str(tiny_hf_dir)).model.requires_grad_(False)
    ids = torch.tensor([[5, 17, 33, 2, 60, 7]])
    found = channel_max(model, ids)
    assert torch.equal(found[0][SITES[0]], model.model.embed_tokens(ids)[0].abs().amax(0))
    mlp_inputs = {}
    model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: mlp_inputs.setdefault("x", a[0]))
    rotated = apply_rotations(model, rotations_for("r4", model.config))
    after = channel_max(rotated, ids)
    mlp = rotated.model.layers[1].mlp
    x = mlp.act_fn(mlp.gate_proj(mlp_inputs["x"])) * mlp.up_proj(mlp_inputs["x"])
    h = hadamard_matrix(x.shape[-1]).to(x.dtype)
    assert torch.allclose(after[1][SITES[1]], (x @ h)[0].abs().amax(0), atol=1e-5)
    out = tmp_path / "act.png"
    activations_main(["--model", str(tiny_hf_dir), "--rotation", "hadamard", "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "32", "--output", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="--layer 9: the model has layers 0 to 1"):
        activations_main(["--model", str(tiny_hf_dir), "--layer", "9", "--text", str(tiny_hf_dir.parent / "text.txt"), "--seqlen", "32", "--output", str(out)])
