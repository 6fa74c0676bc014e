"""One engine's prefill and decode speed, in a process of its own:

    python benchmarks/decode_engines.py SPEC.json RESULT.json

benchmarks/decode_speed.py, benchmarks/vs_optimum.py and benchmarks/memory.py start one such process
per engine and thread count, so that each one's peak RSS and thread settings are its own. Every
engine but one sits behind the interface that runner.generate's generate() drives (metadata,
prefill, forward), so all of them are timed by the same loop: prefill = prompt in → first token
chosen; decode = each later token. The exception, `text_llm_runner`, is ExecuTorch's own C++
TextLLMRunner on a .pte, timed by its own clock over the same two spans.

Memory: the engine's libraries are imported before the model loads, so that "RSS before loading"
is the process with the runtime in it and what the load adds is the model's; the peak is taken
twice, while loading and while generating (Linux's high-water mark is reset in between).
"""

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from runner.generate import GenerationStats, generate


class FixedLength:
    """A program with its end tokens hidden: every run decodes exactly the tokens asked for."""

    def __init__(self, program):
        self.program = program

    def metadata(self) -> dict:
        return {**self.program.metadata(), "get_eos_ids": []}

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.program.prefill(ids)

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
        return {"get_max_context_len": self.model.config.max_position_embeddings}

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self.forward(ids, torch.arange(ids.shape[1]))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=positions, use_cache=True, logits_to_keep=1)
        return out.logits


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF file: eval() appends tokens to its KV cache and has
    llama.cpp compute the last position's logits, which are read from its context (eval() keeps
    them in Python only with logits_all, which computes every position's)."""

    def __init__(self, gguf: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.context = context

    def metadata(self) -> dict:
        return {"get_max_context_len": self.context}

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        return self.forward(ids, torch.arange(ids.shape[1]))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions[0]) != self.llm.n_tokens:
            raise ValueError(f"llama.cpp holds {self.llm.n_tokens} tokens; asked to write at {int(positions[0])}")
        import llama_cpp
        import numpy as np

        self.llm.eval(ids[0].tolist())
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return torch.tensor(logits).view(1, 1, -1)  # a copy: llama.cpp reuses its buffer


def import_engine(engine: str) -> None:
    """The engine's libraries, and for our programs the kernels they need: the runtime, not the model."""
    if engine in ("pte", "text_llm_runner"):
        from runner.pte import load_runtime_kernels

        load_runtime_kernels()
        if engine == "text_llm_runner":
            from executorch.extension.llm.runner import _llm_runner  # noqa: F401
    elif engine == "hf":
        import transformers  # noqa: F401
    elif engine == "llamacpp":
        import llama_cpp  # noqa: F401


def load_engine(spec: dict) -> tuple[object, dict]:
    """The engine with `spec['threads']` threads, and what it reports about itself."""
    threads = spec["threads"]
    # torch runs HF's model; for the others it only picks the next token, and a pool of its own
    # would be threads beside the engine's.
    torch.set_num_threads(threads if spec["engine"] == "hf" else 1)
    if spec["engine"] == "pte":
        from executorch.extension.pybindings import portable_lib

        from runner.pte import PteProgram

        # Before the program loads: XNNPACK takes the threadpool when its delegate initialises.
        portable_lib._unsafe_reset_threadpool(threads)
        program = PteProgram(Path(spec["path"]))
        return program, {"threads_in_effect": portable_lib._threadpool_get_thread_count()}
    if spec["engine"] == "hf":
        return HfEager(spec["path"]), {"threads_in_effect": torch.get_num_threads()}
    if spec["engine"] == "llamacpp":
        import llama_cpp

        engine = LlamaCpp(Path(spec["path"]), threads, spec["context"])
        return engine, {"threads_in_effect": engine.llm.context_params.n_threads, "llama_cpp": llama_cpp_build()}
    raise ValueError(f"unknown engine {spec['engine']}")


