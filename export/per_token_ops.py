"""Spell torchao's dynamic per-token activation quantization with ExecuTorch's per-token ops.

torchao's choose_qparams/quantize/dequantize_affine are CompositeImplicitAutograd: each of
ExecuTorch's whole-graph re-traces runs their Python bodies, a dozen symbolic-shape ops apiece,
and that is a third of the lowering time. `quantized_decomposed`'s per-token ops (shipped with
torch, lowered by XNNPACK's partitioner the same way) have Meta kernels: one shape rule each.
Inside the delegate XNNPACK chooses the activation scales itself, so the program computes the
same thing either way.
"""

import operator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch._guards import detect_fake_mode

TORCHAO = torch.ops.torchao
PER_TOKEN = torch.ops.quantized_decomposed


def respell_per_token_quant(program: torch.export.ExportedProgram) -> int:
    """Rewrite every int8 asymmetric per-token choose → quantize → dequantize chain in place; returns how many."""
    graph = program.graph_module.graph
    chains = [c for c in (_per_token_chain(n) for n in graph.nodes) if c is not None]
    for choose, quantizes in chains:
        _respell(graph, choose, quantizes)
    graph.eliminate_dead_code()
    program.graph_module.recompile()
    return len(chains)


def _per_token_chain(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """The choose_qparams node and its quantize nodes, when the chain is exactly the per-token int8 pattern."""
    if node.target != TORCHAO.choose_qparams_affine.default:
        return None
    x, mapping, block, dtype, qmin, qmax, *rest = node.args
    shape = x.meta["val"].shape
    per_token = list(block[:-1]) == [1] * (len(shape) - 1) and block[-1] == shape[-1]
    if not (mapping == "ASYMMETRIC" and per_token and dtype == torch.int8 and (qmin, qmax) == (-128, 127) and not node.kwargs):
        return None
    if any(a is not None for a in rest[:2]):  # eps, scale dtype: torchao's defaults only
        return None
    getitems = list(node.users)
    if sorted(g.args[1] for g in getitems if g.target == operator.getitem) != [0, 1]:
        return None
    users = {u for g in getitems for u in g.users}
    quantizes = [u for u in users if u.target == TORCHAO.quantize_affine.default]
    if not all(_is_per_token_quantize(q, x, block) for q in quantizes):
        return None
    if users != {*quantizes, *(d for q in quantizes for d in q.users)}:  # the scales feed nothing else
        return None
    return node, sorted(quantizes, key=lambda q: q.name)


def _is_per_token_quantize(q: torch.fx.Node, x: torch.fx.Node, block: list) -> bool:
    if q.target != TORCHAO.quantize_affine.default or q.args[0] is not x or list(q.args[1]) != list(block) or q.kwargs:
        return False
    return all(
        d.target == TORCHAO.dequantize_affine.default and d.args[0] is q and d.args[2:4] == q.args[2:4] and not d.kwargs
        and d.args[4:] == (torch.int8, -128, 127)
        for d in q.users
    )


def _respell(graph: torch.fx.Graph, choose: torch.fx.Node, quantizes: list[torch.fx.Node]) -> None:
    x = choose.args[0]
    fake_mode = detect_fake_mode([x.meta["val"]])
    with graph.inserting_before(choose), fake_mode:
        qparams = _node(graph, choose, PER_TOKEN.choose_qparams_per_token_asymmetric.default, (x, torch.int8))
        scale, zero = (_node(graph, g, operator.getitem, (qparams, i)) for i, g in enumerate(_getitems(choose)))
        for q in quantizes:
            new_q = _node(graph, q, PER_TOKEN.quantize_per_token.default, (x, scale, zero, -128, 127, torch.int8))
            for d in list(q.users):
                d.replace_all_uses_with(
                    _node(graph, d, PER_TOKEN.dequantize_per_token.default, (new_q, scale, zero, -128, 127, torch.int8, torch.float32))
                )


def _getitems(choose: torch.fx.Node) -> list[torch.fx.Node]:
    return sorted(choose.users, key=lambda g: g.args[1])


def _node(graph: torch.fx.Graph, like: torch.fx.Node, target, args: tuple) -> torch.fx.Node:
    """A new node carrying `like`'s metadata (stack trace, module stack) and its own fake value."""
    node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k != "val"})
    values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    node.meta["val"] = target(*values) if target is not operator.getitem else values[0][values[1]]
    return node
