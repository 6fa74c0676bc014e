"""A Llama whose R1 and R2 are its only trainable parameters: the loss SpinQuant learns rotations on.

The frozen weights are prepared once (norm gains folded, embeddings untied, R4's Hadamard folded
into down_proj, all in float64 by rotation.py) and kept once, in the learning dtype. Each decoder
layer multiplies its own weights by the current R1/R2 when it runs (weights × hidden² work, small
against tokens × weights for the model itself) and forgets them when it returns, so under activation
checkpointing no layer's rotated weights outlive its forward or its replay in backward. Weights,
activations and K/V are fake-quantized with a straight-through estimator, so the loss is
differentiable in R1 and R2. The loss makes its logits a chunk of tokens at a time. Same convention
as rotation.py: a rotated activation is x @ R.
"""

import math
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

from spinquant import data_parallel, hadamard
from spinquant.quant import QuantConfig, activation_quantizer, check_groups, fake_quantize, lm_head_config, quantize_weight, use_kv_quantization
from spinquant.families import ATTENTION_INPUTS, R1_READERS, R1_WRITERS, layer_linears
from spinquant.rotation import (Rotations, fuse_all_rmsnorms, head_dim, rotate_input_side, rotated_layer_biases,
                                rotated_layer_weights, untie_embeddings)


# Tokens whose logits exist at once in the loss: 2048 × a 128,256-token vocabulary is 1 GiB in float32.
LOSS_CHUNK_TOKENS = 2048


