"""`python scripts/xnnpack_linear_arm64.py K N [K N ...]`: one 8da4w linear (K inputs, N outputs, group 32, bf16
scales: the export's) lowered to XNNPACK, run on 16 rows here and on arm64 under qemu; per row, whether the outputs
are the same bits. Rows drawn like a norm's output with four large channels, seed 0; rows 8-15 get one channel
placed on an exact rounding tie of the int8 activation quantization.

On arm64 XNNPACK quantizes activations with KleidiAI's quantize-pack, which rounds ties away from zero; on x86
its own convert rounds them to even (runner/arm64_operators.py). Apart from ties, KleidiAI's matmuls sum their
per-group partial products in another order than x86 XNNPACK's where the inner dimension is long.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from torchao.quantization import quantize_

from runner.arm64_env import prepare
from runner.arm64_execute import execute, execute_on_arm64
from runner.arm64_operators import quantization_multiplier, quantizer_disagreements
from spinquant.torchao_quant import linear_config

TIED_ROWS = range(8, 16)


def linear_program(k: int, n: int, rows: torch.Tensor, path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).eval()
    quantize_(model, linear_config("8da4w", 32))
    with torch.no_grad():
        program = torch.export.export(model, (rows,), strict=False)
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def plant_tie(row: torch.Tensor, channel: int) -> None:
    """Sets row[channel] so that x·m is exactly some k + ½ (m unchanged: the value stays inside the row's range)."""
    m = quantization_multiplier(row.numpy())
    for half in np.arange(10.5, 60.5, dtype=np.float32):
        x = np.float32(half / m)
        if x * m == half:
            row[channel] = float(x)
            return
    raise RuntimeError("no exact tie found")


def test_rows(k: int) -> torch.Tensor:
    rows = torch.randn(16, k, generator=torch.Generator().manual_seed(0))
    rows[:, :4] *= 20
    for r in TIED_ROWS:
        plant_tie(rows[r], 10)
    return rows


def main(argv: list[str]) -> None:
    if len(argv) < 2 or len(argv) % 2:
        sys.exit(__doc__.splitlines()[0])
    env = prepare()
    print("| K | N | rows the two quantizers round apart | equal bit for bit: those rows | the others | largest \\|Δ\\| | largest \\|output\\| |\n"
          "|---|---|---|---|---|---|---|")
    for k, n in zip(map(int, argv[::2]), map(int, argv[1::2])):
        rows = test_rows(k)
        apart = {r for r, channels in enumerate(quantizer_disagreements(rows)) if channels}
        with tempfile.TemporaryDirectory() as tmp:
            pte = Path(tmp) / "linear.pte"
            linear_program(k, n, rows, pte)
            (x86,), (arm64,) = execute(pte, [rows]), execute_on_arm64(env, pte, [rows])
        per_row = (x86 - arm64).abs().amax(-1)
        equal = {r for r in range(16) if per_row[r] == 0}
        print(f"| {k} | {n} | {len(apart)} | {len(equal & apart)} of {len(apart)} | {len(equal - apart)} of {16 - len(apart)} | "
              f"{per_row.max().item():.2e} | {x86.abs().max().item():.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
