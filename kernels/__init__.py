"""The `spinquant::hadamard_transform` operator: its PyTorch side (op.py: eager, fake, autograd,
out variant for ExecuTorch) and its C++ ExecuTorch kernel (cpu/, built and loaded by build.py).

Importing this package registers torch.ops.spinquant.hadamard_transform.
"""

from kernels import op  # noqa: F401  (registers the operator)
from kernels.build import build_library, load_into_executorch_runtime, load_program

__all__ = ["build_library", "load_into_executorch_runtime", "load_program"]
