"""Memory of the demo model while generating: our .pte beside llama.cpp, and a random model with Llama 3.2 1B's shapes.

    python benchmarks/memory.py --pte out/demo --shape-pte out/llama-3.2-1b-shape

Each row generates `--new-tokens` greedy tokens after a `--prompt-tokens` prompt in a process of its
own (benchmarks/decode_engines.py, as benchmarks/decode_speed.py runs it), which records RSS before the
model loads (the engine's libraries already in), its peak while loading and while generating, and what
of it is heap and what pages of the model's file. For each .pte, the memory plan (export_report.json's
memory_plan_parts: KV cache, activations, logits) and the weights the file holds, by where they are. A
missing program is exported first: the demo by `python -m export.to_pte` (about 4 minutes on 2 cores),
the shape from random bf16 weights (benchmarks/export_time.py's SHAPES; 8 minutes here beside other jobs,
5.5 GB peak: results/export_1b_shape.md).
Writes results/memory.md and results/memory.json.
"""

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from executorch.exir._serialize._program import deserialize_pte_binary

from decode_speed import ROOT, cpu_text, ensure_export, libraries, prompt_ids, run_worker
from export_time import SHAPES, write_random_model
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import demo_gguf_path

SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "runs", "thread_cpu_s", "cores_busy")
MIB = 2**20  # decode_engines.py's RSS numbers are MiB too (its `_mb` keys)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pte", type=Path, default=Path("out/demo"), help="directory of a demo program with its default rotation (the default export is made here if it has no model.pte)")
    p.add_argument("--pte-kv-fp32", type=Path, default=Path("out/demo-kv-fp32"), help="the same with --kv-cache fp32 (exported here if missing)")
    p.add_argument("--gguf", type=Path, help="llama.cpp's model (default: the demo model's own GGUF file)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b-shape", help="the random model at a real model's shapes")
    p.add_argument("--shape-pte", type=Path, default=Path("out/llama-3.2-1b-shape"), help="its default export's directory (exported here if missing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="processes per engine, the engines taking turns: each is a row")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--output", type=Path, default=Path("results/memory.md"), help="the .json goes beside it")
    return p.parse_args(argv)


def ensure_shape_export(directory: Path, shape: str) -> dict:
    """The default export of random weights at `shape`'s shapes, round to nearest (GPTQ of random weights fits noise, for
    hours on this CPU); exported first when missing."""
    if not (directory / "model.pte").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            write_random_model(Path(tmp) / "model", SHAPES[shape])
            subprocess.run([sys.executable, "-m", "export.to_pte", "--model", str(Path(tmp) / "model"), "--no-gptq", "--output-dir", str(directory)],
                           cwd=ROOT, check=True)
    return json.loads((directory / "export_report.json").read_text())


def plan_parts(directory: Path, report: dict) -> dict[str, int]:
    if "memory_plan_parts" not in report:
        sys.exit(f"{directory}/export_report.json has no memory_plan_parts: it was exported before they were recorded; export it again")
    return report["memory_plan_parts"]


def pte_weight_bytes(pte: Path) -> dict[str, int]:
    """The weights a .pte holds, by where they are: the constant segment (tensors ExecuTorch's own kernels read,
    the quantized embedding among them: the runtime maps them from the file), XNNPACK's named data (the linears'
    weights and scales, which XNNPACK packs into memory of its own when the program loads) and the delegates'
    blobs (their graphs)."""
    pte_file = deserialize_pte_binary(pte.read_bytes())
    return dict(
        constant_segment=sum(len(buffer.storage) for buffer in pte_file.program.constant_buffer),
        xnnpack_named_data=sum(len(buffer) for buffer in pte_file.named_data.buffers) if pte_file.named_data else 0,
        delegate_blobs=sum(len(blob.data) for blob in pte_file.program.backend_delegate_data),
    )


def program_label(directory: Path, report: dict) -> str:
    """What decides a program's memory: its linears, lm_head, KV cache (programs from before `--kv-cache` have
    a float32 one) and context."""
    o = report["options"]
    return (f"our .pte: {o['qlinear']} g{o['group_size']}, lm_head {o['lm_head']}, KV cache {o.get('kv_cache', 'fp32')}, "
            f"context {o['max_seq_len']} (`{directory}`)")


