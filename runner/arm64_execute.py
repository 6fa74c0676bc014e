"""A program's method run on given inputs in the arm64 environment (under qemu), its outputs returned: for
programs that are not LLMs, such as one operator or one linear, whose bits x86 and arm64 should share.

    outputs = execute_on_arm64(env, pte, inputs)          # host side
    python -m runner.arm64_execute PTE INPUTS OUTPUTS     # guest side: torch.save'd lists of tensors
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from runner.arm64_env import REPO, Arm64Env
from spinquant.errors import UserError, one_line_errors


def execute(pte: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`forward` of the program on this machine, with every kernel a program of ours may need."""
    from runner.pte import load_runtime_kernels

    load_runtime_kernels()
    import kernels

    return list(kernels.load_program(pte).methods["forward"].execute(list(inputs)))


def execute_on_arm64(env: Arm64Env, pte: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        given, got = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save(list(inputs), given)
        result = subprocess.run(env.command(["-m", "runner.arm64_execute", str(pte.resolve()), str(given), str(got)]),
                                cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"the arm64 run of {pte.name} failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        return torch.load(got)


if __name__ == "__main__":
    with one_line_errors("runner.arm64_execute"):
        pte, given, got = (Path(a) for a in sys.argv[1:4])
        torch.save(execute(pte, torch.load(given)), got)
