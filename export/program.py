"""torch.export with a static KV cache, then XNNPACK lowering to an ExecuTorch program.

The forward signature is ExecuTorch's LLM-runner convention, forward(input_ids[1, T],
cache_position[T]) -> logits, as transformers' exportable static-cache wrapper provides it.
"""

import torch
from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, ExecutorchProgramManager, to_edge_transform_and_lower
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def with_static_cache(model: LlamaForCausalLM, max_seq_len: int) -> TorchExportableModuleWithStaticCache:
    """A fresh wrapper owns a fresh, zeroed cache: one per export and one per eager reference run."""
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_seq_len)


def end_token_ids(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends generation: the configs' eos ids plus the chat/end tokens the vocabulary has."""
    ids = []
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        ids += source if isinstance(source, list) else [source]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_TOKENS if t in vocab]
    return sorted({i for i in ids if i is not None})


def metadata(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> dict:
    """Constant methods ExecuTorch's C++ LLM runner (and the Android/iOS demo apps) read."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return dict(
        get_max_seq_len=max_seq_len,
        get_max_context_len=max_seq_len,
        get_bos_id=int(bos if bos is not None else -1),
        get_eos_ids=end_token_ids(model, tokenizer),
        get_vocab_size=model.config.vocab_size,
        get_n_layers=model.config.num_hidden_layers,
        use_kv_cache=True,
        enable_dynamic_shape=True,
    )


def export_program(model: LlamaForCausalLM, max_seq_len: int) -> torch.export.ExportedProgram:
    wrapper = with_static_cache(model, max_seq_len)
    ids, pos = torch.zeros(1, 2, dtype=torch.long), torch.arange(2)
    seq = torch.export.Dim("seq_len", min=1, max=max_seq_len - 1)
    with torch.no_grad():
        # strict=True: the non-strict trace of the cache wrapper fails in AOT export on torch 2.13.
        return torch.export.export(
            wrapper, args=(), kwargs=dict(input_ids=ids, cache_position=pos),
            dynamic_shapes=dict(input_ids={1: seq}, cache_position={0: seq}), strict=True,
        )


def lower_to_executorch(program: torch.export.ExportedProgram, constant_methods: dict) -> ExecutorchProgramManager:
    edge = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constant_methods,
    )
    # Linears XNNPACK did not take run as linear rather than transpose + mm; the quant fusion turns
    # torchao's dequantize + embedding into ExecuTorch's quantized embedding kernel.
    edge = edge.transform([ConvertToLinearPass()])
    return edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
