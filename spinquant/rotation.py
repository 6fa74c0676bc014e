"""Fuse SpinQuant rotations into a Hugging Face Llama model, exactly (float64 arithmetic).

R1 rotates the residual stream (hidden × hidden), R2 each layer's value/output heads
(head_dim × head_dim), R4 is a Hadamard on down_proj's input (folded into its weight plus an
online transform), R3 a Hadamard on queries and keys after RoPE (online only).
Convention: a rotated activation is x @ R, so a linear reading it gets W @ R and one writing
it gets Rᵀ @ W.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from spinquant import hadamard, hadamard_op  # noqa: F401  (hadamard_op registers torch.ops.spinquant.hadamard_transform)
from spinquant.attention import use_spinquant_attention
from spinquant.errors import UserError
from spinquant.families import ATTENTION_INPUTS, MLP_INPUTS, R1_READERS, R1_WRITERS, layer_linears, value_rows
from spinquant.smoothing import PARTS, LayerSmoothing, fuse_smoothing
from spinquant.torch_files import describe_type, load_torch_file

PRESETS = ("none", "r4", "hadamard", "orthogonal")
# The best rotation measured for each built-in model (results/learned_rotation_smollm2.md); r4 elsewhere.
LEARNED_ROTATIONS = {"smollm2-135m": Path(__file__).resolve().parent / "rotations" / "smollm2_w4a8.pt"}


@dataclass
class Rotations:
    r1: torch.Tensor | None = None  # hidden × hidden
    r2: list[torch.Tensor] | None = None  # one head_dim × head_dim per layer
    r4: bool = False
    r3: bool = False
    smoothing: list[LayerSmoothing] | None = None  # one per layer (spinquant/smoothing.py), fused after R1/R2, before R4

    @property
    def folds_norms(self) -> bool:
        return self.r1 is not None  # RMSNorm commutes with R1 only once its gain is 1


class OnlineHadamardLinear(nn.Module):
    """A linear whose input is Hadamard-transformed at run time; its weight already holds W @ H."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.ops.spinquant.hadamard_transform(x))


def default_rotation(model: str) -> str:
    learned = LEARNED_ROTATIONS.get(model)
    return str(learned) if learned is not None and learned.is_file() else "r4"


def rotations_for(spec: str, config: LlamaConfig, seed: int = 0, r3: bool = False) -> Rotations:
    """A preset name (see PRESETS) or a file of learned rotations in SpinQuant's layout."""
    if spec == "none":
        return Rotations()
    if spec == "r4":
        return Rotations(r4=True)  # torchao's default: R4 alone
    gen = torch.Generator().manual_seed(seed)
    head = head_dim(config)
    if r3 and not hadamard.is_supported_size(head):
        raise UserError(f"R3 turns each query and key head by a Hadamard matrix, and this model's head dimension {head} has none "
                        f"(sizes K·2^m, K in {hadamard.SUPPORTED_K}): quantize K/V without R3 (--no-r3)")
    if spec == "hadamard":
        draw = hadamard.random_hadamard_matrix
    elif spec == "orthogonal":
        draw = hadamard.random_orthogonal_matrix
    elif Path(spec).suffix in (".bin", ".pt", ".pth") or Path(spec).exists():
        return load_rotation_file(Path(spec), config, r3=r3)
    else:
        raise UserError(f"unknown rotation '{spec}': use one of {', '.join(PRESETS)} or a rotation file")
    r1 = draw(config.hidden_size, gen)
    r2 = [draw(head, gen) for _ in range(config.num_hidden_layers)]
    return Rotations(r1=r1, r2=r2, r4=True, r3=r3)


