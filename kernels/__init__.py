"""The `spinquant::hadamard_transform` operator's C++ ExecuTorch kernel (cpu/, built and loaded by
build.py). Its PyTorch side (eager, fake, autograd, out variant) is spinquant/hadamard_op.py, which
the rotation code uses without a compiler and the kernel's tables and tests are checked against.

Importing this package registers torch.ops.spinquant.hadamard_transform.
"""

from spinquant.quiet import silence_known_noise

silence_known_noise()  # first: before any module here imports torchao or executorch

from spinquant import hadamard_op  # noqa: F401  (registers the operator: its Python side)
from kernels.build import build_library, load_into_executorch_runtime, load_program

__all__ = ["build_library", "load_into_executorch_runtime", "load_program"]
