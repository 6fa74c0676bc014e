"""Perplexity of a (rotated, fake-quantized) model: `python -m spinquant.eval`.

The field's convention: tokenize the whole text once, cut it into non-overlapping windows of
`seqlen` tokens, average the token-level negative log-likelihood over all of them, report exp.
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from spinquant.data import calibration_text, evaluation_text, read_text, text_sha256, token_windows
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_json_atomic
from spinquant.gptq import GPTQConfig, GPTQResult
from spinquant.metrics import perplexity
from spinquant.models import LoadedModel, load_model
from spinquant.pipeline import prepare
from spinquant.quant import SETTINGS, QuantConfig, setting
from spinquant.quiet import add_verbose_flag
from spinquant.quip import CODEBOOK_SCALE
from spinquant.rotation import PRESETS
from spinquant.rotation_cache import duquant_rotation


def quantized_model(
    model_name: str, rotation: str, qc: QuantConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str = "cpu", gptq: GPTQConfig | GPTQResult | None = None, calib_text: Path | None = None,
) -> LoadedModel:
    """Load fresh and prepare() with fake quantization (GPTQ on `calib_text` when asked), on `device` after the rotation."""
    loaded = load_model(model_name, dtype)
    prepare(loaded.model, rotation, qc, gptq, tokenizer=loaded.tokenizer, calib_text=calib_text, seed=seed, device=device)
    return loaded


def evaluate(
    model_name: str, rotation: str, qc: QuantConfig, windows_of, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str = "cpu", gptq: GPTQConfig | None = None, calib_text: Path | None = None,
) -> float:
    """Perplexity of quantized_model(...); `windows_of(tokenizer)` gives the token windows."""
    loaded = quantized_model(model_name, rotation, qc, seed, dtype, device, gptq, calib_text)
    return perplexity(loaded.model, windows_of(loaded.tokenizer))


def calibration_hashes(rotation: str, gptq_calibration: Path | None) -> dict[str, str]:
    """sha256 of every calibration text behind this evaluation: a learned rotation's (its .json) and GPTQ's."""
    hashes = {}
    sidecar = Path(rotation).with_suffix(".json")
    if rotation not in PRESETS and sidecar.is_file():
        recorded = rotation_record(sidecar).get("calibration_sha256")
        if recorded:
            hashes[f"rotation {rotation}"] = recorded
    if gptq_calibration is not None:
        hashes[f"GPTQ ({gptq_calibration})"] = text_sha256(read_text(gptq_calibration))
    return hashes


def rotation_record(sidecar: Path) -> dict:
    """The .json spinquant.optimize writes beside a rotation: how it was learned, on which text."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{sidecar}, the record beside the rotation file, is not a JSON object: restore it or remove it")
    return record