def load_rotation_file(path: Path, config: LlamaConfig, r3: bool = False) -> Rotations:
    """Learned R1/R2 as a state dict with `R1` and `model.layers.{i}.self_attn.R2` (SpinQuant's layout)."""
    state = load_torch_file(path, "rotation file", ROTATION_REMEDY)
    if not isinstance(state, dict):
        raise UserError(f"rotation file {path} holds {describe_type(state)}, not a dict of R1 and R2s (SpinQuant's layout): {ROTATION_REMEDY}")
    hidden, head = config.hidden_size, head_dim(config)
    r1 = _checked_rotation(state, "R1", hidden, path)
    r2 = [
        _checked_rotation(state, f"model.layers.{i}.self_attn.R2", head, path)
        for i in range(config.num_hidden_layers)
    ]
    return Rotations(r1=r1, r2=r2, r4=True, r3=r3, smoothing=load_smoothing(state, config.num_hidden_layers, path))


def smoothing_key(layer: int, part: str) -> str:
    return f"model.layers.{layer}.smoothing.{part}"


def load_smoothing(state: dict, layers: int, path: Path) -> list[LayerSmoothing] | None:
    """A rotation file's smoothing scales (spinquant.duquant writes them), when it has them."""
    if smoothing_key(0, PARTS[0]) not in state:
        return None
    missing = [smoothing_key(i, part) for i in range(layers) for part in PARTS if smoothing_key(i, part) not in state]
    if missing:
        raise UserError(f"rotation file {path}: smoothing scales without '{missing[0]}': {ROTATION_REMEDY}")
    return [LayerSmoothing(**{part: state[smoothing_key(i, part)].to(torch.float64) for part in PARTS}) for i in range(layers)]


ROTATION_REMEDY = "learn one for this model with python -m spinquant.optimize"