def llama_cpp_build() -> str:
    """llama.cpp's version and commit as llama-cpp-python built it, and the CPU features it uses."""
    import llama_cpp

    # llama_version() is only the release; the commit is in the CMake package it installs.
    config = Path(llama_cpp.__file__).parents[1] / "lib" / "cmake" / "llama" / "llama-config.cmake"
    lines = config.read_text().splitlines() if config.is_file() else []
    commit = next((line.split()[1].rstrip(")") for line in lines if "LLAMA_BUILD_COMMIT" in line), "?")
    features = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
    return f"llama.cpp {llama_cpp.llama_version().decode()} commit {commit}; {features}"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def reset_peak_rss() -> None:
    """Linux's high-water mark of this process's RSS (VmHWM, and ru_maxrss with it) back to its RSS now."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_now(model_file: Path) -> dict:
    """RSS now and its peak since the last reset; how much of the RSS is anonymous memory (heap: the memory
    plan, XNNPACK's packed weights, llama.cpp's buffers) and pages of the model's file mapped in; and how much
    is locked in memory (ExecuTorch's Python runtime mlock()s what it maps of a program)."""
    mb = {"rss": 0, "anon": 0, "model_file": 0}
    mapped = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's first line: address range, ..., and its file, if any
            mapped = " ".join(fields[5:]) or None
        elif fields[0] in ("Rss:", "Anonymous:"):
            mb["rss" if fields[0] == "Rss:" else "anon"] += int(fields[1]) / 1024
            if fields[0] == "Rss:" and mapped == str(model_file):
                mb["model_file"] += int(fields[1]) / 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    mb["peak"], mb["locked"] = (int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmLck"))  # locked: mlock()ed pages
    return {f"{key}_mb": round(value, 1) for key, value in mb.items()}


def thread_cpu_ticks() -> dict[int, int]:
    """CPU time (user + system, clock ticks) of each thread of this process."""
    ticks = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return ticks


def thread_use(before: dict[int, int], after: dict[int, int], wall_s: float) -> dict:
    """CPU seconds of each thread that ran in between (busiest first) and all of them per wall
    second: 1 vs 2 threads shows here even on a busy machine. A pool that spins while it waits
    counts as busy."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    used = sorted((t - before.get(tid, 0) for tid, t in after.items()), reverse=True)
    return dict(thread_cpu_s=[u / ticks_per_s for u in used if u > 0], cores_busy=sum(used) / ticks_per_s / wall_s)


def text_llm_runner(spec: dict) -> tuple[object, dict]:
    """ExecuTorch's TextLLMRunner (what its Android and iOS demo apps run) on `spec['path']`."""
    from executorch.extension.llm.runner import _llm_runner
    from executorch.extension.pybindings import portable_lib

    from runner.pte import load_runtime_kernels

    portable_lib._unsafe_reset_threadpool(spec["threads"])  # the runner's XNNPACK shares the bindings' threadpool
    load_runtime_kernels()
    runner = _llm_runner.TextLLMRunner(spec["path"], spec["tokenizer"])
    return runner, {"threads_in_effect": portable_lib._threadpool_get_thread_count()}


def runner_generate(runner, spec: dict) -> tuple[str, GenerationStats]:
    """One greedy generation from position 0, timed by the runner's own millisecond clock as its report
    counts: prefill = prompt text in → first token chosen, decode = the later tokens over the rest."""
    from executorch.extension.llm.runner._llm_runner import GenerationConfig

    stats, pieces = {}, []

    def keep(s) -> None:  # the Stats object is the runner's own: read it before generate() returns
        stats.update(prompt=s.num_prompt_tokens, later=s.num_generated_tokens, start=s.inference_start_ms,
                     prefilled=s.prompt_eval_end_ms, end=s.inference_end_ms)

    runner.reset()  # otherwise the next generate() continues this one's KV cache
    config = GenerationConfig(echo=False, max_new_tokens=spec["new_tokens"], temperature=0.0)
    runner.generate(spec["prompt_text"], config, token_callback=pieces.append, stats_callback=keep)
    # The runner stops at an end token and takes no ids: a run that did not read the prompt as these
    # ids or stopped early is not the run asked for.
    if stats["prompt"] != len(spec["prompt_ids"]) or stats["later"] != spec["new_tokens"] - 1:
        raise ValueError(f"TextLLMRunner read {stats['prompt']} prompt tokens and generated {stats['later'] + 1}; "
                         f"asked for {len(spec['prompt_ids'])} and {spec['new_tokens']}")
    prefill_s, decode_s = (stats["prefilled"] - stats["start"]) / 1000, (stats["end"] - stats["prefilled"]) / 1000
    return "".join(pieces), GenerationStats(prompt_tokens=stats["prompt"], new_tokens=stats["later"] + 1, time_to_first_token_s=prefill_s,
                                            prefill_tokens_per_s=stats["prompt"] / prefill_s, decode_tokens_per_s=stats["later"] / decode_s)


def generation(spec: dict) -> tuple[Callable[[], tuple[list[int] | str, GenerationStats]], dict]:
    """One timed generation of the engine (what it generated, its stats), and what the engine reports."""
    if spec["engine"] == "text_llm_runner":
        runner, info = text_llm_runner(spec)
        return lambda: runner_generate(runner, spec), info
    engine, info = load_engine(spec)
    program = FixedLength(engine)
    return lambda: generate(program, spec["prompt_ids"], spec["new_tokens"]), info


def measure(spec: dict) -> dict:
    """Warm-up runs, then `repeats` timed runs: medians and every run's numbers; memory before and after
    loading and after generating (with the peak of each phase)."""
    at_start = rss_mb()
    import_engine(spec["engine"])
    model_file = Path(spec["path"]).resolve()
    before_load = memory_now(model_file)
    reset_peak_rss()
    run_once, info = generation(spec)
    after_load = memory_now(model_file)
    reset_peak_rss()
    for _ in range(spec["warmup"]):
        run_once()
    runs: list[GenerationStats] = []
    before, start = thread_cpu_ticks(), time.perf_counter()
    for _ in range(spec["repeats"]):
        new, stats = run_once()
        runs.append(stats)
    use = thread_use(before, thread_cpu_ticks(), time.perf_counter() - start)
    after_generating = memory_now(model_file)
    return dict(
        **info,
        prefill_tokens_per_s=statistics.median(r.prefill_tokens_per_s for r in runs),
        decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs),
        **use,
        runs=[vars(r) for r in runs],
        generated=new,  # token ids (our loop) or text (TextLLMRunner)
        rss_at_start_mb=round(at_start),
        rss_before_load_mb=round(before_load["rss_mb"]),
        peak_rss_mb=round(max(after_load["peak_mb"], after_generating["peak_mb"])),
        memory=dict(before_load=before_load, after_load=after_load, after_generating=after_generating),
    )


if __name__ == "__main__":
    spec_path, result_path = map(Path, sys.argv[1:3])
    result = measure(json.loads(spec_path.read_text()))
    result_path.write_text(json.dumps(result, indent=1))