def pte_row(row_id: str, label: str, directory: Path, report: dict) -> dict:
    return dict(id=row_id, label=label, engine="pte", path=str(directory / "model.pte"), planned_bytes=report["planned_memory_bytes"]["forward"],
                plan_parts=plan_parts(directory, report), weights=pte_weight_bytes(directory / "model.pte"))


def measured(row: dict, args: argparse.Namespace, prompt: list[int], context: int) -> dict:
    """`row` generated once in its own process: what decode_engines.py records, with the differences this file reports."""
    spec = dict(**{k: row[k] for k in ("engine", "path", "label")}, threads=args.threads, prompt_ids=prompt, new_tokens=args.new_tokens,
                repeats=1, warmup=0, context=context)
    # Speeds are dropped: memory is the process's own, but the speed of a run on a shared machine is not.
    result = {k: v for k, v in run_worker("decode_engines.py", spec).items() if k not in SPEED_KEYS}
    before, loaded, generated = (result["memory"][phase] for phase in ("before_load", "after_load", "after_generating"))
    print(f"{row['label']}: the model adds {generated['peak_mb'] - before['rss_mb']:.0f} MiB while generating", file=sys.stderr)
    return dict(
        **row, **result,
        libraries_mb=before["rss_mb"] - result["rss_at_start_mb"],
        load_peak_added_mb=loaded["peak_mb"] - before["rss_mb"],
        heap_added_by_load_mb=loaded["anon_mb"] - before["anon_mb"],
        model_file_resident_mb=loaded["model_file_mb"],
        generating_peak_added_mb=generated["peak_mb"] - before["rss_mb"],
    )


def measured_runs(rows: list[dict], args: argparse.Namespace, prompt: list[int], context: int) -> list[dict]:
    """Each row `args.runs` times, the engines taking turns, so that a drift of the machine shows in all of them."""
    return [dict(measured(row, args, prompt, context), run=i + 1) for i in range(args.runs) for row in rows]


def median_line(rows: list[dict]) -> str:
    medians = {}
    for r in rows:
        medians.setdefault(r["label"], []).append(r["generating_peak_added_mb"])
    return "Memory the model adds, median of its runs: " + "; ".join(f"{label} {statistics.median(v):.0f} MiB" for label, v in medians.items()) + "."


def first_runs(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["run"] == 1]


def memory_table(rows: list[dict]) -> list[str]:
    lines = ["| engine | run | RSS at start MiB | the engine's libraries add MiB | RSS before loading MiB | peak while loading − before MiB | "
             "after loading: heap added MiB | after loading: the model's file resident MiB | **memory the model adds** "
             "(peak while generating − RSS before loading) MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['run']} | {r['rss_at_start_mb']} | {r['libraries_mb']:.0f} | {r['memory']['before_load']['rss_mb']:.0f} | "
                     f"{r['load_peak_added_mb']:.0f} | {r['heap_added_by_load_mb']:.0f} | {r['model_file_resident_mb']:.0f} | "
                     f"**{r['generating_peak_added_mb']:.0f}** |")
    return lines


def plan_table(rows: list[dict]) -> list[str]:
    lines = ["| program | memory plan MiB | KV cache MiB | activations MiB | logits MiB | .pte: constant segment MiB | "
             ".pte: XNNPACK's weights (named data) MiB | .pte: delegate blobs MiB | heap the load adds beyond the plan MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, w = r["plan_parts"], r["weights"]
        lines.append(f"| {r['label']} | {r['planned_bytes'] / MIB:.1f} | {p['kv_cache'] / MIB:.1f} | {p['activations'] / MIB:.1f} | "
                     f"{p['logits'] / MIB:.2f} | {w['constant_segment'] / MIB:.1f} | {w['xnnpack_named_data'] / MIB:.1f} | "
                     f"{w['delegate_blobs'] / MIB:.2f} | {r['heap_added_by_load_mb'] - r['planned_bytes'] / MIB:.0f} |")
    return lines


def plan_lines(rows: list[dict]) -> list[str]:
    """The plan's parts as text, for the terminal."""
    return [f"{r['label']}: plan {r['planned_bytes'] / MIB:.1f} MiB = " + " + ".join(f"{k} {v / MIB:.1f}" for k, v in r["plan_parts"].items())
            + "; weights in the .pte: " + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in r["weights"].items()) for r in rows]


