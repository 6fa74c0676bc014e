"""A .pte LLM program in ExecuTorch's Python runtime: forward and its metadata constant methods."""

from pathlib import Path

import torch

METADATA_METHODS = (
    "get_max_seq_len", "get_max_context_len", "get_bos_id", "get_eos_ids",
    "get_vocab_size", "get_n_layers", "use_kv_cache", "enable_dynamic_shape",
)


def load_runtime_kernels() -> None:
    """Kernels the programs need beyond the runtime's own: ExecuTorch's quantized embedding."""
    import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed::embedding_byte.out)


class PteProgram:
    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        load_runtime_kernels()
        self.path = Path(path)
        self.program = Runtime.get().load_program(str(self.path))
        self.forward_method = self.program.load_method("forward")

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.forward_method.execute([input_ids, cache_position])[0]

    def metadata(self) -> dict:
        names = set(self.program.method_names)
        return {m: self._constant(m) for m in METADATA_METHODS if m in names}

    def _constant(self, name: str):
        values = self.program.load_method(name).execute([])
        return values if name == "get_eos_ids" else values[0]