def refuse_calibration_text(text: Path, text_hash: str, hashes: dict[str, str]) -> None:
    for what, calibration_hash in hashes.items():
        if calibration_hash == text_hash:
            raise UserError(f"the evaluation text {text} is the calibration text of the {what} (same sha256); evaluate on held-out text")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spinquant.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file or HF directory")
    p.add_argument("--rotation", default="none", help="none | r4 | hadamard | orthogonal | duquant (DuQuant's, searched on "
                   "--calib-text, cached beside the model) | rotation file")
    p.add_argument("--quant", default="fp", help=f"named setting: {', '.join(SETTINGS)}")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--w-group", type=int, help="0 = per output channel")
    p.add_argument("--w-asym", action="store_true")
    p.add_argument("--w-codebook", choices=["int", "e8p"], help="e8p: QuIP#'s E8P lattice codes with incoherence, --w-bits 2 (default), 3 or 4 (BlockLDLQ with --w-gptq)")
    p.add_argument("--w-clip-search", action="store_true", help="per-group MSE search of the clip ratio")
    p.add_argument("--w-clip", type=float, help="a fixed clip ratio of each weight group's range (DuQuant's --swc 0.8)")
    p.add_argument("--a-bits", type=int)
    p.add_argument("--a-sym", action="store_true")
    p.add_argument("--a-clip", type=float, help="clip ratio of each token's range (DuQuant's --lac 0.9)")
    p.add_argument("--k-bits", type=int)
    p.add_argument("--v-bits", type=int)
    p.add_argument("--kv-group", type=int, help="0 = one scale per head")
    p.add_argument("--no-r3", action="store_true", help="quantized K/V without R3 (the online Hadamard on queries and keys)")
    p.add_argument("--quantize-lm-head", action="store_true", help="lm_head quantized as the decoder's linears (with --w-gptq, by GPTQ too)")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--first-window", type=int, default=0, help="0-based index of the first evaluation window (held-out checks)")
    p.add_argument("--seed", type=int, default=0, help="seed of random rotations")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--w-gptq", action="store_true", help="weights by GPTQ on the calibration text instead of round-to-nearest")
    p.add_argument("--gptq-windows", type=int, default=128, help="calibration windows of --gptq-seqlen tokens (fewer if the text is shorter)")
    p.add_argument("--gptq-seqlen", type=int, help="tokens per calibration window (default --seqlen; the export's GPTQ takes 8 of 1,024)")
    p.add_argument("--gptq-damp", type=float, default=0.01, help="dampening, fraction of the Hessian's mean diagonal")
    p.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=GPTQConfig.act_order,
                   help="columns by decreasing Hessian diagonal (static group scales)")
    p.add_argument("--gptq-clip-search", action=argparse.BooleanOptionalAction, default=GPTQConfig.clip_search,
                   help="GPTQ's group scales by per-group MSE clip search (--w-clip-search is round-to-nearest's)")
    p.add_argument("--gptq-tune-steps", type=int, default=0, help="then tune GPTQ's group scales end to end for this many steps, "
                   "integers fixed (spinquant/scale_tuning.py; 200 on the demo)")
    p.add_argument("--gptq-tune-lr", type=float, default=GPTQConfig.tune_lr, help="Adam's learning rate on the scales' logarithms")
    p.add_argument("--gptq-tune-activations", action="store_true",
                   help="tune through the setting's activation and K/V quantization (straight through), not with them in float")
    p.add_argument("--gptq-scale-dtype", default="bf16", choices=["bf16", "fp32"], help="bf16 = the export's 8da4w scales")
    p.add_argument("--calib-text", type=Path, default=calibration_text(),
                   help="GPTQ's and --rotation duquant's calibration text (never the evaluation text)")
    p.add_argument("--gptq-output", type=Path, help="save GPTQ's integers and scales here (for export.to_pte --gptq-file)")
    p.add_argument("--output", type=Path, help="JSON file for the result")
    add_verbose_flag(p)
    return p.parse_args(argv)


