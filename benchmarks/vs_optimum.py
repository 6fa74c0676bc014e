"""Our demo .pte against optimum-executorch's own 8da4w program of the same model, side by side in one run.

    python benchmarks/vs_optimum.py --optimum /work/optimum-demo

Programs: our default export (`python -m export.to_pte`: learned rotation + online Hadamard, GPTQ 8da4w g32,
8da4w lm_head, int8 KV cache with R3), the same with `--lm-head 8da8w` (an 8-bit lm_head) and with
`--kv-cache fp32` (the float KV cache against the int8 one), both `--no-gptq` (the integers' values do not change
what a program computes per token, only which numbers it reads), and optimum's program
(benchmarks/optimum_program.sh makes it, in a venv of its own). A missing export of ours is made first.
Every program is driven the same way, by ExecuTorch's own C++ TextLLMRunner (the runner of its Android
and iOS demo apps, through executorch's Python bindings) in this environment's runtime, each in a
process of its own (benchmarks/decode_engines.py): a prompt text that the tokenizer reads as
`--prompt-tokens` tokens, then `--new-tokens` greedy tokens; prefill and decode are timed by the
runner's own clock (prompt in → first token; the later tokens), as its printed report counts them.
The runner rather than our Python loop (decode_speed.py's): it is what an app runs, and it leaves no
Python between two decode steps. Rounds alternate the programs, each round starting with the next
one, so that a drift of the machine's speed falls on every program alike; the medians pool every
round's runs. Beside the speeds, read from each .pte: what one forward call executes (kernel calls by
operator, XNNPACK delegate calls) and the logits it returns. Writes results/vs_optimum.md and
results/vs_optimum.json.
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from decode_speed import PROMPT_TEXT, busy_machine_warning, cpu_text, ensure_export, fmt, libraries, run_worker, threads_text
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import demo_hf_dir

# Issue 19's bar: ours ÷ optimum's, at every thread count.
BARS = {"decode_tokens_per_s": 1.1, "prefill_tokens_per_s": 1.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimum", type=Path, default=Path("/work/optimum-demo"), help="directory of optimum's program (benchmarks/optimum_program.sh)")
    p.add_argument("--pte", type=Path, default=Path("out/demo"), help="our default export (exported here if it has no model.pte)")
    p.add_argument("--pte-lm-head-8bit", type=Path, default=Path("out/demo-lm-head-8da8w"), help="our export with --lm-head 8da8w --no-gptq (likewise)")
    p.add_argument("--pte-kv-fp32", type=Path, default=Path("out/demo-kv-fp32"), help="our export with --kv-cache fp32 --no-gptq (likewise)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="times every program runs at every thread count, alternating")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per program and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first, in each process")
    p.add_argument("--output", type=Path, default=Path("results/vs_optimum.md"), help="the .json goes beside it")
    return p.parse_args(argv)


def our_program(row_id: str, directory: Path, options: dict[str, str] | None = None) -> dict:
    """One of our programs as a row: exported if missing, and refused if it is not what ships."""
    report = ensure_export(directory, None, options)
    o = report["options"]
    if o["full_logits"]:  # its prefill would run the lm_head at every prompt position
        sys.exit(f"{directory} was exported with --full-logits; this benchmark times the program that ships")
    kv = f", KV cache {o['kv_cache']}{' + R3' if report['rotation']['r3'] else ''}" if "kv_cache" in o else ""
    weights = "GPTQ" if o.get("gptq") or o.get("gptq_file") else "RTN"
    label = f"ours: {o['qlinear']} g{o['group_size']} {weights}, lm_head {o['lm_head']}{kv}, rotation {Path(o['rotation']).stem} (`{directory}`)"
    return dict(id=row_id, label=label, path=str(directory / "model.pte"), tokenizer=str(directory / "tokenizer.json"))


def optimum_program(directory: Path, model: str) -> tuple[dict, dict]:
    """optimum's program as a row (it ships no tokenizer: the demo model's own), and how it was made."""
    made = directory / "export_info.json"
    if not (directory / "model.pte").is_file() or not made.is_file():
        sys.exit(f"{directory} holds no optimum program: make it with benchmarks/optimum_program.sh")
    info = json.loads(made.read_text())
    row = dict(id="optimum", label=f"optimum-executorch {info['versions']['optimum-executorch']}: 8da4w g32, lm_head 8da4w (`{directory}`)",
               path=str(directory / "model.pte"), tokenizer=str(demo_hf_dir(model) / "tokenizer.json"))
    return row, info


def prompt_text(tokenizer_dir: Path, n: int) -> tuple[str, list[int]]:
    """The runner takes text: the first `n` tokens of decode_speed's prompt text, repeated as text (cycling
    its ids as decode_speed does would join a trailing space and the next "The" into one token once read
    again), checked to read back as exactly those ids; the runner checks its own count again."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    repeated = " ".join([PROMPT_TEXT.strip()] * (n // 64 + 1))  # the text is over 100 tokens: enough copies
    ids = tokenizer(repeated, add_special_tokens=False)["input_ids"][:n]
    text = tokenizer.decode(ids)
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        sys.exit(f"the {n}-token prompt does not read back as the same tokens; choose another --prompt-tokens")
    return text, ids


