"""A .pte LLM program in ExecuTorch's Python runtime: forward and its metadata constant methods."""

from pathlib import Path

import torch

from spinquant.errors import UserError

METADATA_METHODS = (
    "get_max_seq_len", "get_max_context_len", "get_bos_id", "get_eos_ids",
    "get_vocab_size", "get_n_layers", "use_kv_cache", "enable_dynamic_shape",
)


def load_runtime_kernels() -> None:
    """Kernels the programs need beyond the runtime's own: ExecuTorch's quantized embedding, its LLM
    ops (KV-cache update, SDPA) and our Hadamard."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::update_cache.out, llama::custom_sdpa.out)
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_byte.out)

    import kernels

    kernels.load_into_executorch_runtime()


class PteProgram:
    def __init__(self, path: Path):
        import kernels

        load_runtime_kernels()
        self.path = Path(path)
        self.loaded = kernels.load_program(self.path)
        self.forward_method = self.loaded.methods["forward"]
        self.longest_call = self._constant("get_max_seq_len")  # prompts are fed in chunks of it
        # forward's output is planned for its longest call: [1, longest_call, vocab] with --full-logits, else [1, 1, vocab].
        self.every_position = self.loaded.program.metadata("forward").output_tensor_meta(0).sizes()[1] == self.longest_call

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.forward_method.execute([input_ids, cache_position])[0]

    def prefill(self, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """The last position's logits (1, 1, vocab) after a whole prompt from position 0, fed in chunks."""
        return self._chunks(ids, chunk or self.longest_call)[-1][:, -1:]

    def prefill_logits(self, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Logits (1, T, vocab) of every position of a sequence from position 0: a program exported with --full-logits."""
        if not self.every_position:
            raise UserError(f"{self.path} returns the last position's logits only; perplexity and comparisons need a "
                            "program exported with --full-logits")
        return torch.cat(self._chunks(ids, chunk or self.longest_call), dim=1)

    def _chunks(self, ids: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        """Each chunk's output, fed as a runner prefills (runner/cpp/greedy.cpp and ExecuTorch's runner feed the same chunks)."""
        return [
            self.forward(part, torch.arange(start, start + part.shape[1]))
            for start, part in zip(range(0, ids.shape[1], chunk), ids.split(chunk, dim=1))
        ]

    def metadata(self) -> dict:
        names = set(self.loaded.methods)
        return {m: self._constant(m) for m in METADATA_METHODS if m in names}

    def _constant(self, name: str):
        values = self.loaded.methods[name].execute([])
        return values if name == "get_eos_ids" else values[0]