COPIES_SECTION = [
    "## Are the weights held twice?",
    "",
    "No, once loaded; one linear's weights at a time while loading. Measured below; the mechanism, from ExecuTorch's "
    "source (its main branch at cff6f4dd32: `extension/pybindings/pybindings.cpp`, `extension/data_loader/mmap_data_loader.cpp`, "
    "`backends/xnnpack/runtime/XNNCompiler.cpp`, `XNNPACKBackend.cpp`, `XNNWeightsCache.cpp`, "
    "`extension/module/module.cpp`, `extension/llm/runner/llm_runner_helper.h`; the wheel here is the "
    "version in the libraries above, and the measurements agree with it): runner/pte.py loads a program by its path "
    "(`kernels.load_program` → `Runtime.load_program(path)` → the pybindings' `_load_program`), which maps the file with "
    "`MmapDataLoader` and mlock()s each piece it loads (`MlockConfig::UseMlockIgnoreErrors`). XNNPACK reads each "
    "linear's weights and scales from the program's named data, packs them into memory of its own when its delegate "
    "initialises, then frees what it read (`XNNCompiler.cpp` frees the unpacked buffers after `xnn_create_runtime_v4`; "
    "with its weight cache on, `finalize_for_runtime` does; the delegate's blob is freed after init), and a buffer of a "
    "mapped file is freed by unmapping it. So XNNPACK's packed copy is the only one of the linears' weights: the heap "
    "the load adds beyond the plan is about the size of the named data. Each linear is a partition of its own, so a "
    "linear's weights are held twice only while XNNPACK packs it: the peak while loading, above the RSS once loaded, is "
    "about the largest linear (the lm_head, 8-bit). What stays mapped is the constant segment (the 8-bit embedding, the "
    "norms), mlock()ed by the pybindings, so resident whole; `kernels.load_program` unlocks its pages and drops them "
    "from the process before the methods load (`release_mapped_pages`: munlock, madvise DONTNEED), and the program "
    "reads them back from the page cache as it uses them: of the embedding, the pages of the tokens seen. The kernel "
    "maps a file's pages in the units its page cache holds them in: on this machine (Linux 6.18, ext4) large folios, "
    "mapped whole (a probe's /proc/self/smaps showed most of them as FilePmdMapped), so the rows of a few hundred tokens "
    "bring in far more than their own bytes: the file's pages resident after generating. That is what an app gets from "
    "ExecuTorch's `Module::LoadMode::Mmap`, the mode our C++ runner uses (runner/cpp/llm_program.cpp: mapped, no mlock); "
    "ExecuTorch's `create_text_llm_runner` defaults to `MmapUseMlockIgnoreErrors`, which keeps the constant segment "
    "resident as the pybindings do. The pybindings have no other way to open a file (from `bytes`, the whole file would "
    "stay in memory beside the packed weights), so runner/pte.py keeps loading by path.",
]


def copies_text(r: dict) -> str:
    """What the measurements say about the weights being held twice: the .pte's pages against XNNPACK's packed copy."""
    w, loaded, generated = r["weights"], r["memory"]["after_load"], r["memory"]["after_generating"]
    return (f"{r['label']}: the file holds a constant segment of {w['constant_segment'] / MIB:.1f} MiB and "
            f"{w['xnnpack_named_data'] / MIB:.1f} MiB of XNNPACK's weights; the heap the load adds beyond the plan is "
            f"{r['heap_added_by_load_mb'] - r['planned_bytes'] / MIB:.1f} MiB; the file's resident pages are "
            f"{loaded['model_file_mb']:.1f} MiB once loaded ({loaded['locked_mb']:.1f} MiB locked) and "
            f"{generated['model_file_mb']:.1f} MiB after generating; the peak while loading is "
            f"{loaded['peak_mb'] - loaded['rss_mb']:.1f} MiB above the RSS once loaded.")


def environment_text(rows: list[dict]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in libraries().items())
    llama = next((r["llama_cpp"] for r in rows if "llama_cpp" in r), None)
    return libs + (f" ({llama})" if llama else "")


