"""`python -m export.to_pte`: rotated, quantized Llama with KV cache → XNNPACK ExecuTorch program.

load → fuse rotations → quantize with torchao → torch.export (static KV cache, dynamic prompt
length) → XNNPACK lowering → .pte, tokenizer.json and export_report.json in --output-dir.
"""

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from export.options import GROUP_SIZES, KV_CACHES, LM_HEAD, QEMBEDDING, QLINEAR, ExportOptions, options_from_yaml
from export.program import delegate_linears, emit_program, export_program, longest_call, memory_plan_parts, metadata, planned_memory_bytes
from export.verify import PROMPT, EagerReference, check_agreement, compare_with_reference, eager_reference
from spinquant.data import calibration_text
from spinquant.environment import describe_environment
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_json_atomic
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quiet import add_verbose_flag
from spinquant.rotation_cache import duquant_rotation, learned_rotation

# Rotations computed for the model during the export (spinquant/rotation_cache.py), by the stage that computes them.
COMPUTED_ROTATIONS = {"learn": "learn rotations", "duquant": "DuQuant's rotations"}


def parse_args(argv: list[str] | None) -> ExportOptions:
    p = argparse.ArgumentParser(prog="python -m export.to_pte", description=__doc__.splitlines()[0])
    d = ExportOptions()
    p.add_argument("--config", type=Path, help="YAML file whose keys mirror these flags (flags win)")
    p.add_argument("--model", help=f"built-in name, .gguf file or HF directory (default {d.model})")
    p.add_argument("--rotation", help="none | r4 | hadamard | orthogonal | learn | duquant | rotation file (default: the learned rotation "
                   "committed for a built-in model, else r4); learn: learn R1/R2 for this model and quantization now (a GPU when there is one); "
                   "duquant: DuQuant's rotations and smoothing, searched now on the calibration text; both kept beside the model")
    p.add_argument("--learn-iters", type=int, help=f"--rotation learn: iterations (default {d.learn_iters}, SpinQuant's)")
    p.add_argument("--resume", action="store_const", const=True, help="--rotation learn: continue an interrupted run from its checkpoint")
    p.add_argument("--qlinear", help=f"{' | '.join(QLINEAR)} (default {d.qlinear})")
    p.add_argument("--group-size", type=int, help=f"{' | '.join(map(str, GROUP_SIZES))} (default {d.group_size})")
    p.add_argument("--qembedding", help=f"{' | '.join(QEMBEDDING)} (default {d.qembedding})")
    p.add_argument("--lm-head", help=f"{' | '.join(LM_HEAD)} (default {d.lm_head})")
    p.add_argument("--kv-cache", help=f"{' | '.join(KV_CACHES)}: int8 keeps keys and values as int8 with a float32 scale per token "
                                      f"and head, 3.8x smaller (default {d.kv_cache})")
    p.add_argument("--no-r3", dest="r3", action="store_const", const=False,
                   help="with --kv-cache int8, leave queries and keys unturned (default: R3, the online Hadamard after RoPE)")
    p.add_argument("--max-seq-len", type=int, help=f"KV cache length (default {d.max_seq_len})")
    p.add_argument("--prefill-chunk", type=int, help=f"the most tokens one forward call takes; runners prefill longer prompts in "
                                                     f"chunks of it, and the program's activations are planned for it (default {d.prefill_chunk})")
    p.add_argument("--output-dir", type=Path, help=f"(default {d.output_dir})")
    p.add_argument("--dtype", help=f"(default {d.dtype})")
    p.add_argument("--seed", type=int, help="seed of random rotations")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, help="int4 weights (and an 8da4w lm_head) by GPTQ on the calibration text, "
                   "now, on this CPU; --no-gptq: round to nearest (default with --qlinear 8da4w: the packaged GPTQ result where one fits "
                   "the export, the demo's with its learned rotation and 8da8w lm_head, else GPTQ now; with a GPU, save one with "
                   "spinquant.eval --w-gptq [--quantize-lm-head] --device cuda --gptq-output FILE and give --gptq-file FILE)")
    p.add_argument("--gptq-file", help="a saved GPTQ result, plain or compact (python -m spinquant.eval --w-gptq [--quantize-lm-head for "
                   "the 8da4w lm_head] --gptq-output FILE; scripts/package_gptq.py)")
    p.add_argument("--gptq-windows", type=int, help=f"GPTQ's calibration windows (default {d.gptq_windows})")
    p.add_argument("--gptq-seqlen", type=int, help=f"tokens per GPTQ calibration window, at most --max-seq-len (default {d.gptq_seqlen})")
    p.add_argument("--calib-text", type=Path, help="calibration text for --gptq and --rotation learn/duquant (default: the packaged WikiText-2 calib.txt)")
    p.add_argument("--full-logits", action="store_const", const=True,
                   help="forward returns every position's logits, as perplexity and runner.compare need (default: the last "
                        "position's only, what a runner samples from, without a T × vocab logits buffer in the program's memory)")
    p.add_argument("--no-verify", dest="verify", action="store_const", const=False, help="skip running the .pte against eager")
    add_verbose_flag(p)
    args = vars(p.parse_args(argv))
    values = options_from_yaml(args.pop("config")) if args.get("config") else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return ExportOptions(**values).check()


