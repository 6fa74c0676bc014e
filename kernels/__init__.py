"""Our operators' C++ ExecuTorch kernels (cpu/, built and loaded by build.py): `spinquant::hadamard_transform`,
whose PyTorch side (eager, fake, autograd, out variant) is spinquant/hadamard_op.py, which the rotation code uses
without a compiler, and the KV cache's `spinquant::quantize_kv_rows` and `spinquant::attend_kv_cache`, whose PyTorch
side is kv_cache_ops.py, `spinquant::rms_norm` (rms_norm_op.py), `spinquant::silu_mul` (silu_mul_op.py), `spinquant::rope` (rope_op.py) and `spinquant::e8p_linear` (e8p_linear_op.py).

Importing this package registers them in torch.ops.spinquant.
"""

from spinquant.quiet import silence_known_noise

silence_known_noise()  # first: before any module here imports torchao or executorch

from spinquant import hadamard_op  # noqa: F401  (registers the operator: its Python side)
from kernels import e8p_linear_op, kv_cache_ops, rms_norm_op, rope_op, silu_mul_op  # noqa: F401
from kernels.build import build_library, load_into_executorch_runtime, load_program

__all__ = ["build_library", "load_into_executorch_runtime", "load_program"]