def section(title: str, command: str, rows: list[dict], pte_rows: list[dict]) -> list[str]:
    return [f"## {title}", "", f"Command: `{command}`", "", *memory_table(rows), "", median_line(rows), "", *plan_table(first_runs(pte_rows))]


def shared_cpu_note(meta: dict, clean_load: float = 0.3) -> str:
    if max(meta["load_start"], meta["load_end"]) < clean_load:
        return ""
    return (" Other processes shared the CPU during the run: each row's memory is its own process's and does not depend "
            "on them; speeds would, so none are reported.")


def markdown(command: str, meta: dict, demo: list[dict], shape: list[dict]) -> str:
    lines = [
        "# Memory while generating",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; load average (1 min) {meta['load_start']:.2f} at the start, "
        f"{meta['load_end']:.2f} at the end.{shared_cpu_note(meta)} Libraries: {meta['environment']}.",
        "",
        f"Each row: {meta['prompt_tokens']} prompt tokens, then {meta['new_tokens']} greedy tokens (end tokens ignored), "
        f"{meta['threads']} thread(s), in a process of its own (benchmarks/decode_engines.py); {meta['runs']} runs of each "
        "engine, the engines taking turns. RSS before loading is the "
        "process with the engine's libraries imported (for our .pte, most of what they add is Python: the pybindings' "
        "`portable_lib.py` imports `executorch.exir` for a warning class; the C++ runtime is a small part); the heap is its "
        "anonymous memory, the model's file its mapped pages "
        "(/proc/self/smaps); peaks are Linux's high-water mark, reset after loading so that the generating peak is its own. "
        "Every size in MiB (2^20 bytes). The heap the load adds beyond the plan is that heap minus the plan "
        "(XNNPACK's packed weights and the runtime's own allocations).",
        "",
        *section("The demo model (SmolLM2-135M-Instruct): our .pte and llama.cpp in one run", command, demo, [r for r in demo if r["engine"] == "pte"]),
        "",
        *section(f"A random model with {meta['shape_name']}'s shapes", command, shape, shape),
    ]
    lines += ["", *COPIES_SECTION, "", *(f"- {copies_text(r)}" for r in first_runs(demo + shape) if r["engine"] == "pte")]
    if not any(r["engine"] == "llamacpp" for r in demo):
        lines += ["", "llama.cpp: not measured, llama-cpp-python is not installed (`pip install -e \".[bench]\"`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
    load_start = os.getloadavg()[0]
    demo_report, shape_report = ensure_export(args.pte, None), ensure_shape_export(args.shape_pte, args.shape)
    fp32_report = ensure_export(args.pte_kv_fp32, None, {"kv_cache": "fp32", "lm_head": "8da4w", "gptq": False})  # as vs_optimum.py's: its weights' values do not change its memory
    gguf = args.gguf or demo_gguf_path(demo_report["options"]["model"])
    demo_rows = [pte_row("pte", program_label(args.pte, demo_report), args.pte, demo_report),
                 pte_row("pte_kv_fp32", program_label(args.pte_kv_fp32, fp32_report), args.pte_kv_fp32, fp32_report)]
    if importlib.util.find_spec("llama_cpp") is not None:
        demo_rows.append(dict(id="llamacpp", label=f"llama.cpp, `{gguf.name}`", engine="llamacpp", path=str(gguf)))
    shape_rows = [pte_row("shape_pte", program_label(args.shape_pte, shape_report), args.shape_pte, shape_report)]
    demo = measured_runs(demo_rows, args, prompt_ids(args.pte, args.prompt_tokens), demo_report["metadata"]["get_max_context_len"])
    shape = measured_runs(shape_rows, args, prompt_ids(args.shape_pte, args.prompt_tokens), shape_report["metadata"]["get_max_context_len"])
    print("\n".join(plan_lines([r for r in first_runs(demo + shape) if r["engine"] == "pte"])), file=sys.stderr)
    meta = dict(cpu=cpu_text(), cores=os.cpu_count(), load_start=load_start, load_end=os.getloadavg()[0], environment=environment_text(demo),
                shape_name=SHAPES[args.shape].name, threads=args.threads, runs=args.runs, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    write_atomic(args.output, markdown(command, meta, demo, shape).encode())
    write_json_atomic(args.output.with_suffix(".json"), dict(command=command, **meta, demo=demo, shape=shape))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