class FakeQuantLinear(nn.Module):
    """A frozen linear whose rotated, fake-quantized weight RotatedLlama sets while its layer runs.

    The weight is an attribute rather than a parameter: it is made from R1/R2 inside the layer's call, so
    activation checkpointing, which replays the call during backward, makes it again instead of keeping it.
    """

    def __init__(self, frozen: torch.Tensor, quantize_input, online_hadamard: bool = False, frozen_bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("frozen", frozen.detach())
        self.register_buffer("frozen_bias", None if frozen_bias is None else frozen_bias.detach())
        self.quantize_input = quantize_input
        self.online_hadamard = online_hadamard
        self.rotated_weight: torch.Tensor | None = None
        self.rotated_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_hadamard:
            x = hadamard.hadamard_transform(x)  # R4: the fixed Hadamard whose transpose is folded in `frozen`
        if self.quantize_input is not None:
            x = self.quantize_input(x)
        return F.linear(x, self.rotated_weight, self.rotated_bias)


class RotatedLlama(nn.Module):
    """`forward(ids)` gives the logits of `model` rotated by (R1, R2) and fake-quantized by `qc`."""

    def __init__(self, model: LlamaForCausalLM, init: Rotations, qc: QuantConfig, dtype: torch.dtype):
        super().__init__()
        check_groups(model, qc)
        hadamard.factor_size(model.config.intermediate_size)  # R4 needs it: refuse before any work
        self.qc, self.dtype, self.head_dim = qc, dtype, head_dim(model.config)
        exact = _exact_dtype(dtype)
        self.r1 = nn.Parameter(init.r1.to(exact))
        self.r2 = nn.ParameterList(nn.Parameter(r.to(exact)) for r in init.r2)
        self.model = _prepared(model, qc, dtype)
        self.checkpoint_layers = False
        for i, layer in enumerate(self.model.model.layers):
            layer.forward = partial(self._layer_forward, i, layer.forward)
        self.model.model.embed_tokens.register_forward_hook(self._rotate_embedding)
        if not qc.lm_head:
            self.model.lm_head.register_forward_pre_hook(self._unrotate_lm_head_input)

    def enable_activation_checkpointing(self) -> None:
        """Replay each decoder layer, its weights' rotation included, in backward instead of keeping its
        activations and rotated weights: less memory, ~1.3× time. (transformers' own checkpointing replays
        a layer's forward without its hooks and wrappers, so it would keep every layer's rotated weights.)"""
        self.checkpoint_layers = True

    def matmul_precision(self):
        """Where the loss and its gradients are made: in bf16 learning on a GPU, float32 products (the W·R ones) on TF32
        tensor cores, ~8× faster. Their inputs keep 10 mantissa bits: the bf16 frozen weights whole, R to 2⁻¹¹, far
        below the 4-bit grid the products are rounded to next. Not for the Cayley step, which keeps R orthonormal."""
        return _tf32_matmuls() if self.dtype == torch.bfloat16 else nullcontext()

    def rotation_parameters(self) -> list[nn.Parameter]:
        return [self.r1, *self.r2]

    def spinquant_state(self) -> dict[str, torch.Tensor]:
        """R1 and R2 in SpinQuant's layout (what rotation.load_rotation_file reads)."""
        state = {"R1": self.r1.detach().cpu().clone()}
        for i, r2 in enumerate(self.r2):
            state[f"model.layers.{i}.self_attn.R2"] = r2.detach().cpu().clone()
        return state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._rotate_lm_head()
        return self.model(ids, use_cache=False).logits

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch, as eval.perplexity averages it; the logits are made
        LOSS_CHUNK_TOKENS at a time and again in backward, never all (tokens × vocabulary) at once."""
        self._rotate_lm_head()
        hidden = self.model.model(ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        chunks = zip(hidden.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS))
        total = sum(checkpoint(_summed_cross_entropy, self.model.lm_head, h, t, use_reentrant=False) for h, t in chunks)
        return total / targets.numel()

    def _layer_forward(self, i: int, forward, *args, **kwargs):
        """Decoder layer i's forward (its class's, `forward`), with its weights rotated for the call, replayed in backward
        when checkpointing."""
        if self.checkpoint_layers and torch.is_grad_enabled():
            return checkpoint(self._rotated_call, i, forward, *args, use_reentrant=False, **kwargs)
        return self._rotated_call(i, forward, *args, **kwargs)

    def _rotated_call(self, i: int, forward, *args, **kwargs):
        layer = self.model.model.layers[i]
        self._rotate_layer(i, layer)
        try:
            return forward(*args, **kwargs)
        finally:  # also when checkpointing's replay stops early, as it does once it has what backward needs
            _forget_rotated_weights(layer)

    def _rotate_layer(self, i: int, layer: nn.Module) -> None:
        """Decoder layer i's linears' weights rotated by R1 and its R2, fake-quantized; under torchrun each process
        makes its part of each weight (_shard_dim) and the parts are gathered."""
        exact = _exact_dtype(self.dtype)
        linears = layer_linears(layer, R1_READERS + R1_WRITERS)
        dims = {name: self._shard_dim(name, linear.frozen) for name, linear in linears.items()}
        frozen = {name: data_parallel.shard(linear.frozen, dims[name]).to(exact) for name, linear in linears.items()}
        for name, w in rotated_layer_weights(frozen, self.r1, self.r2[i], self.head_dim).items():
            linear = linears[name]
            linear.rotated_weight = data_parallel.gather_shards(quantize_weight(w, self.qc, ste=True).to(self.dtype), dims[name])
        self._set_rotated_biases(layer, self.r2[i])

    def _shard_dim(self, name: str, w: torch.Tensor) -> int | None:
        """Along which dimension each process rotates an equal part of weight `w`, or None (all of it): R1's readers
        by output rows (W·R1 row by row; v_proj's R2 by whole heads), its writers by input columns (R1ᵀ·W column by
        column; o_proj's R2 by whole heads; the 4-bit groups whole). Phi-3's fused qkv_proj finds its values by
        o_proj's width, so it is made whole."""
        n = data_parallel.world_size()
        if n == 1 or name == "self_attn.qkv_proj":
            return None
        if name in R1_READERS:
            return 0 if w.shape[0] % (n * (self.head_dim if name in ATTENTION_INPUTS else 1)) == 0 else None
        if self.qc.w_bits < 16 and not self.qc.w_group:
            return None  # one scale per row: a row's columns cannot be quantized apart
        align = math.lcm(self.qc.w_group or 1, self.head_dim if name == "self_attn.o_proj" else 1)
        return 1 if w.shape[1] % (n * align) == 0 else None

    def _rotate_lm_head(self) -> None:
        if self.qc.lm_head:
            head = self.model.lm_head
            self._set(head, head.frozen.to(_exact_dtype(self.dtype)) @ self.r1, lm_head_config(self.qc))

    def _set_rotated_biases(self, layer: nn.Module, r2: torch.Tensor) -> None:
        linears = layer_linears(layer, R1_READERS + R1_WRITERS)
        biases = {name: linear.frozen_bias for name, linear in linears.items() if linear.frozen_bias is not None}
        for name, b in rotated_layer_biases(biases, self.r1, r2, self.head_dim).items():
            linears[name].rotated_bias = b.to(self.dtype)

    def _set(self, linear: FakeQuantLinear, w: torch.Tensor, qc: QuantConfig | None = None) -> None:
        linear.rotated_weight = quantize_weight(w, qc or self.qc, ste=True).to(self.dtype)

    def _rotate_embedding(self, module, args, output: torch.Tensor) -> torch.Tensor:
        # E[ids] @ R1 costs tokens × hidden², E @ R1 vocab × hidden²: rotate the looked-up rows. The program stores E·R1 one
        # scale per row (embedding_bits), and a looked-up row is a whole row: quantizing it here is quantizing the table.
        rotated = output @ self.r1.to(output.dtype)
        wide = rotated if rotated.dtype in (torch.float32, torch.float64) else rotated.float()
        return fake_quantize(wide, self.qc.embedding_bits, 0, symmetric=True, ste=True).to(rotated.dtype)

    def _unrotate_lm_head_input(self, module, args: tuple) -> tuple:
        # An unquantized lm_head sees x·R1·(W·R1)ᵀ = x·R1·R1ᵀ·Wᵀ: undo R1 on the input instead of rotating W.
        return (args[0] @ self.r1.T.to(args[0].dtype), *args[1:])


@contextmanager
def _tf32_matmuls():
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _forget_rotated_weights(layer: nn.Module) -> None:
    for linear in layer.modules():
        if isinstance(linear, FakeQuantLinear):
            linear.rotated_weight = linear.rotated_bias = None


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")  # bf16 → fp32


def _exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """Rotations and W·R products are float32 (float64 in float64 runs): they are small, or one layer's."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepared(model: LlamaForCausalLM, qc: QuantConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """Fold what never changes (norm gains, R4), freeze everything, swap linears for FakeQuantLinear."""
    untie_embeddings(model)
    fuse_all_rmsnorms(model)
    for layer in model.model.layers:
        down = layer.mlp.down_proj
        rotate_input_side(down, hadamard.hadamard_matrix(down.in_features).to(down.weight.device))
    model.requires_grad_(False)
    model.to(dtype)  # the frozen weights, once: an 8B model's are 15 GiB in bf16
    exact = _exact_dtype(dtype)
    frozen = {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    biases = {name: m.bias.detach().to(exact) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    quantize_input = activation_quantizer(qc.a_bits, 0, qc.a_sym, qc.a_clip, ste=True)
    for i, layer in enumerate(model.model.layers):
        for parent, kind in ((layer.self_attn, "self_attn"), (layer.mlp, "mlp")):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    full = f"model.layers.{i}.{kind}.{name}"
                    setattr(parent, name, FakeQuantLinear(frozen[full], quantize_input, name == "down_proj", biases.get(full)))
    if qc.lm_head:
        model.lm_head = FakeQuantLinear(frozen["lm_head"], quantize_input)
    _use_kv_quantization(model, qc)
    return model


def _use_kv_quantization(model: LlamaForCausalLM, qc: QuantConfig) -> None:
    """K/V fake quantization after RoPE, with the online R3 Hadamard on q/k unless qc.r3 is off, as the evaluation does."""
    if not qc.quantizes_kv:
        return
    if qc.online_r3:
        hadamard.factor_size(head_dim(model.config))
    for layer in model.model.layers:
        layer.self_attn.online_r3 = qc.online_r3
    use_kv_quantization(model, qc, ste=True)
