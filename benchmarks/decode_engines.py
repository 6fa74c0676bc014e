"""One engine's prefill and decode speed, in a process of its own:

    python benchmarks/decode_engines.py SPEC.json RESULT.json

benchmarks/decode_speed.py starts one such process per engine and thread count, so that each
one's peak RSS and thread settings are its own. Every engine sits behind the interface that
runner.generate's generate() drives (metadata, prefill_logits, forward), so all of them are timed
by the same loop: prefill = prompt in → first token chosen; decode = each later token.
"""

import json
import resource
import statistics
import sys
from pathlib import Path

import torch

from runner.generate import GenerationStats, generate


class FixedLength:
    """A program with its end tokens hidden: every run decodes exactly the tokens asked for."""

    def __init__(self, program):
        self.program = program

    def metadata(self) -> dict:
        return {**self.program.metadata(), "get_eos_ids": []}

    def prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.program.prefill_logits(ids)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.program.forward(ids, positions)


class HfEager:
    """transformers' own forward in fp32 with its dynamic KV cache; logits of the last position
    only, as transformers' generate() asks for them."""

    def __init__(self, model: str):
        from spinquant.models import load_model

        self.model = load_model(model, torch.float32).model.eval()
        self.cache = None

    def metadata(self) -> dict:
        return {"get_max_seq_len": self.model.config.max_position_embeddings}

    def prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self.forward(ids, torch.arange(ids.shape[1]))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=positions, use_cache=True, logits_to_keep=1)
        return out.logits


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF file; its eval() appends tokens to its KV cache and
    keeps the last position's logits."""

    def __init__(self, gguf: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.context = context

    def metadata(self) -> dict:
        return {"get_max_seq_len": self.context}

    def prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        return self.forward(ids, torch.arange(ids.shape[1]))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions[0]) != self.llm.n_tokens:
            raise ValueError(f"llama.cpp holds {self.llm.n_tokens} tokens; asked to write at {int(positions[0])}")
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(self.llm.scores[self.llm.n_tokens - 1]).view(1, 1, -1)


def load_engine(spec: dict) -> tuple[object, dict]:
    """The engine with `spec['threads']` threads, and what it reports about itself."""
    threads = spec["threads"]
    torch.set_num_threads(threads)  # HF's kernels; elsewhere only the sampling argmax
    if spec["engine"] == "pte":
        from executorch.extension.pybindings import portable_lib

        from runner.pte import PteProgram

        # Before the program loads: XNNPACK takes the threadpool when its delegate initialises.
        portable_lib._unsafe_reset_threadpool(threads)
        return PteProgram(Path(spec["path"])), {"threads_in_effect": portable_lib._threadpool_get_thread_count()}
    if spec["engine"] == "hf":
        return HfEager(spec["path"]), {"threads_in_effect": torch.get_num_threads()}
    if spec["engine"] == "llamacpp":
        import llama_cpp

        engine = LlamaCpp(Path(spec["path"]), threads, spec["context"])
        info = llama_cpp.llama_print_system_info().decode().strip()
        return engine, {"threads_in_effect": engine.llm.context_params.n_threads, "llama_cpp_system_info": info}
    raise ValueError(f"unknown engine {spec['engine']}")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(spec: dict) -> dict:
    """Warm-up runs, then `repeats` timed runs: medians and every run's numbers."""
    before_load = rss_mb()
    engine, info = load_engine(spec)
    program = FixedLength(engine)
    runs: list[GenerationStats] = []
    for i in range(spec["warmup"] + spec["repeats"]):
        new, stats = generate(program, spec["prompt_ids"], spec["new_tokens"])
        if i >= spec["warmup"]:
            runs.append(stats)
    return dict(
        **info,
        prefill_tokens_per_s=statistics.median(r.prefill_tokens_per_s for r in runs),
        decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs),
        runs=[vars(r) for r in runs],
        generated_ids=new,
        rss_before_load_mb=round(before_load),
        peak_rss_mb=round(peak_rss_mb()),
    )


if __name__ == "__main__":
    spec_path, result_path = map(Path, sys.argv[1:3])
    result = measure(json.loads(spec_path.read_text()))
    result_path.write_text(json.dumps(result, indent=1))