def check_model_fits(model, opts: ExportOptions) -> None:
    limit = model.config.max_position_embeddings
    if opts.max_seq_len > limit:
        raise UserError(f"--max-seq-len {opts.max_seq_len} is above the model's context of {limit} tokens")
    window = sliding_window(model.config)
    if window is not None and opts.max_seq_len > window:
        # The program attends over its whole cache: within the window that is the model's own attention.
        raise UserError(f"--max-seq-len {opts.max_seq_len} is above the model's sliding window of {window} tokens, "
                        f"which the program does not apply: give --max-seq-len {window} or less")


def sliding_window(config) -> int | None:
    """The attention window a config sets, or None (Qwen's configs set none unless use_sliding_window)."""
    return getattr(config, "sliding_window", None)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_tokenizer(tokenizer, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, out / name)


class Stages:
    """A progress bar over the export's named stages (on a terminal); each stage's seconds, and the process's
    peak RSS by its end (the stage where it grows set a new peak), go into the report."""

    def __init__(self, names: tuple[str, ...]):
        self.bar = tqdm(total=len(names), desc="export", unit="stage", disable=None, bar_format="{desc}: {n}/{total} stages [{elapsed}] {postfix}")
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        start = time.time()
        yield
        self.seconds[name] = round(time.time() - start, 1)
        self.peak_rss_mb[name] = round(peak_rss_mb())
        self.bar.update()


def run(opts: ExportOptions) -> dict:
    start = time.time()
    out = opts.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; give a directory (it is created if missing)")
    computed = COMPUTED_ROTATIONS.get(opts.rotation)
    stage = Stages(("load",) + ((computed,) if computed else ()) + ("rotate and quantize",) + (("eager reference",) if opts.verify else ())
                   + ("torch.export", "delegate linears to XNNPACK", "emit program") + (("verify",) if opts.verify else ()))
    program, model_facts, reference, tokenizer = exported_model(opts, stage)
    with stage("delegate linears to XNNPACK"):
        edge = delegate_linears(program, model_facts["metadata"])
        del program  # XNNPACK's blobs hold the linears' weights now
    with stage("emit program"):
        manager = emit_program(edge)
        del edge
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed load or export leaves nothing behind
    for stale in ("export_report.json", "model.pte"):
        (out / stale).unlink(missing_ok=True)  # nothing from an earlier export may pass for this one's
    pte_tmp = out / ".model.pte.unverified"
    try:
        with pte_tmp.open("wb") as f:
            manager.write_to_file(f)  # in pieces: manager.buffer would join the whole program in memory first
        planned, plan_parts = planned_memory_bytes(manager), memory_plan_parts(manager)
        del manager
        gc.collect()  # the lowering's graphs hold reference cycles: only the program runs beside the check
        report = dict(
            options=opts.record(), **model_facts, pte_bytes=pte_tmp.stat().st_size, planned_memory_bytes=planned,
            memory_plan_parts=plan_parts,
            export_seconds=round(time.time() - start, 1), stage_seconds=stage.seconds, peak_rss_mb=round(peak_rss_mb()),
            stage_peak_rss_mb=stage.peak_rss_mb,
            environment=describe_environment(),
        )
        if opts.verify:
            with stage("verify"):
                agreement = compare_with_reference(pte_tmp, reference)
            report["verify"] = agreement.record()
            check_agreement(agreement)
        save_tokenizer(tokenizer, out)
        os.replace(pte_tmp, out / "model.pte")
    finally:
        pte_tmp.unlink(missing_ok=True)
    write_json_atomic(out / "export_report.json", report)
    return report