def forward_plan(pte: Path):
    """The program's forward as the .pte holds it (its instructions, values, operators)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    return next(p for p in getattr(program, "program", program).execution_plan if p.name == "forward")


def forward_instructions(plan) -> Counter:
    """What one call of forward executes, by kind: each runtime kernel by operator name, each call into the
    XNNPACK delegate as one. Read from the program itself, so it holds on a busy machine too."""
    names = [f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators]
    kinds = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            kind = type(args).__name__
            kinds[names[args.op_index] if kind == "KernelCall" else f"{plan.delegates[args.delegate_index].id} call" if kind == "DelegateCall" else kind] += 1
    return kinds


def logits_shape(plan) -> list[int]:
    """forward's output as planned: [1, 1, vocab] for the last position's logits, [1, longest call, vocab] for
    every position's (then a prefill runs the lm_head at every prompt position, and the plan holds them all)."""
    return list(plan.values[plan.outputs[0]].val.sizes)


def run_rounds(args: argparse.Namespace, programs: list[dict], text: str, ids: list[int]) -> list[dict]:
    """Every program at every thread count, once per round; round r starts with program r."""
    results = []
    for r in range(args.rounds):
        order = programs[r % len(programs):] + programs[:r % len(programs)]
        for threads in args.threads:
            for program in order:
                spec = dict(engine="text_llm_runner", path=program["path"], tokenizer=program["tokenizer"], label=program["label"],
                            threads=threads, prompt_text=text, prompt_ids=ids, new_tokens=args.new_tokens,
                            repeats=args.repeats, warmup=args.warmup)
                load = os.getloadavg()[0]
                result = run_worker("decode_engines.py", spec)
                if result["threads_in_effect"] != threads:
                    sys.exit(f"{program['label']} ran with {result['threads_in_effect']} threads, not {threads}")
                results.append(dict(id=program["id"], round=r, threads=threads, load_average_before=load, **result))
                print(f"round {r + 1}, {program['label']}, {threads_text(threads)}: prefill {result['prefill_tokens_per_s']:.1f} tok/s, "
                      f"decode {result['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return results


def pooled(programs: list[dict], results: list[dict], threads: list[int]) -> list[dict]:
    """Per program and thread count: medians over every round's runs, the peak RSS of its processes."""
    rows = []
    for program in programs:
        for t in threads:
            mine = [r for r in results if r["id"] == program["id"] and r["threads"] == t]
            runs = [run for r in mine for run in r["runs"]]
            rows.append(dict(**program, threads=t, runs=len(runs), peak_rss_mb=max(r["peak_rss_mb"] for r in mine),
                             cores_busy=statistics.median(r["cores_busy"] for r in mine), generated=mine[0]["generated"],
                             **{k: statistics.median(run[k] for run in runs) for k in BARS}))
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each of our programs over optimum's, per thread count and measure."""
    theirs = {r["threads"]: r for r in rows if r["id"] == "optimum"}
    return [dict(id=r["id"], threads=r["threads"], **{k: r[k] / theirs[r["threads"]][k] for k in BARS})
            for r in rows if r["id"] != "optimum"]


def table(rows: list[dict]) -> list[str]:
    lines = ["| program | threads | prefill tok/s | decode tok/s | runs | peak RSS MB | cores busy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['threads']} | {fmt(r['prefill_tokens_per_s'])} | {fmt(r['decode_tokens_per_s'])} | "
                     f"{r['runs']} | {r['peak_rss_mb']} | {fmt(r['cores_busy'], 2)} |")
    return lines


def ratio_lines(rows: list[dict], quotients: list[dict]) -> list[str]:
    labels = {r["id"]: r["label"] for r in rows}
    lines = []
    for q in quotients:
        verdicts = ", ".join(f"{k.split('_')[0]} {q[k]:.2f}× ({'meets' if q[k] >= bar else 'BELOW'} the {bar}× bar)" for k, bar in BARS.items())
        lines.append(f"- {labels[q['id']]}, {threads_text(q['threads'])}: ÷ optimum's {verdicts}.")
    return lines


def kv_int8_lines(rows: list[dict]) -> list[str]:
    """The int8 KV cache's decode (our default) over the float one's, per thread count (issue 19's bar: at least 0.95×)."""
    speed = {(r["id"], r["threads"]): r["decode_tokens_per_s"] for r in rows}
    return [f"- {threads_text(t)}: int8 KV decode ÷ float32 KV decode {speed['ours', t] / speed['ours_kv_fp32', t]:.2f}× "
            f"({'meets' if speed['ours', t] >= 0.95 * speed['ours_kv_fp32', t] else 'BELOW'} the 0.95× bar)."
            for (i, t) in speed if i == "ours" and ("ours_kv_fp32", t) in speed]


def instructions_table(programs: list[dict], instructions: dict[str, Counter], logits: dict[str, list[int]]) -> list[str]:
    """Per program, what one forward call executes (where the time between XNNPACK's GEMMs goes), and the logits it returns."""
    kinds = sorted({k for c in instructions.values() for k in c}, key=lambda k: -max(c[k] for c in instructions.values()))
    lines = ["| instruction | " + " | ".join(p["id"] for p in programs) + " |", "|---" * (len(programs) + 1) + "|",
             "| logits returned (planned float32 MB) | " + " | ".join(f"{logits[p['id']]} ({4 * math.prod(logits[p['id']]) / 1e6:.1f})" for p in programs) + " |",
             "| all instructions | " + " | ".join(str(sum(instructions[p["id"]].values())) for p in programs) + " |"]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(str(instructions[p["id"]][kind]) for p in programs) + " |")
    return lines


