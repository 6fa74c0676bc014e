"""`python scripts/xnnpack_linear_arm64.py K N [K N ...]`: one 8da4w linear (K inputs, N outputs, group 32, bf16
scales: the export's) lowered to XNNPACK, run on 16 rows here and on arm64 under qemu; per row, the largest
|x86 − arm64| of its outputs. Rows drawn like a norm's output with four large channels; seed 0.

On arm64 XNNPACK runs KleidiAI's matmuls (results/arm64.md), on x86 its own: where they sum their per-group
partial products in another order, the outputs differ in their last bits.
"""

import sys
import tempfile
from pathlib import Path

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from torchao.quantization import quantize_

from runner.arm64_env import prepare
from runner.arm64_execute import execute, execute_on_arm64
from spinquant.torchao_quant import linear_config


def linear_program(k: int, n: int, rows: torch.Tensor, path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).eval()
    quantize_(model, linear_config("8da4w", 32))
    with torch.no_grad():
        program = torch.export.export(model, (rows,), strict=False)
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or len(argv) % 2:
        sys.exit(__doc__.splitlines()[0])
    env = prepare()
    print("| K | N | rows equal bit for bit | largest \\|Δ\\| | largest \\|output\\| |\n|---|---|---|---|---|")
    for k, n in zip(map(int, argv[::2]), map(int, argv[1::2])):
        rows = torch.randn(16, k, generator=torch.Generator().manual_seed(0))
        rows[:, :4] *= 20
        with tempfile.TemporaryDirectory() as tmp:
            pte = Path(tmp) / "linear.pte"
            linear_program(k, n, rows, pte)
            (x86,), (arm64,) = execute(pte, [rows]), execute_on_arm64(env, pte, [rows])
        per_row = (x86 - arm64).abs().amax(-1)
        print(f"| {k} | {n} | {int((per_row == 0).sum())} of 16 | {per_row.max().item():.2e} | {x86.abs().max().item():.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
