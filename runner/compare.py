"""`python -m runner.compare`: the original model in full precision against the `.pte`, teacher-forced.

On the same token windows: per-position KL divergence and top-1 agreement of the program against
the Hugging Face model in float32, perplexity of each, and the same for the eager quantized model
the export started from (rebuilt from the program's export_report.json), which separates the
quantization's error from the export's. Writes a Markdown table, a JSON file and a PNG of the
per-position KL.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from runner.pte import PteProgram
from spinquant.data import evaluation_text, read_text, text_sha256, token_windows
from spinquant.environment import describe_environment, environment_line
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import gptq_request
from spinquant.metrics import kl_per_position
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quiet import add_verbose_flag
from spinquant.torchao_quant import ProgramQuant

SOURCES = ("hf_fp32", "eager_quantized", "pte")


def export_options(pte: Path) -> dict:
    report = pte.parent / "export_report.json"
    if not report.is_file():
        raise UserError(f"no export_report.json beside {pte}: compare needs the options the program was exported with")
    return json.loads(report.read_text())["options"]


def eager_quantized(fp_model, tokenizer, options: dict):
    """The export's model before torch.export: prepare() with the program's options and its GPTQ integers, from its
    --gptq-file or from the export's own GPTQ run again (deterministic on the CPU: the same integers on the same
    machine and libraries)."""
    if options.get("gptq") and "gptq_seqlen" not in options:
        raise UserError("the program's GPTQ ran inside an export that did not record its calibration windows: "
                        "export it again, or with --gptq-file, to compare it")
    calib_text = Path(options["calib_text"]) if options.get("calib_text") else None
    return prepare(copy.deepcopy(fp_model), options["rotation"], ProgramQuant.of(options), gptq_request(options), tokenizer=tokenizer,
                   calib_text=calib_text, seed=options["seed"])


@torch.no_grad()
def logits_by_source(fp_model, quantized, program: PteProgram, window: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = window.view(1, -1)
    return {
        "hf_fp32": fp_model(ids, use_cache=False).logits[0].double(),
        "eager_quantized": quantized(ids, use_cache=False).logits[0].double(),
        "pte": program.prefill_logits(ids)[0].double(),
    }


def compare(fp_model, quantized, program: PteProgram, windows: torch.Tensor) -> dict:
    """Per position (averaged over windows) KL against full precision, plus totals per source."""
    kl_sum = {s: torch.zeros(windows.shape[1], dtype=torch.float64) for s in ("eager_quantized", "pte")}
    kl_sum["pte_vs_eager"] = torch.zeros(windows.shape[1], dtype=torch.float64)
    nll = dict.fromkeys(SOURCES, 0.0)
    agree = dict.fromkeys(("eager_quantized", "pte"), 0)
    for window in tqdm(windows, desc="compare", unit="window"):
        logits = logits_by_source(fp_model, quantized, program, window)
        for source in ("eager_quantized", "pte"):
            kl_sum[source] += kl_per_position(logits["hf_fp32"], logits[source])
            agree[source] += int((logits[source].argmax(-1) == logits["hf_fp32"].argmax(-1)).sum())
        kl_sum["pte_vs_eager"] += kl_per_position(logits["eager_quantized"], logits["pte"])
        for source in SOURCES:
            nll[source] += F.cross_entropy(logits[source][:-1], window[1:], reduction="sum").item()
    n_windows, seqlen = windows.shape
    kl_by_position = {k: (v / n_windows).tolist() for k, v in kl_sum.items()}
    return dict(
        perplexity={s: float(torch.tensor(nll[s] / (n_windows * (seqlen - 1))).exp()) for s in SOURCES},
        mean_kl_vs_hf_fp32={s: float(torch.tensor(kl_by_position[s]).mean()) for s in ("eager_quantized", "pte")},
        mean_kl_pte_vs_eager=float(torch.tensor(kl_by_position["pte_vs_eager"]).mean()),
        top1_agreement_with_hf_fp32={s: agree[s] / (n_windows * seqlen) for s in agree},
        kl_by_position=kl_by_position,
    )


def plot_kl(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("pte", ".pte vs HF fp32"), ("eager_quantized", "eager quantized vs HF fp32"), ("pte_vs_eager", ".pte vs eager quantized")):
        ax.plot(result["kl_by_position"][key], label=label, linewidth=1)
    ax.set(xlabel="position in window", ylabel="KL divergence (nats), mean over windows", yscale="log")
    ax.legend()
    ax.set_title("Next-token KL divergence by position")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)


def markdown(result: dict, command: str) -> str:
    p, kl, top1 = result["perplexity"], result["mean_kl_vs_hf_fp32"], result["top1_agreement_with_hf_fp32"]
    return "\n".join([
        f"# {result['model']}: the .pte against the Hugging Face model in full precision",
        "",
        f"Command: `{command}`",
        "",
        f"Machine and libraries: {result['environment']}. Program `{result['pte']}` (rotation `{result['options']['rotation']}`, "
        f"{result['options']['qlinear']} g{result['options']['group_size']}, embedding {result['options']['qembedding']}, "
        f"lm_head {result['options']['lm_head']}{', GPTQ weights from `' + result['options']['gptq_file'] + '`' if result['options'].get('gptq_file') else ''}). Text `{result['text']}` (sha256 `{result['text_sha256'][:16]}…`), "
        f"first {result['windows']} windows of {result['seqlen']} tokens, teacher-forced.",
        "",
        "| model | perplexity | mean KL vs HF fp32 (nats) | top-1 agreement with HF fp32 |",
        "|---|---|---|---|",
        f"| HF fp32 | {p['hf_fp32']:.3f} | 0 | 100% |",
        f"| eager quantized (torchao, before export) | {p['eager_quantized']:.3f} | {kl['eager_quantized']:.4f} | {top1['eager_quantized']:.1%} |",
        f"| .pte (ExecuTorch, XNNPACK) | {p['pte']:.3f} | {kl['pte']:.4f} | {top1['pte']:.1%} |",
        "",
        f"The export's own error (.pte against the eager quantized model): mean KL {result['mean_kl_pte_vs_eager']:.4f} nats.",
        f"Per-position KL: `{Path(result['png']).name}`.",
        "",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.splitlines()[0])
    p.add_argument("--pte", type=Path, required=True, help="model.pte with its export_report.json beside it")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (at most the program's max_seq_len)")
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--output", type=Path, default=Path("results/compare"), help="path stem for .md, .json and .png")
    add_verbose_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.pte.is_file():
        raise UserError(f"program not found: {args.pte}")
    options = export_options(args.pte)
    program = PteProgram(args.pte)
    if not program.every_position:
        raise UserError(f"{args.pte} returns the last position's logits only; compare needs every position's: "
                        "export it again with --full-logits")
    cache_len = program.metadata()["get_max_context_len"]
    if args.seqlen > cache_len:
        raise UserError(f"--seqlen {args.seqlen} is longer than the program's KV cache of {cache_len}")
    loaded = load_model(options["model"])
    fp_model = loaded.model.requires_grad_(False)
    quantized = eager_quantized(fp_model, loaded.tokenizer, options)
    text = read_text(args.text)
    windows = token_windows(loaded.tokenizer, text, args.seqlen, args.max_windows)
    result = compare(fp_model, quantized, program, windows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    png = args.output.with_suffix(".png")
    result.update(
        model=options["model"], pte=str(args.pte), options=options, text=str(args.text), text_sha256=text_sha256(text),
        seqlen=args.seqlen, windows=int(windows.shape[0]), environment=environment_line(),
        environment_detail=describe_environment(), png=str(png),
    )
    plot_kl(result, png)
    write_json_atomic(args.output.with_suffix(".json"), result)
    command = "python -m runner.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    write_atomic(args.output.with_suffix(".md"), markdown(result, command).encode())
    print(markdown(result, command))
    return result


if __name__ == "__main__":
    with one_line_errors("runner.compare"):
        main(sys.argv[1:])