def exported_model(opts: ExportOptions, stage: Stages) -> tuple[torch.export.ExportedProgram, dict, EagerReference | None, PreTrainedTokenizerBase]:
    """load → rotate and quantize → the eager model's reference logits → torch.export. The eager model is
    gone once this returns: only the exported program's weights stay for the lowering and the check."""
    with stage("load"):
        # In the checkpoint's dtype: prepare() widens a bf16 one to float32 a part at a time.
        loaded = load_model(opts.model, None)
        model = loaded.model.requires_grad_(False)
        check_model_fits(model, opts)
    computed_by = opts.rotation if opts.rotation in COMPUTED_ROTATIONS else None
    if computed_by:
        with stage(COMPUTED_ROTATIONS[computed_by]):  # each on a float32 copy of the model of its own (learning folds and wraps it)
            # The report records the file (what runner.compare reads), not "learn" or "duquant".
            calib_text = opts.calib_text or calibration_text()
            opts.rotation = str(learned_rotation(opts.model, loaded.tokenizer, opts.learning_recipe(), calib_text, opts.max_seq_len,
                                                 opts.learn_iters, opts.resume, opts.seed)
                                if computed_by == "learn" else duquant_rotation(opts.model, calib_text))
    with stage("rotate and quantize"):  # on the CPU, GPTQ too: a GPU would round some scales differently
        prepare(model, opts.rotation, opts.program_quant(), opts.gptq_request(), tokenizer=loaded.tokenizer,
                calib_text=opts.calib_text, seed=opts.seed)
    reference = None
    if opts.verify:
        prompt = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        with stage("eager reference"):
            reference = eager_reference(model, prompt, opts.max_seq_len, longest_call(opts.max_seq_len, opts.prefill_chunk))
    done = model.spinquant
    model_facts = dict(
        rotation=dict(describe_rotations(done.rotations), from_rotation_learn=computed_by == "learn",
                      from_rotation_duquant=computed_by == "duquant"), gptq=done.gptq.describe() if done.gptq else None,
        metadata=metadata(model, loaded.tokenizer, opts.max_seq_len, opts.prefill_chunk), parts=program_parts(model),
    )
    with stage("torch.export"):
        program = export_program(model, opts.max_seq_len, opts.prefill_chunk, opts.full_logits, opts.kv_cache)
    return program, model_facts, reference, loaded.tokenizer


def describe_rotations(rot) -> dict:
    return dict(r1=rot.r1 is not None, r2=rot.r2 is not None, r4_online_hadamard=rot.r4, r3=rot.r3, norms_folded=rot.folds_norms)


def program_parts(model) -> dict:
    """Bytes of each part's weights as quantized (int8 storage for int4 values, as torchao holds them)."""
    def nbytes(module) -> int:
        return sum(_tensor_bytes(t) for t in module.state_dict().values())

    layers = model.model.layers
    return dict(embedding=nbytes(model.model.embed_tokens), decoder_layers=nbytes(layers), lm_head=nbytes(model.lm_head))


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def main(argv: list[str] | None = None) -> None:
    with one_line_errors("export.to_pte"):
        opts = parse_args(argv)
        report = run(opts)
    v = report.get("verify")
    check = (f", verified: mean KL {v['mean_kl']:.3g} nats, top-1 {round(v['top1_agreement'] * v['positions'])}/{v['positions']} positions"
             if v else "")
    print(f"wrote {opts.output_dir / 'model.pte'} ({report['pte_bytes'] / 2**20:.1f} MiB) in {report['export_seconds']} s{check}")


if __name__ == "__main__":
    main(sys.argv[1:])
