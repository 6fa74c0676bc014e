"""QuIP#'s 2-bit E8P against llama.cpp's IQ2_XXS on the demo model, on the tensors llama.cpp can make 2-bit.

    python scripts/iq2_xxs_table.py --iq2-gguf smollm2-IQ2_XXS.gguf --e8p-file e8p2.pt

IQ2_XXS codes rows in blocks of 256 weights, and SmolLM2's q, k, v, o, gate and up rows are 576 wide: llama-quantize
falls back to IQ4_NL or Q4_0 for them, so its "IQ2_XXS" file of this model is 4.88 bits per weight, with only down_proj
(rows of 1536) at 2 bits. The comparison is therefore made on down_proj: each model below is the float model, or
llama.cpp's file, with the 30 down_proj weights taken from one 2-bit quantization or the other. Everything is run by
our evaluation (transformers dequantizes the GGUF file's tensors), on the first 16 windows of 2048 tokens of eval.txt.
`--e8p-file`: BlockLDLQ's E8P codes with no rotation (python -m spinquant.eval --w-codebook e8p --w-gptq --gptq-output).
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from spinquant.data import evaluation_text, read_text, text_sha256, token_windows
from spinquant.environment import environment_line
from spinquant.errors import UserError
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import GPTQResult
from spinquant.metrics import perplexity
from spinquant.models import load_model
from spinquant.quip import quip_e8p

WINDOWS = 16
SEQLEN = 2048


def down_projs(model) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.mlp.down_proj": layer.mlp.down_proj.weight.data.clone() for i, layer in enumerate(model.model.layers)}


def with_down_projs(model, weights: dict[str, torch.Tensor]):
    for name, w in weights.items():
        model.get_submodule(name).weight.data.copy_(w)
    return model


def blockldlq_down_projs(path: Path) -> dict[str, torch.Tensor]:
    result = GPTQResult.load(path)
    if result.rotation != "none" or result.config.codebook != "e8p" or result.config.bits != 2:
        raise UserError(f"{path} holds {result.config.bits}-bit {result.config.codebook} weights under rotation {result.rotation}; "
                        "this comparison needs 2-bit E8P codes with no rotation")
    return {name: qw.dequantize().float() for name, qw in result.weights.items() if name.endswith("mlp.down_proj")}


def nearest_down_projs(float_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: quip_e8p(w).dequantize().float() for name, w in tqdm(float_weights.items(), desc="E8P nearest codes", unit="linear")}


def measure(args: argparse.Namespace) -> dict:
    fp, iq2 = load_model(args.model), load_model(str(args.iq2_gguf))
    text = read_text(args.text)
    windows = token_windows(fp.tokenizer, text, SEQLEN, WINDOWS)
    fp_down, iq2_down = down_projs(fp.model), down_projs(iq2.model)
    ours = blockldlq_down_projs(args.e8p_file)
    nearest = nearest_down_projs(fp_down)
    rows = {
        "full precision": lambda: fp.model,
        "llama.cpp's IQ2_XXS file as it is (down_proj IQ2_XXS, the rest IQ4_NL/Q4_0)": lambda: iq2.model,
        "llama.cpp's file, its down_proj replaced by E8P BlockLDLQ": lambda: with_down_projs(iq2.model, ours),
        "float, down_proj IQ2_XXS (llama.cpp, imatrix)": lambda: with_down_projs(fp.model, iq2_down),
        "float, down_proj E8P BlockLDLQ (ours)": lambda: with_down_projs(fp.model, ours),
        "float, down_proj E8P nearest codewords (ours, no Hessian)": lambda: with_down_projs(fp.model, nearest),
    }
    results = {}
    for name, model in rows.items():  # in this order: each row after the first two changes a model the earlier rows used as it was
        results[name] = perplexity(model(), windows)
        print(f"{name}: {results[name]:.3f}", file=sys.stderr, flush=True)
    return dict(text=str(args.text), text_sha256=text_sha256(text), iq2_gguf=str(args.iq2_gguf), e8p_file=str(args.e8p_file),
                environment=environment_line(), perplexity=results)


def markdown(results: dict, command: str) -> str:
    fp = results["perplexity"]["full precision"]
    lines = [
        "# E8P against llama.cpp's IQ2_XXS, 2-bit down_proj for 2-bit down_proj (SmolLM2-135M-Instruct)", "",
        f"Command: `{command}`", "",
        f"Machine and libraries: {results['environment']}.", "",
        f"Evaluation `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), the first {WINDOWS} windows of {SEQLEN} tokens, "
        f"by our evaluation for every row. llama.cpp's file: `{results['iq2_gguf']}`; ours: `{results['e8p_file']}`.", "",
        "| model | perplexity | vs full precision |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {p:.3f} | {(p / fp - 1) * 100:+.1f}% |" for name, p in results["perplexity"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--iq2-gguf", type=Path, required=True, help="llama-quantize's IQ2_XXS file of the same model")
    p.add_argument("--e8p-file", type=Path, required=True, help="2-bit E8P BlockLDLQ codes, rotation none")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--output", type=Path, default=Path("results/iq2_xxs_smollm2"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = measure(args)
    write_json_atomic(args.output.with_suffix(".json"), results)
    command = "python scripts/iq2_xxs_table.py " + " ".join(sys.argv[1:])
    write_atomic(args.output.with_suffix(".md"), markdown(results, command).encode())


if __name__ == "__main__":
    main()