def _checked_rotation(state: dict, key: str, n: int, path: Path) -> torch.Tensor:
    def refuse(problem: str) -> UserError:
        return UserError(f"rotation file {path}: {problem}: {ROTATION_REMEDY}")

    if key not in state:
        hint = "not SpinQuant's layout" if key == "R1" else "learned for a model with fewer layers?"
        raise refuse(f"no '{key}' ({hint})")
    r = state[key]
    if not isinstance(r, torch.Tensor):
        raise refuse(f"'{key}' is {describe_type(r)}, not a tensor")
    if not r.is_floating_point():
        raise refuse(f"'{key}' is a {r.dtype} tensor, not a float matrix")
    if r.shape != (n, n):
        raise refuse(f"'{key}' is {tuple(r.shape)}, the model needs ({n}, {n}) (was it learned for another model?)")
    r = r.to(torch.float64)
    if not r.isfinite().all():
        raise refuse(f"'{key}' has NaN or infinite entries")
    deviation = (r.T @ r - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if deviation > 1e-3:
        raise refuse(f"'{key}' is not orthonormal (|RᵀR - I| up to {deviation:.3g})")
    return r


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _set_weight(linear: nn.Linear | nn.Embedding, w64: torch.Tensor) -> None:
    linear.weight.data = w64.to(linear.weight.dtype).contiguous()


ROW_BLOCK = 4096


def _update_rows(linear: nn.Linear | nn.Embedding, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """W ← f(W) computed in float64 ROW_BLOCK rows at a time (f acting on each row alone), written back in place:
    each row comes out as from the whole matrix (bit for bit with MKL here), and no float64 copy of a
    128,256-row embedding or lm_head (3 GB, twice, for Llama 3.2 3B) ever exists."""
    for block in linear.weight.data.split(ROW_BLOCK):
        block.copy_(f(block.to(torch.float64)))


NARROW_FLOATS = (torch.bfloat16, torch.float16)


def widen(module: nn.Module) -> nn.Module:
    """A bf16 or fp16 module's parameters and buffers in float32 (exact), so that a model loaded in its
    checkpoint's bf16 is rotated and quantized from the same float32 weights as one loaded in float32."""
    for t in (*module.parameters(), *module.buffers()):
        if t.dtype in NARROW_FLOATS:
            t.data = t.data.float()
    return module


def untie_embeddings(model: LlamaForCausalLM) -> None:
    """Give lm_head its own weight: R1 and norm folding change it differently from the embedding."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False


def fuse_rmsnorm_into_linears(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """y = Linear(g ⊙ n(x)) = (W·diag(g)) n(x): move the gain into every reader, then set it to 1."""
    gain = norm.weight.detach().to(torch.float64)
    for linear in linears:
        _update_rows(linear, lambda w64: w64 * gain)
    norm.weight.data.fill_(1.0)


def fuse_layer_rmsnorms(layer: nn.Module) -> None:
    fuse_rmsnorm_into_linears(layer.input_layernorm, list(layer_linears(layer, ATTENTION_INPUTS).values()))
    fuse_rmsnorm_into_linears(layer.post_attention_layernorm, list(layer_linears(layer, MLP_INPUTS).values()))


def fuse_all_rmsnorms(model: LlamaForCausalLM) -> None:
    for layer in model.model.layers:
        fuse_layer_rmsnorms(layer)
    fuse_rmsnorm_into_linears(model.model.norm, [model.lm_head])


def quantized_input_linear(module: nn.Module) -> nn.Linear:
    """The linear whose input gets quantized: inside an OnlineHadamardLinear, after the transform."""
    return module.linear if isinstance(module, OnlineHadamardLinear) else module


def rotate_input_side(linear: nn.Linear | nn.Embedding, r: torch.Tensor) -> None:
    _update_rows(linear, lambda w64: w64 @ r)


def rotated_layer_weights(
    weights: dict[str, torch.Tensor], r1: torch.Tensor | None, r2: torch.Tensor | None, head_dim: int
) -> dict[str, torch.Tensor]:
    """A decoder layer's linear weights (out, in), by name within the layer (families.layer_linears' names), rotated:
    W·R1 for R1's readers, R1ᵀ·W for its writers; R2 turns every value head (all query heads sharing a KV head agree) and o_proj
    undoes it. Differentiable in r1 and r2: the exact fusion and rotation learning both use it."""
    rotated = dict(weights)
    if r2 is not None:
        name = "self_attn.v_proj" if "self_attn.v_proj" in rotated else "self_attn.qkv_proj"
        w = rotated[name]
        rows = value_rows(name, w.shape[0], rotated["self_attn.o_proj"].shape[1])
        values = (r2.T @ w[rows].unflatten(0, (-1, head_dim))).flatten(0, 1)  # (kv_heads, hd, in) turned per head
        rotated[name] = torch.cat([w[: rows.start], values]) if rows.start else values
        wo = rotated["self_attn.o_proj"].unflatten(1, (-1, head_dim))  # (out, heads, hd)
        rotated["self_attn.o_proj"] = (wo @ r2).flatten(1, 2)
    if r1 is not None:
        for name in rotated:
            rotated[name] = rotated[name] @ r1 if name in R1_READERS else r1.T @ rotated[name]
    return rotated


def rotated_layer_biases(
    biases: dict[str, torch.Tensor], r1: torch.Tensor | None, r2: torch.Tensor | None, head_dim: int
) -> dict[str, torch.Tensor]:
    """A decoder layer's linear biases, by name within the layer, turned with their outputs: v_proj's by R2
    per head, the writers' by R1; input-side rotations leave a bias alone. Differentiable, as rotated_layer_weights."""
    rotated = dict(biases)
    if r2 is not None and "self_attn.v_proj" in rotated:
        rotated["self_attn.v_proj"] = (rotated["self_attn.v_proj"].unflatten(0, (-1, head_dim)) @ r2).flatten()
    for name in R1_WRITERS if r1 is not None else ():
        if name in rotated:
            rotated[name] = rotated[name] @ r1
    return rotated


def fuse_r1_r2(layer: nn.Module, r1: torch.Tensor | None, r2: torch.Tensor | None, head_dim: int) -> None:
    """R1 into a decoder layer's linears, then its R2 into v/o, each in float64.

    The weights are stored between the two, as they always were: fusing both in one float64 product differs
    in the last float32 bit, enough to move 4-bit roundings and so the committed results' perplexities."""
    for r1_step, r2_step in ((r1, None), (None, r2)):
        if r1_step is None and r2_step is None:
            continue
        linears = layer_linears(layer, R1_READERS + R1_WRITERS)
        weights = {name: linear.weight.detach().to(torch.float64) for name, linear in linears.items()}
        for name, w in rotated_layer_weights(weights, r1_step, r2_step, head_dim).items():
            _set_weight(linears[name], w)
        biases = {name: linear.bias.detach().to(torch.float64) for name, linear in linears.items() if linear.bias is not None}
        for name, b in rotated_layer_biases(biases, r1_step, r2_step, head_dim).items():
            linears[name].bias.data = b.to(linears[name].bias.dtype)


def fuse_r4(mlp: nn.Module) -> None:
    """Fold H into down_proj's input side and transform its input online: x·H·(W·H)ᵀ = x·Wᵀ."""
    down = mlp.down_proj
    # W @ H row by row with the fast transform: the dense product took 5 minutes at Llama 3.2 1B's 8192.
    _set_weight(down, hadamard.hadamard_transform(down.weight.detach().to(torch.float64)))
    mlp.down_proj = OnlineHadamardLinear(down)


def apply_rotations(model: LlamaForCausalLM, rot: Rotations) -> LlamaForCausalLM:
    """Fuse `rot` into `model` in place; the full-precision function is unchanged."""
    for _ in rotated_parts(model, rot):
        pass
    return model


def rotated_parts(model: LlamaForCausalLM, rot: Rotations) -> Iterator[str]:
    """Fuse `rot` into `model` one part at a time (each decoder layer, the embedding, then the final norm with
    lm_head), widened to float32 first (widen), and yield each part's name once it is done.

    Every weight goes through the same float64 steps as in a whole-model fusion (norm gain, R1, R2, R4, each
    stored in between); only the schedule is by part, so that prepare() can quantize each part as it comes
    and a bf16-loaded model never holds a float32 copy of itself whole. The vocabulary-sized parts come
    last, so that until their turn the lm_head untied from the embedding is a bf16 copy.
    """
    config = model.config
    if rot.r4:
        hadamard.factor_size(config.intermediate_size)  # an unsupported size fails before any change
    if rot.r3:
        hadamard.factor_size(head_dim(config))
    for i, layer in enumerate(model.model.layers):
        rotate_layer(widen(layer), rot, i, head_dim(config))
        yield f"model.layers.{i}"
    if rot.folds_norms:
        untie_embeddings(model)
    embedding = widen(model.model.embed_tokens)
    if rot.r1 is not None:
        rotate_input_side(embedding, rot.r1)  # rows are token vectors: E @ R1
    yield "model.embed_tokens"
    for module in (model.model.norm, model.lm_head, model.model.rotary_emb):
        widen(module)
    if rot.folds_norms:
        fuse_rmsnorm_into_linears(model.model.norm, [model.lm_head])
    if rot.r1 is not None:
        rotate_input_side(model.lm_head, rot.r1)
    if rot.r3:
        use_spinquant_attention(model)
    yield "lm_head"


def rotate_layer(layer: nn.Module, rot: Rotations, index: int, head_dim: int) -> None:
    if rot.folds_norms:
        fuse_layer_rmsnorms(layer)
    fuse_r1_r2(layer, rot.r1, rot.r2[index] if rot.r2 is not None else None, head_dim)
    if rot.smoothing is not None:
        fuse_smoothing(layer, rot.smoothing[index], head_dim)
    if rot.r4:
        fuse_r4(layer.mlp)
    layer.self_attn.online_r3 = rot.r3
