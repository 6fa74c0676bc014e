"""The model families we rotate, and where their decoder layers keep the linears the rotations touch.

All have Llama's pre-norm structure (RMSNorm, attention and a gated MLP, RoPE), so the rotations fuse into
them as into Llama. Mistral adds a sliding window; Qwen2/2.5 biases on q/k/v (R1 leaves an input-side bias
alone, R2 turns v's); Qwen3 per-head q_norm/k_norm before RoPE (in the head dimension, which R1 and R2 leave
alone: R2 turns values only, R3 comes after RoPE); Phi-3/Phi-4-mini store q/k/v as one `qkv_proj` (rows:
queries, keys, values) and gate/up as one `gate_up_proj`, and rotate part of each head (RoPE, not R3).
"""

from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# Within a decoder layer: the linears reading each norm's output (R1's readers, the norm gains' new home),
# and those writing the residual stream (R1's writers). A family has either the split or the fused names.
ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj")
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj")
R1_READERS = ATTENTION_INPUTS + MLP_INPUTS
R1_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def layer_linears(layer: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The layer's modules of these names, by name, skipping the spellings its family does not use."""
    found = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        module = getattr(layer.get_submodule(parent), child, None)
        if module is not None:
            found[name] = module
    return found


def value_rows(name: str, rows: int, query_rows: int) -> slice:
    """Which of v_proj's or qkv_proj's `rows` hold values: all of v_proj's; qkv_proj's last, after the
    query rows (as many as o_proj has inputs) and as many key rows as there are value rows."""
    if name == "self_attn.v_proj":
        return slice(0, rows)
    return slice(query_rows + (rows - query_rows) // 2, rows)
