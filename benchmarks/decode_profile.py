"""Where one decode step of a .pte spends its time: ExecuTorch's ETDump read by its Inspector.

    python benchmarks/decode_profile.py SPEC.json RESULT.json

The wheel's Python runtime records an ETDump when a program is loaded with enable_etdump=True:
every kernel call, and inside the XNNPACK delegate every XNNPACK operator. The program is run on
the prompt, then greedily for `steps` decode steps; each operator's time per step is the median
over those steps (the prompt's execution is left out).
"""

import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

# Events that only wrap others: the whole step, a delegate call (its XNNPACK operators are events
# of their own) and the runtime's per-kernel wrapper (its kernel is an event of its own).
STEP, WRAPPERS = "Method::execute", ("DELEGATE_CALL", "OPERATOR_CALL")


def record_etdump(pte: Path, prompt_ids: list[int], steps: int, threads: int, etdump: Path) -> None:
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    from runner.pte import load_runtime_kernels

    portable_lib._unsafe_reset_threadpool(threads)
    load_runtime_kernels()
    program = Runtime.get().load_program(pte, enable_etdump=True)
    forward = program.load_method("forward")
    logits = forward.execute([torch.tensor([prompt_ids]), torch.arange(len(prompt_ids))])[0]
    for position in range(len(prompt_ids), len(prompt_ids) + steps):
        token = int(logits[0, -1].argmax())
        logits = forward.execute([torch.tensor([[token]]), torch.tensor([position])])[0]
    program.write_etdump_result_to_file(str(etdump), str(etdump.with_suffix(".debug")))


def operator_name(event_name: str) -> str:
    """One name per kind of operator: XNNPACK numbers its operators (`... GEMM #2`), the runtime
    prefixes its kernels (`native_call_mul.out`)."""
    return re.sub(r" #\d+$", "", event_name).removeprefix("native_call_")


def per_step(etdump: Path, steps: int) -> tuple[dict[str, list[float]], dict[str, int], set[str]]:
    """Milliseconds of each event kind in each decode step, calls per step, and the XNNPACK kinds."""
    from executorch.devtools import Inspector

    block = next(b for b in Inspector(etdump_path=str(etdump)).event_blocks if b.name == "Execute")
    ms: dict[str, list[float]] = defaultdict(lambda: [0.0] * steps)
    calls: dict[str, int] = defaultdict(int)
    delegated = set()
    for event in block.events:
        if event.perf_data is None:
            continue
        name = event.name if event.name in (STEP, *WRAPPERS) else operator_name(event.name)
        calls[name] += 1
        if event.is_delegated_op:
            delegated.add(name)
        for i, t in enumerate(event.perf_data.raw[-steps:]):  # the first execution is the prompt's
            ms[name][i] += t
    return ms, calls, delegated


def summed(ms: dict[str, list[float]], names: list[str], steps: int) -> list[float]:
    return [sum(ms[n][i] for n in names) for i in range(steps)]


def step_times(etdump: Path, steps: int) -> dict:
    """The median step's milliseconds; per operator kind its calls and median milliseconds per step;
    and the time between operators: inside delegate calls, in the runtime's kernel wrapper, and in
    the rest of the step (each the median over steps of the step's difference)."""
    ms, calls, delegated = per_step(etdump, steps)
    step, delegate, wrapper = (ms.pop(n, [0.0] * steps) for n in (STEP, *WRAPPERS))
    xnnpack = summed(ms, [n for n in ms if n in delegated], steps)
    kernels = summed(ms, [n for n in ms if n not in delegated], steps)
    between = {
        "XNNPACK delegate calls, outside their operators": [d - x for d, x in zip(delegate, xnnpack)],
        "runtime's kernel-call wrapper, outside the kernels": [w - k for w, k in zip(wrapper, kernels)],
        "rest of the step (the runtime's instruction loop)": [s - d - w for s, d, w in zip(step, delegate, wrapper)],
    }
    rows = [dict(operator=n, calls=calls[n], ms=statistics.median(t), xnnpack=n in delegated) for n, t in ms.items()]
    return dict(
        step_ms=statistics.median(step),
        operators=sorted(rows, key=lambda r: -r["ms"]),
        between_operators={k: statistics.median(v) for k, v in between.items()},
    )


def profile(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "decode.etdp"
        record_etdump(Path(spec["path"]), spec["prompt_ids"], spec["steps"], spec["threads"], etdump)
        times = step_times(etdump, spec["steps"])
    return dict(threads=spec["threads"], steps=spec["steps"], **times)


if __name__ == "__main__":
    spec_path, result_path = map(Path, sys.argv[1:3])
    result_path.write_text(json.dumps(profile(json.loads(spec_path.read_text())), indent=1))
