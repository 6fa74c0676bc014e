"""torch.export with a static KV cache, then XNNPACK lowering of the linears to an ExecuTorch program.

The forward signature is ExecuTorch's LLM-runner convention, forward(input_ids[1, T],
cache_position[T]) -> logits (see export/exportable_llama.py).
"""

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import executorch.exir.backend.utils as backend_utils
import executorch.exir.lowered_backend_module as lowered_backend_module
import torch
from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, EdgeProgramManager, ExecutorchBackendConfig, ExecutorchProgramManager, schema, to_edge
from executorch.exir.backend.compile_spec_schema import CompileSpec
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
from executorch.exir.tensor import get_scalar_type
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from export.exportable_llama import ExportableLlama

END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def with_static_cache(model: LlamaForCausalLM, max_seq_len: int) -> TorchExportableModuleWithStaticCache:
    """transformers' own static-cache forward: the eager reference the exported program is checked against."""
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


def longest_call(max_seq_len: int, prefill_chunk: int) -> int:
    """The most tokens one forward call takes: a prefill chunk, and never more than the cache holds beside a next token."""
    return min(prefill_chunk, max_seq_len - 1)


def metadata(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, prefill_chunk: int) -> dict:
    """Constant methods ExecuTorch's C++ LLM runner (and the Android/iOS demo apps) read: as in ExecuTorch's own
    Llama export, get_max_seq_len is the most tokens one call takes (its runner prefills longer prompts in chunks
    of it) and get_max_context_len the KV cache's length."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return dict(
        get_max_seq_len=longest_call(max_seq_len, prefill_chunk),
        get_max_context_len=max_seq_len,
        get_bos_id=int(bos if bos is not None else -1),
        get_eos_ids=end_token_ids(model, tokenizer),
        get_vocab_size=model.config.vocab_size,
        get_n_layers=model.config.num_hidden_layers,
        use_kv_cache=True,
        enable_dynamic_shape=True,
    )


def export_program(model: LlamaForCausalLM, max_seq_len: int, prefill_chunk: int, full_logits: bool = False,
                   kv_cache: str = "fp32") -> torch.export.ExportedProgram:
    """Activations are planned for the longest call, a prefill chunk: not for a whole context's prompt at once."""
    ids, pos = torch.zeros(1, 2, dtype=torch.long), torch.arange(2)
    seq = torch.export.Dim("seq_len", min=1, max=longest_call(max_seq_len, prefill_chunk))
    with torch.no_grad():
        return torch.export.export(
            ExportableLlama(model, max_seq_len, full_logits, kv_cache), (ids, pos), dynamic_shapes=({1: seq}, {0: seq}), strict=False
        )


def linear_partitioner() -> XnnpackPartitioner:
    """XNNPACK takes the linears (dynamically quantized or float), as in ExecuTorch's own Llama export.

    The `dqlinear_partitioner` spec makes XNNPACK's preprocessing run its one linear pass per
    partition instead of all seventeen, each of which re-traces the partition.
    """
    partitioner = XnnpackPartitioner(
        configs=[LinearConfig], config_precisions=[ConfigPrecisionType.DYNAMIC_QUANT, ConfigPrecisionType.FP32]
    )
    partitioner.delegation_spec.compile_specs.append(CompileSpec("dqlinear_partitioner", b""))
    return partitioner


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_topologically_sorted(graph: torch.fx.Graph) -> bool:
    seen: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if any(n not in seen for n in node.all_input_nodes):
            return False
        seen.add(node)
    return True


@contextmanager
def legalize_only_out_of_order_graphs() -> Iterator[None]:
    """ExecuTorch re-sorts and recompiles the whole graph after cutting out each partition: partitions
    × nodes, a third of the lowering time here. Cutting out a linear (one output, inserted after its
    last node) leaves the graph in order, so the sort is skipped where it would change nothing."""
    legalize = lowered_backend_module.legalize_graph

    def legalize_if_needed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return gm if is_topologically_sorted(gm.graph) else legalize(gm)

    lowered_backend_module.legalize_graph = legalize_if_needed
    try:
        yield
    finally:
        lowered_backend_module.legalize_graph = legalize


def delegate_linears(program: torch.export.ExportedProgram, constant_methods: dict) -> EdgeProgramManager:
    # to_edge + to_backend decomposes the graph once; to_edge_transform_and_lower does it three
    # times, and every pass re-traces every node with symbolic shapes (40% of the lowering time).
    # Keeping aten.linear whole is all the partitioner needs from the decomposition. Dim-order ops
    # are skipped: a float32 program of contiguous tensors has nothing for them to say, and their
    # pass is one more re-trace of the whole graph.
    config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True, preserve_ops=[torch.ops.aten.linear.default])
    edge = to_edge(program, constant_methods=constant_methods, compile_config=config)
    with quiet_logger("executorch.backends.xnnpack.partition.xnnpack_partitioner"), legalize_only_out_of_order_graphs():
        lowered = edge.to_backend(linear_partitioner())  # the logger: its to_backend deprecation notice
    # An unbounded lru_cache in ExecuTorch keeps the graphs' nodes it compared, and through them every program
    # lowered here with all its weights, alive to the end of the process (Llama 3.2 3B's shapes: GBs at the check).
    backend_utils.is_same_node.cache_clear()
    lowered.compile_config = config  # to_backend forgets it, and to_executorch would re-legalize dim orders
    return lowered


def emit_program(edge: EdgeProgramManager) -> ExecutorchProgramManager:
    # The quant fusion turns torchao's dequantize + embedding into ExecuTorch's quantized embedding kernel.
    return edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )


def planned_memory_bytes(manager: ExecutorchProgramManager) -> dict[str, int]:
    """Per method, the bytes of its memory plan: every activation, the KV cache and the outputs, allocated
    when a runtime loads the method (ExecuTorch's Python MethodMeta does not expose them; the program does)."""
    sizes = {plan.name: sum(plan.non_const_buffer_sizes) for plan in manager.executorch_program.execution_plan}
    return {name: size for name, size in sizes.items() if size}  # the metadata methods plan nothing


def memory_plan_parts(manager: ExecutorchProgramManager, method: str = "forward") -> dict[str, int]:
    """A method's memory plan by what holds it: the KV cache (the graph's mutable buffers, whatever their dtype:
    the cache and any scales), the outputs (the logits, planned for the longest call) and the activations, the
    rest of the arena. The cache lives through the whole program and the outputs to a call's end, so the bytes
    the plan gives them are theirs when the call ends; the activations share the rest among themselves (and
    the outputs' bytes before those are written), so they are counted as what is left."""
    program = manager.exported_program(method)
    mutable = set(program.graph_signature.buffers_to_mutate.values())
    buffer_of = program.graph_signature.inputs_to_buffers
    kv_cache = sum(n.meta["spec"].allocated_memory for n in program.graph.nodes if n.op == "placeholder" and buffer_of.get(n.target) in mutable)
    plan = next(p for p in manager.executorch_program.execution_plan if p.name == method)
    logits = sum(tensor_bytes(plan.values[i].val) for i in plan.outputs)
    return dict(kv_cache=kv_cache, logits=logits, activations=planned_memory_bytes(manager)[method] - kv_cache - logits)


def tensor_bytes(tensor: schema.Tensor) -> int:
    return math.prod(tensor.sizes) * get_scalar_type(tensor.scalar_type).itemsize
