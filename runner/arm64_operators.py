"""Where an arm64 run first leaves the x86 one: every operator's output of one forward, from ExecuTorch's ETDump
debug buffer, on both machines, compared in execution order.

    python -m runner.arm64 operators --pte P --ids 1          # host side: both runs, operators.md
    python -m runner.arm64_operators PTE IDS OUT_DIR          # guest side: one forward, etdump.etdp + debug.bin

XNNPACK's int8 activation quantization is where the two machines part first for the demo's program: on x86 it
rounds x·m (m = 255 / (max(x, 0) − min(x, 0)), per row) to the nearest integer, ties to even (its QD8 convert);
on arm64 KleidiAI's quantize-pack (QP8) rounds ties away from zero (roundf). Activations that come from int8
values scaled by one factor (the int8 embedding, dequantized KV rows) land on exact ties now and then;
`quantizer_disagreements` finds the channels the two round apart.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spinquant.errors import one_line_errors

DEBUG_BUFFER_PER_TOKEN = 64 << 20  # the demo's 30 layers log about 5 MB per position; room for larger models


@dataclass(frozen=True)
class OperatorOutput:
    index: int  # the event's place in the run: the same program runs the same events on both machines
    name: str
    tensors: tuple[torch.Tensor, ...]


def run_forward_with_etdump(pte: Path, ids: list[int], out_dir: Path) -> None:
    """One forward of `ids` from position 0, every operator's outputs kept (ETDump, debug buffer)."""
    from executorch.runtime import Runtime

    from runner.pte import load_runtime_kernels

    load_runtime_kernels()
    program = Runtime.get().load_program(pte, enable_etdump=True, debug_buffer_size=DEBUG_BUFFER_PER_TOKEN * len(ids))
    program.load_method("forward").execute([torch.tensor([ids]), torch.arange(len(ids))])
    out_dir.mkdir(parents=True, exist_ok=True)
    program.write_etdump_result_to_file(str(out_dir / "etdump.etdp"), str(out_dir / "debug.bin"))


def operator_outputs(run_dir: Path) -> list[OperatorOutput]:
    """The logged outputs of a run_forward_with_etdump, in execution order (events without tensors left out)."""
    import warnings

    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the debug buffer is read-only: torch warns once per tensor made from it
        inspector = Inspector(etdump_path=str(run_dir / "etdump.etdp"), debug_buffer_path=str(run_dir / "debug.bin"))
        events = [e for block in inspector.event_blocks for e in block.events]
        return [
            OperatorOutput(i, e.name, tuple(t.clone() for t in e.debug_data if isinstance(t, torch.Tensor)))
            for i, e in enumerate(events)
            if e.debug_data and e.name != "OPERATOR_CALL"  # OPERATOR_CALL repeats the operator event before it
        ]


@dataclass(frozen=True)
class Difference:
    index: int
    name: str
    output: int
    shape: tuple[int, ...]
    max_abs: float
    elements: int
    of: int


def differences(x86: list[OperatorOutput], arm64: list[OperatorOutput]) -> list[Difference]:
    """Every logged tensor that is not the same bits on both machines, in execution order."""
    if [o.index for o in x86] != [o.index for o in arm64]:
        raise ValueError("the two runs logged different events: not the same program or inputs")
    found = []
    for a, b in zip(x86, arm64):
        for j, (s, t) in enumerate(zip(a.tensors, b.tensors)):
            if not torch.equal(s, t):
                delta = (s.double() - t.double()).abs()
                found.append(Difference(a.index, a.name, j, tuple(s.shape), delta.max().item(), int((delta > 0).sum()), s.numel()))
    return found


def quantization_multiplier(row: np.ndarray) -> np.float32:
    """The per-row multiplier both quantizers start from, in float32 as they compute it."""
    low, high = min(np.float32(0), row.min()), max(np.float32(0), row.max())
    return np.float32(1) if low == high else np.float32(np.float32(255) / np.float32(high - low))


def quantizer_disagreements(rows: torch.Tensor) -> list[list[int]]:
    """Per row, the channels that x86's QD8 convert and arm64's QP8 quantize-pack round to different integers. x86
    multiplies by 1 / (1 / m), rounds ties to even; arm64 multiplies by m, rounds ties away from zero."""
    found = []
    for row in rows.reshape(-1, rows.shape[-1]).float().numpy():
        m = quantization_multiplier(row)
        on_x86 = np.rint((row * np.float32(np.float32(1) / np.float32(np.float32(1) / m))).astype(np.float64))
        scaled = (row * m).astype(np.float64)  # the float32 product, exactly
        on_arm64 = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
        found.append(np.flatnonzero(on_x86 != on_arm64).tolist())
    return found


def first_delegate_input(x86: list[OperatorOutput], diffs: list[Difference]) -> torch.Tensor | None:
    """The input of the first XNNPACK call whose output differs, if that input is the same bits on both machines: the
    first tensor the delegate logs is its input (the call's arguments, then its result)."""
    first = next((d for d in diffs if d.name == "DELEGATE_CALL"), None)
    if first is None or any(d.index == first.index and d.output == 0 for d in diffs):
        return None
    return next(o for o in x86 if o.index == first.index).tensors[0]


def markdown(diffs: list[Difference], rows: torch.Tensor | None, limit: int = 12) -> str:
    """The first `limit` differences as a table; with `rows`, the first differing XNNPACK call's input, the channels
    its two quantizers round apart."""
    if not diffs:
        return "Every logged operator output is the same bits on both machines."
    lines = ["| event | operator | output | shape | max \\|Δ\\| | elements differing |", "|---|---|---|---|---|---|"]
    for d in diffs[:limit]:
        lines.append(f"| {d.index} | `{d.name}` | {d.output} | {'×'.join(map(str, d.shape))} | "
                     f"{d.max_abs:.3g} | {d.elements} of {d.of} |")
    lines.append(f"\n{len(diffs)} logged tensors differ in all.")
    if rows is not None:
        flat = rows.reshape(-1, rows.shape[-1]).float().numpy()
        named = [f"row {r}, channel {c}: x·m = {flat[r, c] * quantization_multiplier(flat[r]):g}"
                 for r, channels in enumerate(quantizer_disagreements(rows)) for c in channels]
        lines.append("\nThe first XNNPACK call that differs has the same input on both machines; the channels its two "
                     f"quantizers round apart: {'; '.join(named) or 'none'}.")
    return "\n".join(lines)


if __name__ == "__main__":
    with one_line_errors("runner.arm64_operators"):
        run_forward_with_etdump(Path(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")], Path(sys.argv[3]))