def markdown(command: str, meta: dict, programs: list[dict], rows: list[dict], quotients: list[dict],
             instructions: dict[str, Counter], logits: dict[str, list[int]]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in meta["libraries"].items())
    made = meta["optimum"]
    lines = [
        "# Our demo .pte against optimum-executorch's 8da4w program, side by side",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; load average (1 min) {meta['load_start']:.2f} at the start, "
        f"{meta['load_end']:.2f} at the end.{busy_machine_warning(meta)} Runtime and libraries (every program runs here): {libs}.",
        "",
        f"optimum's program: `{made['command']}` in its own venv ({', '.join(f'{k} {v}' for k, v in made['versions'].items())}), "
        f"{made['export_seconds']} s to export.",
        "",
        f"Each program driven by ExecuTorch's TextLLMRunner in a process of its own: a {meta['prompt_tokens']}-token prompt, then "
        f"{meta['new_tokens']} greedy tokens; prefill = prompt in → first token, decode = the later tokens, by the runner's own "
        f"clock. Rounds: {meta['rounds']}, alternating the programs (each round starts with the next one); timed runs per program "
        f"and round: {meta['repeats']}, after {meta['warmup']} warm-up run(s) in each process; medians over every round's runs. Threads: ExecuTorch's threadpool "
        "(`portable_lib._unsafe_reset_threadpool`, which the runner's XNNPACK uses).",
        "",
        *table(rows),
        "",
        "Ours over optimum's (issue 19's bar: decode ≥ 1.1×, prefill ≥ 1.0× at every thread count):",
        "",
        *ratio_lines(rows, quotients),
        "",
        "Our int8 KV cache (with R3, the default) against our float32 one, in the same run:",
        "",
        *kv_int8_lines(rows),
        "",
        "## What one forward call executes",
        "",
        "Read from each program (the same for a prefill and a decode call): the runtime's kernel calls by operator, and each "
        "call into the XNNPACK delegate (all of its operators inside, GEMMs and all) as one. Ids: "
        + "; ".join(f"`{p['id']}` {p['label']}" for p in programs) + ".",
        "",
        *instructions_table(programs, instructions, logits),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/vs_optimum.py", *(sys.argv[1:] if argv is None else argv)])
    load_start = os.getloadavg()[0]
    ours = [our_program("ours", args.pte, {"gptq": True}), our_program("ours_lm_head_8bit", args.pte_lm_head_8bit, {"lm_head": "8da8w", "gptq": False}),
            our_program("ours_kv_fp32", args.pte_kv_fp32, {"kv_cache": "fp32", "lm_head": "8da4w", "gptq": False})]
    theirs, made = optimum_program(args.optimum, json.loads((args.pte / "export_report.json").read_text())["options"]["model"])
    programs = [*ours, theirs]
    plans = {p["id"]: forward_plan(Path(p["path"])) for p in programs}
    instructions = {i: forward_instructions(plan) for i, plan in plans.items()}
    logits = {i: logits_shape(plan) for i, plan in plans.items()}
    text, ids = prompt_text(args.pte, args.prompt_tokens)
    results = run_rounds(args, programs, text, ids)
    rows = pooled(programs, results, args.threads)
    quotients = ratios(rows)
    meta = dict(cpu=cpu_text(), cores=os.cpu_count(), load_start=load_start, load_end=os.getloadavg()[0], libraries=libraries(),
                optimum=made, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
                repeats=args.repeats, warmup=args.warmup)
    text_md = markdown(command, meta, programs, rows, quotients, instructions, logits)
    write_atomic(args.output, text_md.encode())
    write_json_atomic(args.output.with_suffix(".json"), dict(command=command, **meta, prompt_text=text, rows=rows, ratios=quotients,
                                                             instructions=instructions, logits_shapes=logits, processes=results))
    print(text_md)


if __name__ == "__main__":
    main()
