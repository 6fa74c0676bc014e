"""Prefill and decode speed of the demo model on this CPU: our .pte beside llama.cpp and HF eager.

    python benchmarks/decode_speed.py --pte out/demo --pte-unrotated out/none

Each row is measured in a process of its own (benchmarks/decode_engines.py), with each thread
count: our .pte (default `python -m export.to_pte`: 8da4w, learned rotation, online Hadamard on
down_proj's input), the same export with `--rotation none` (the difference is the Hadamard's
cost), Hugging Face eager fp32, and llama.cpp (`pip install -e ".[bench]"`) on the GGUF file the
demo model comes from; then the memory-bandwidth bound (benchmarks/memory_bound.py). A missing
.pte directory is exported first (about 4 minutes on 2 cores). An ETDump profile of our .pte's
decode step at each thread count (benchmarks/decode_profile.py) says where the time goes, and
gives the online Hadamard's cost as its kernel's share of the step: measured inside one run, that
share does not drift with the machine as two separate runs' speeds do. Writes
results/decode_speed.md and results/decode_speed.json.
"""

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from spinquant.rotation import default_rotation
from memory_bound import copy_bandwidth, gguf_bytes_per_token, pte_bytes_per_token
from spinquant.environment import describe_environment
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import DEMO_MODELS, demo_gguf_path, demo_hf_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The prompt is this text's first N tokens (cycled when N is longer): ordinary prose, so that
# every engine gets the same token ids.
PROMPT_TEXT = (
    "The history of the city begins with a small fishing village on the northern bank of the river. "
    "Over the following centuries, merchants built warehouses along the water, and the village grew "
    "into a market town that traded grain, wool and timber with its neighbours. When the railway "
    "arrived, factories replaced many of the old workshops, and thousands of families moved in from "
    "the countryside to find work. Today the old warehouses hold museums, shops and apartments, and "
    "the river, once crowded with barges, is a quiet place where people walk, cycle and fish. "
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pte", type=Path, default=Path("out/demo"), help="directory of the default export (exported here if it has no model.pte)")
    p.add_argument("--pte-unrotated", type=Path, default=Path("out/none"), help="directory of the --rotation none export (exported here if missing)")
    p.add_argument("--gguf", type=Path, help="llama.cpp's model (default: the demo model's own GGUF file)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--profile-steps", type=int, default=16, help="decode steps in the ETDump profile")
    p.add_argument("--output", type=Path, default=Path("results/decode_speed.md"), help="the .json goes beside it")
    return p.parse_args(argv)


def ensure_export(directory: Path, rotation: str | None, options: dict[str, str] | None = None) -> dict:
    """The export's report; exported first when the directory has no program. `rotation` None: the
    default export (the model's default rotation); otherwise an export with this rotation. `options`:
    other export options by name (`{"lm_head": "8da4w"}` exports with `--lm-head 8da4w`, `{"gptq": False}` with
    `--no-gptq`), checked too."""
    options = options or {}
    if not (directory / "model.pte").is_file():
        extra = (["--rotation", rotation] if rotation else []) + [a for k, v in options.items() for a in flag(k, v)]
        subprocess.run([sys.executable, "-m", "export.to_pte", "--output-dir", str(directory), *extra], cwd=ROOT, check=True)
    report = json.loads((directory / "export_report.json").read_text())
    made = report["options"]
    if made["model"] not in DEMO_MODELS:
        sys.exit(f"{directory} holds a {made['model']} program; this benchmark compares the demo model with its own GGUF file")
    wanted = rotation or default_rotation(made["model"])
    if Path(made["rotation"]).name != Path(wanted).name:  # a rotation file's directory depends on the checkout
        sys.exit(f"{directory} was exported with --rotation {made['rotation']}, not {wanted}")
    for name, value in options.items():
        if made.get(name) != value:
            sys.exit(f"{directory} was exported with --{name.replace('_', '-')} {made.get(name)}, not {value}")
    return report


def flag(name: str, value: str | bool) -> tuple[str, ...]:
    """An export option as its command-line flag(s)."""
    option = name.replace("_", "-")
    if isinstance(value, bool):
        return (f"--{option}",) if value else (f"--no-{option}",)
    return (f"--{option}", value)


def prompt_ids(tokenizer_dir: Path, n: int) -> list[int]:
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    return [ids[i % len(ids)] for i in range(n)]


def run_worker(script: str, spec: dict, checkout: Path = ROOT) -> dict:
    """`script SPEC RESULT` in a fresh process with `spec['threads']` threads; its result. Another `checkout` of this
    repository runs its own copy of the script with its own code first on the path, so its own kernels."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}  # llama.cpp's and torch's OpenMP pools
    if checkout != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(checkout / "benchmarks" / script), str(spec_path), str(result_path)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{script} failed for {spec.get('label', spec['path'])} with {spec['threads']} threads:\n{done.stderr[-3000:]}")
        return json.loads(result_path.read_text())


def pte_label(directory: Path, report: dict) -> str:
    o, r = report["options"], report["rotation"]
    rotation = Path(o["rotation"]).stem if o["rotation"].endswith(".pt") else o["rotation"]
    hadamard = " + online Hadamard" if r["r4_online_hadamard"] else ""
    return f".pte {o['qlinear']} g{o['group_size']}, rotation {rotation}{hadamard} (`{directory}`)"


def engines(args: argparse.Namespace, reports: dict, gguf: Path) -> list[dict]:
    model = reports["pte"]["options"]["model"]
    rows = [
        dict(id="pte", label=pte_label(args.pte, reports["pte"]), engine="pte", path=str(args.pte / "model.pte")),
        dict(id="pte_unrotated", label=pte_label(args.pte_unrotated, reports["pte_unrotated"]), engine="pte", path=str(args.pte_unrotated / "model.pte")),
        dict(id="hf", label="Hugging Face eager fp32", engine="hf", path=model),
    ]
    if importlib.util.find_spec("llama_cpp") is not None:
        rows.append(dict(id="llamacpp", label=f"llama.cpp, `{gguf.name}`", engine="llamacpp", path=str(gguf)))
    return rows


def measure_rows(args: argparse.Namespace, engine_list: list[dict], prompt: list[int], context: int) -> list[dict]:
    rows = []
    for engine in engine_list:
        for threads in args.threads:
            spec = dict(**engine, threads=threads, prompt_ids=prompt, new_tokens=args.new_tokens,
                        repeats=args.repeats, warmup=args.warmup, context=context)
            load = os.getloadavg()[0]
            rows.append(dict(**engine, threads=threads, load_average_before=load, **run_worker("decode_engines.py", spec)))
            if rows[-1]["threads_in_effect"] != threads:
                sys.exit(f"{engine['label']} ran with {rows[-1]['threads_in_effect']} threads, not {threads}")
            print(f"{engine['label']}, {threads_text(threads)}: prefill {rows[-1]['prefill_tokens_per_s']:.1f} tok/s, "
                  f"decode {rows[-1]['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return rows


def bound_rows(args: argparse.Namespace, report: dict, gguf: Path) -> tuple[list[dict], dict]:
    """Bound rows per thread count, and the bytes per token by part."""
    config = AutoConfig.from_pretrained(demo_hf_dir(report["options"]["model"]))
    kv_positions = args.prompt_tokens + args.new_tokens / 2  # mean keys read over the decode steps
    parts = {"pte": pte_bytes_per_token(config, report["options"], kv_positions)}
    labels = {"pte": "memory bound of the .pte"}
    if gguf.is_file():
        parts["gguf"] = gguf_bytes_per_token(gguf, config, kv_positions)
        labels["gguf"] = f"memory bound of llama.cpp on `{gguf.name}`"
    bandwidths = {threads: copy_bandwidth(threads) for threads in args.threads}
    rows = []
    for key, p in parts.items():
        for threads, bandwidth in bandwidths.items():
            rows.append(dict(id=f"bound_{key}", label=labels[key], threads=threads, copy_bandwidth_gb_s=bandwidth / 1e9,
                             bytes_per_token=sum(p.values()), decode_tokens_per_s=bandwidth / sum(p.values())))
    return rows, parts


def decode_speed(rows: list[dict], row_id: str, threads: int) -> float | None:
    return next((r["decode_tokens_per_s"] for r in rows if r["id"] == row_id and r["threads"] == threads), None)


def hadamard_share(profile: dict) -> float:
    """The online Hadamard kernel's milliseconds per decode step over the step's."""
    return sum(op["ms"] for op in profile["operators"] if "hadamard_transform" in op["operator"]) / profile["step_ms"]


def summary(rows: list[dict], profiles: dict[int, dict]) -> dict:
    """Per thread count: the online Hadamard's cost and our speed relative to llama.cpp."""
    out = {}
    for t, profile in profiles.items():
        ours, unrotated, llama = (decode_speed(rows, i, t) for i in ("pte", "pte_unrotated", "llamacpp"))
        prefill = {r["id"]: r["prefill_tokens_per_s"] for r in rows if r["threads"] == t and "prefill_tokens_per_s" in r}
        out[t] = dict(
            online_hadamard_share_of_step=hadamard_share(profile),
            online_hadamard_cost=1 - ours / unrotated,
            pte_over_llamacpp_decode=ours / llama if llama else None,
            pte_over_llamacpp_prefill=prefill["pte"] / prefill["llamacpp"] if llama else None,
        )
    return out


def cpu_text() -> str:
    """The CPU with what decides these speeds: family and model (a VM may hide the product name),
    the widest SIMD it has, and its last-level cache."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    simd = next((f for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags), "no AVX")
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    cache = f", L3 {l3.read_text().strip()}" if l3.is_file() else ""
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}), {simd}{cache}"


def libraries() -> dict:
    found = describe_environment()
    for key in ("device", "threads"):  # the machine has its own line; each row sets its own threads
        found.pop(key)
    for package in ("llama-cpp-python", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def threads_text(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


def size_text(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def results_table(rows: list[dict]) -> list[str]:
    lines = ["| engine | threads | prefill tok/s | decode tok/s | peak RSS MB | RSS before the model loaded (the engine's libraries in) MB | cores busy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['threads']} | {fmt(r.get('prefill_tokens_per_s'))} | {fmt(r['decode_tokens_per_s'])} | "
                     f"{r.get('peak_rss_mb', '—')} | {r.get('rss_before_load_mb', '—')} | {fmt(r.get('cores_busy'), 2)} |")
    return lines


def bound_section(bounds: list[dict], parts: dict) -> list[str]:
    lines = ["Memory bound = bytes one decode step reads ÷ copy bandwidth (numpy copy of 256 MiB per thread count, "
             "read + write bytes, best of 5): " + "; ".join(f"{threads_text(r['threads'])} {r['copy_bandwidth_gb_s']:.1f} GB/s"
                                                           for r in bounds if r["id"] == "bound_pte") + "."]
    for key, p in parts.items():
        pieces = ", ".join(f"{name} {size_text(b)}" for name, b in p.items())
        lines.append(f"Bytes per decoded token, {'our .pte' if key == 'pte' else 'llama.cpp'}: {size_text(sum(p.values()))} ({pieces}).")
    return lines


def summary_lines(s: dict) -> list[str]:
    lines = []
    for t, v in s.items():
        line = (f"{threads_text(t)}: online Hadamard {v['online_hadamard_share_of_step']:.1%} of a decode step (its kernel's "
                f"ms ÷ the step's, ETDump below); 1 − rotated ÷ unrotated decode tok/s {v['online_hadamard_cost']:+.1%}")
        if v["pte_over_llamacpp_decode"] is not None:
            line += f"; .pte ÷ llama.cpp: decode {v['pte_over_llamacpp_decode']:.2f}, prefill {v['pte_over_llamacpp_prefill']:.2f}"
        lines.append(line + ".")
    return lines


def profile_section(profile: dict, top: int = 12) -> list[str]:
    ops, step = profile["operators"], profile["step_ms"]
    lines = [
        f"## Where a decode step of our .pte goes (ETDump, {threads_text(profile['threads'])}, median of {profile['steps']} steps)",
        "",
        f"One step: {step:.2f} ms with the event tracer on. XNNPACK operators are the delegate's own events "
        "(the linears, lm_head included); the rest are ExecuTorch kernels.",
        "",
        "| operator | calls per step | ms per step | share of the step |",
        "|---|---|---|---|",
    ]
    for op in ops[:top]:
        lines.append(f"| {op['operator']}{' (XNNPACK)' if op['xnnpack'] else ''} | {op['calls']} | {op['ms']:.3f} | {op['ms'] / step:.1%} |")
    rest = sum(op["ms"] for op in ops[top:])
    lines.append(f"| {len(ops) - top} other operators | | {rest:.3f} | {rest / step:.1%} |")
    for name, ms in profile["between_operators"].items():
        lines.append(f"| between operators: {name} | | {ms:.3f} | {ms / step:.1%} |")
    return lines


def busy_machine_warning(meta: dict, clean_load: float = 0.3) -> str:
    if max(meta["load_start"], meta["load_end"]) < clean_load:
        return ""
    return f" **Other processes were running (load average {clean_load} or more): these numbers are not clean.**"


def markdown(args_line: str, meta: dict, rows: list[dict], bounds: list[dict], parts: dict, s: dict, profiles: dict[int, dict]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in meta["libraries"].items())
    if meta["llama_cpp"]:
        libs += f" ({meta['llama_cpp']})"
    lines = [
        "# Decode speed of the demo model on this CPU",
        "",
        f"Command: `{args_line}`",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; load average (1 min) {meta['load_start']:.2f} at the start, "
        f"{meta['load_end']:.2f} at the end.{busy_machine_warning(meta)} Libraries: {libs}.",
        "",
        f"Prompt {meta['prompt_tokens']} tokens, then {meta['new_tokens']} new tokens, greedy, end tokens ignored; "
        f"median of {meta['repeats']} runs after {meta['warmup']} warm-up run(s); every row in its own process, "
        "timed by the same loop (runner.generate's generate()). Prefill: prompt in → first token chosen; "
        "decode: each later token. Every engine computes the last prompt position's logits only. The .pte's peak RSS "
        "includes ExecuTorch's memory plan, allocated when the program loads (results/memory.md splits it). The .pte's threads are ExecuTorch's threadpool "
        "(`portable_lib._unsafe_reset_threadpool`), transformers' are `torch.set_num_threads`, llama.cpp's "
        "`n_threads`/`n_threads_batch`. Cores busy: the process's CPU seconds per wall second over the timed runs "
        "(a pool that spins while it waits counts; each thread's seconds are in the .json).",
        "",
        *results_table(rows + bounds),
        "",
        *summary_lines(s),
        "",
        *bound_section(bounds, parts),
    ]
    if "llamacpp" not in {r["id"] for r in rows}:
        lines += ["", "llama.cpp: not measured, llama-cpp-python is not installed (`pip install -e \".[bench]\"`)."]
    for profile in profiles.values():
        lines += ["", *profile_section(profile)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args_line = shlex.join(["python", "benchmarks/decode_speed.py", *(sys.argv[1:] if argv is None else argv)])
    load_start = os.getloadavg()[0]
    reports = {"pte": ensure_export(args.pte, None), "pte_unrotated": ensure_export(args.pte_unrotated, "none")}
    gguf = args.gguf or demo_gguf_path(reports["pte"]["options"]["model"])
    prompt = prompt_ids(args.pte, args.prompt_tokens)
    rows = measure_rows(args, engines(args, reports, gguf), prompt, reports["pte"]["metadata"]["get_max_context_len"])
    bounds, parts = bound_rows(args, reports["pte"], gguf)
    profiles = {t: run_worker("decode_profile.py", dict(path=str(args.pte / "model.pte"), threads=t, prompt_ids=prompt, steps=args.profile_steps))
                for t in args.threads}
    s = summary(rows, profiles)
    meta = dict(cpu=cpu_text(), cores=os.cpu_count(), load_start=load_start, load_end=os.getloadavg()[0],
                libraries=libraries(), llama_cpp=next((r["llama_cpp"] for r in rows if "llama_cpp" in r), None), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                repeats=args.repeats, warmup=args.warmup)
    text = markdown(args_line, meta, rows, bounds, parts, s, profiles)
    write_atomic(args.output, text.encode())
    write_json_atomic(args.output.with_suffix(".json"), dict(command=args_line, **meta, rows=rows, bounds=bounds,
                                                             bytes_per_token=parts, summary=s, profiles=profiles))
    print(text)


if __name__ == "__main__":
    main()