def gptq_config_from_args(args: argparse.Namespace, qc: QuantConfig) -> GPTQConfig | None:
    if not args.w_gptq:
        return None
    if qc.w_bits >= 16:
        raise UserError("--w-gptq needs quantized weights: a setting such as w4a8, or --w-bits")
    if not qc.w_sym:
        raise UserError("--w-gptq computes symmetric scales (torchao's 8da4w); drop --w-asym")
    if args.gptq_windows < 1 or (args.gptq_seqlen is not None and args.gptq_seqlen < 2):
        raise UserError("--gptq-windows must be at least 1 and --gptq-seqlen at least 2")
    if args.gptq_tune_steps < 0 or args.gptq_tune_lr <= 0:
        raise UserError(f"--gptq-tune-steps must be 0 or more and --gptq-tune-lr positive, not {args.gptq_tune_steps} and {args.gptq_tune_lr}")
    if args.gptq_tune_activations and not args.gptq_tune_steps:
        raise UserError("--gptq-tune-activations says how to tune: give --gptq-tune-steps N too")
    if qc.w_clip_search or qc.w_clip != 1:
        flag = "--w-clip-search" if qc.w_clip_search else "--w-clip"
        raise UserError(f"{flag} is round-to-nearest's; GPTQ's MSE clip is --gptq-clip-search (on by default)")
    config = GPTQConfig(
        bits=qc.w_bits, group=qc.w_group, damp=args.gptq_damp, act_order=args.gptq_act_order, clip_search=args.gptq_clip_search,
        windows=args.gptq_windows, seqlen=args.gptq_seqlen or args.seqlen, scale_dtype=args.gptq_scale_dtype,
        tune_steps=args.gptq_tune_steps, tune_lr=args.gptq_tune_lr, tune_activations=args.gptq_tune_activations, codebook=qc.w_codebook,
    )
    return config


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The named setting with every flag given on the command line applied on top."""
    values = dict(
        w_bits=args.w_bits, w_group=args.w_group, a_bits=args.a_bits, a_clip=args.a_clip,
        k_bits=args.k_bits, v_bits=args.v_bits, kv_group=args.kv_group, r3=False if args.no_r3 else None,
        w_sym=False if args.w_asym else None, w_clip_search=args.w_clip_search or None, w_clip=args.w_clip,
        a_sym=args.a_sym or None, w_codebook=args.w_codebook,
    )
    if args.w_codebook == "e8p":
        if args.w_bits not in (None, *CODEBOOK_SCALE):
            raise UserError(f"--w-codebook e8p is 2, 3 or 4 bits a weight, not {args.w_bits}")
        values["w_bits"] = args.w_bits or 2
    for flag, ratio in (("--w-clip", args.w_clip), ("--a-clip", args.a_clip)):
        if ratio is not None and not 0 < ratio <= 1:
            raise UserError(f"{flag} {ratio}: a clip ratio is in (0, 1]")
    if args.w_clip is not None and args.w_clip_search:
        raise UserError("give --w-clip (a fixed ratio) or --w-clip-search (a ratio searched per group), not both")
    qc = setting(args.quant, **{k: v for k, v in values.items() if v is not None})
    return dataclasses.replace(qc, lm_head_bits=qc.w_bits, lm_head_group=qc.w_group) if args.quantize_lm_head else qc


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    qc = quant_config_from_args(args)
    gptq = gptq_config_from_args(args, qc)
    text = read_text(args.text)
    if args.rotation == "duquant":
        args.rotation = str(duquant_rotation(args.model, args.calib_text))  # the result records the file, as for any other
    refuse_calibration_text(args.text, text_sha256(text), calibration_hashes(args.rotation, args.calib_text if gptq else None))
    start = time.time()
    loaded = quantized_model(args.model, args.rotation, qc, args.seed, device=args.device, gptq=gptq, calib_text=args.calib_text)
    gptq_result = loaded.model.spinquant.gptq
    ppl = perplexity(loaded.model, token_windows(loaded.tokenizer, text, args.seqlen, args.max_windows, args.first_window))
    result = dict(
        model=args.model, rotation=args.rotation, quant=asdict(qc), text=str(args.text), text_sha256=text_sha256(text),
        seqlen=args.seqlen, first_window=args.first_window, max_windows=args.max_windows, perplexity=ppl, seconds=round(time.time() - start, 1),
        gptq=gptq_result.describe() if gptq_result else None,
    )
    if gptq_result and args.gptq_output:
        gptq_result.save(args.gptq_output)
    print(f"| model | rotation | quant | windows | perplexity |\n|---|---|---|---|---|\n"
          f"| {args.model} | {args.rotation} | {args.quant}{' GPTQ' if gptq else ''} | {args.max_windows or 'all'} | {ppl:.3f} |")
    if args.output:
        write_json_atomic(args.output, result)
    return result


def cli(argv: list[str] | None = None) -> None:
    with one_line_errors("spinquant.eval"):
        main(argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
