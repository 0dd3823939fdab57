"""A compact Llama-family decoder over flat token batches (gpt-fast style).

One class serves llama, mistral, qwen2 and qwen3: the differences are fields of `ModelSpec`. Every
projection is `y = base_nf4(x) + lora(x, slot_ids)`; tokens of all sequences in a step are one flat
`[num_tokens, hidden]` tensor, with per-step metadata (`StepMetadata`) built once and shared by all
layers.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.server.engine import attention_cpu, lora_cpu, nf4_cpu, norm_cpu
from loraplex.server.engine.attention import AttentionBatch, paged_attention
from loraplex.server.engine.kernel_choice import BITSANDBYTES, Nf4Plan
from loraplex.server.engine.kv_cache import PagedKVCache
from loraplex.server.engine.lora import (
    LoraBatch,
    LoraGroupOp,
    LoraSlots,
    MultiLoraLinear,
    SlotSet,
    each_projection,
    lora_grouped,
)
from loraplex.server.engine.nf4 import BaseGroup, BaseLinear
from loraplex.server.engine.spec import PROJECTIONS, ModelSpec

#: One adapter's weights as the engine takes them: (layer, projection) -> (A [r, in], B [out, r], scale).
LoraWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]

_QKV, _O, _GATE_UP, _DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)
"""A layer's projections by the x they read (q, k and v the same; gate and up the same)."""



@dataclass(frozen=True)
class StepMetadata:
    """Everything a forward pass needs besides the token ids, built once per step."""

    cos: torch.Tensor
    """[num_tokens, head_dim] rotary cos per token (attention scaling applied)."""
    sin: torch.Tensor
    """[num_tokens, head_dim] rotary sin per token (scaled likewise), its first half negated (`rotate`)."""
    attention: AttentionBatch
    lora: LoraBatch
    logits_index: torch.Tensor
    """[num_outputs] flat positions whose logits are wanted (each sequence's last new token)."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32, as the reference implementation does
    (`norm_cpu.reference_rms_norm`). On float32 input the bits of that formula come from one compiled call on the
    CPU (`norm_cpu`, which checks that they are the same) or from torch's fused F.rms_norm (one op instead of six;
    tests/engine/test_model_ops.py checks both)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if x.device.type == "cpu" and x.is_contiguous() and norm_cpu.serves(x.shape[-1]):
            return norm_cpu.rms_norm(x.view(-1, x.shape[-1]), weight, eps).view(x.shape)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return norm_cpu.reference_rms_norm(x, weight, eps)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it: (hidden + delta, rms_norm(hidden + delta)), hidden and delta
    [num_tokens, hidden_size]; in one compiled call where `norm_cpu` serves them (the same bits)."""
    if (hidden.device.type == "cpu" and hidden.dtype == delta.dtype == weight.dtype == torch.float32
            and hidden.is_contiguous() and delta.is_contiguous() and norm_cpu.serves(hidden.shape[-1])):
        return norm_cpu.add_rms_norm(hidden, delta, weight, eps)
    hidden = hidden + delta
    return hidden, rms_norm(hidden, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split layout): x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1].
    `signed_sin` is sin with its first half negated, so rotate_half's sign is folded in and rotate_half
    becomes one roll ([x2, x1]); -a * b == a * -b exactly, so the result is bit-identical.
    x: [num_tokens, heads, head_dim]; cos/signed_sin: [num_tokens, head_dim]."""
    return x * cos.unsqueeze(1) + x.roll(x.shape[-1] // 2, -1) * signed_sin.unsqueeze(1)


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, projections: dict[str, MultiLoraLinear],
                 norms: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.window = spec.sliding_windows[layer]
        self.proj = torch.nn.ModuleDict(projections)
        self.slot_sets = {names: SlotSet([projections[name].slots for name in names])
                          for names in (_QKV, _O, _GATE_UP, _DOWN)}
        """The projections' slot buffers by the x they read, each set in its order."""
        self.base_groups = {names: BaseGroup([projections[name].base for name in names], slot_set)
                            for names, slot_set in self.slot_sets.items()}
        """The base projections of each set, multiplied in one kernel call where it can (a single projection too: its
        weight described to the kernel once, a call passes x alone), with their adapters' terms where it can."""
        self.norms = norms  # input_layernorm, post_attention_layernorm[, q_norm, k_norm]: [dim]

    def forward(self, hidden: torch.Tensor, delta: torch.Tensor | None, meta: StepMetadata, cache: PagedKVCache,
                lora_op: LoraGroupOp) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer over its input hidden + delta (delta: the previous layer's last residual term, None for the first
        layer), each [num_tokens, hidden_size] -> (its output's hidden, delta) on the same terms: the residual add
        is left to the next layer, whose norm does it in the same call (`add_rms_norm`, the same bits)."""
        # No module is called here: no hooks are used, and torch's __call__ costs ~3 us a call (450 calls a
        # step), a twentieth of a one-token decode step on 2 CPU cores.
        spec, eps = self.spec, self.spec.rms_norm_eps
        if delta is None:
            x = rms_norm(hidden, self.norms["input_layernorm"], eps)
        else:
            hidden, x = add_rms_norm(hidden, delta, self.norms["input_layernorm"], eps)
        q, k, v = self._project(_QKV, x, meta.lora, lora_op)
        q = q.view(-1, spec.num_heads, spec.head_dim)
        k, v = k.view(-1, spec.num_kv_heads, spec.head_dim), v.view(-1, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            q = rms_norm(q, self.norms["q_norm"], eps)
            k = rms_norm(k, self.norms["k_norm"], eps)
        keys, values = cache.keys[self.layer], cache.values[self.layer]  # [rows, kv_heads, head_dim]
        if attention_cpu.rotates_here(q):  # the same bits in one call
            q = attention_cpu.rotate_and_store(q.flatten(1), k.flatten(1), v.flatten(1), meta.cos, meta.sin, keys,
                                               values, meta.attention.write_rows)
        else:
            q, k = rotate(q, meta.cos, meta.sin), rotate(k, meta.cos, meta.sin)
            keys.index_copy_(0, meta.attention.write_rows, k)
            values.index_copy_(0, meta.attention.write_rows, v)
        attended = paged_attention(q, keys, values, meta.attention, self.window)  # [num_tokens, heads, head_dim]
        (out,) = self._project(_O, attended.flatten(1), meta.lora, lora_op)
        hidden, x = add_rms_norm(hidden, out, self.norms["post_attention_layernorm"], eps)
        gate, up = self._project(_GATE_UP, x, meta.lora, lora_op)
        (down,) = self._project(_DOWN, F.silu(gate) * up, meta.lora, lora_op)
        return hidden, down

    def _project(self, names: tuple[str, ...], x: torch.Tensor, lora: LoraBatch, lora_op: LoraGroupOp
                 ) -> list[torch.Tensor]:
        """The named projections of the same x [num_tokens, in], each [num_tokens, out] = base(x) + lora(x): their base
        matmuls in one kernel call where the kernel serves them all (`BaseGroup`), then their adapters in one op. With
        the CPU LoRA kernel as the op, the fused NF4 kernel adds its terms in the same call where it serves x (the
        same bits: `nf4_cpu.Nf4Group.with_lora`); any other op (or a wrapper of it) runs as given."""
        group = self.base_groups[names]
        if not lora.has_adapters:
            return group.forward(x)
        if lora_op is lora_cpu.lora_cpu_group and (ys := group.forward_with_lora(x, lora)) is not None:
            return ys
        return lora_op(group.forward(x), x, self.slot_sets[names], lora)


class DecoderModel(torch.nn.Module):
    """The served model: embeddings, decoder layers with multi-LoRA projections, final norm, lm_head."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[DecoderLayer], final_norm: torch.Tensor,
                 lm_head: torch.Tensor, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.embed = embed  # [vocab, hidden]
        self.layers = torch.nn.ModuleList(layers)
        self.final_norm = final_norm  # [hidden]
        self.lm_head = lm_head  # [vocab, hidden]; the same tensor as embed when tied
        self.inv_freq = inv_freq  # [head_dim // 2] float32
        self.lora_op: LoraGroupOp = functools.partial(each_projection, lora_grouped)
        self.head_on_kernel = (lm_head.device.type == "cpu" and lm_head.dtype == torch.float32
                               and spec.hidden_size % 16 == 0 and nf4_cpu.available())
        """Whether logits of up to DENSE_MAX_TOKENS rows come from the compiled kernel's tiles (on this
        CPU they outrun BLAS on the [vocab, hidden] lm_head by 1.4-2.4x), else from F.linear."""
        self.kernel_head = lm_head
        """The lm_head the kernel reads: stored as bfloat16 when every value is one (a bf16 checkpoint computed in
        float32, as SmolLM2's), so it reads half the bytes for the same bits; else lm_head itself."""
        if self.head_on_kernel and torch.equal(lm_head, lm_head.bfloat16().float()):
            self.kernel_head = lm_head.bfloat16()  # [vocab, hidden]

    @classmethod
    def from_weights(cls, spec: ModelSpec, weights: Iterator[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                     device: torch.device, quantize: bool, num_slots: int, max_rank: int,
                     nf4_plan: Nf4Plan = BITSANDBYTES) -> DecoderModel:
        """Build from (Hugging Face parameter name, tensor) pairs, quantizing projections as they arrive
        (multiplied by the kernels `nf4_plan` names, see kernel_choice).

        Each tensor is moved to `device` and cast to `dtype` first, so NF4 blocks are computed from the
        same values a transformers model loaded in `dtype` would quantize.
        """
        tensors: dict[str, torch.Tensor] = {}
        bases: dict[tuple[int, str], BaseLinear] = {}
        biases: dict[tuple[int, str], torch.Tensor] = {}
        for name, tensor in weights:
            tensor = tensor.to(device=device, dtype=dtype)
            parts = name.split(".")
            if len(parts) == 6 and parts[4] in PROJECTIONS:  # model.layers.{i}.{self_attn|mlp}.{proj}.{weight|bias}
                key = (int(parts[2]), parts[4])
                if parts[5] == "weight":
                    bases[key] = BaseLinear(tensor, dtype, quantize, plan=nf4_plan)  # quantized now: no dense copy
                else:
                    biases[key] = tensor
            else:
                tensors[name] = tensor
        for key, bias in biases.items():
            bases[key].bias = bias
        missing = [f"model.layers.{layer}.{proj}" for layer in range(spec.num_layers) for proj in PROJECTIONS
                   if (layer, proj) not in bases]
        if missing:
            raise ValueError(f"checkpoint lacks projection weights, e.g. {missing[0]}")
        layers = []
        for layer in range(spec.num_layers):
            projections = {}
            for proj in PROJECTIONS:
                in_features, out_features = spec.projection_shape(proj)
                slots = LoraSlots(num_slots, max_rank, in_features, out_features, dtype, device)
                projections[proj] = MultiLoraLinear(bases[(layer, proj)], slots)
            norm_names = ["input_layernorm", "post_attention_layernorm"]
            norm_names += ["self_attn.q_norm", "self_attn.k_norm"] if spec.qk_norm else []
            norms = {n.split(".")[-1]: _take(tensors, f"model.layers.{layer}.{n}.weight") for n in norm_names}
            layers.append(DecoderLayer(spec, layer, projections, norms))
        embed = _take(tensors, "model.embed_tokens.weight")
        lm_head = embed if spec.tie_word_embeddings else _take(tensors, "lm_head.weight")
        inv_freq = torch.tensor(spec.rope_inv_freq, dtype=torch.float32, device=device)
        return cls(spec, embed, layers, _take(tensors, "model.norm.weight"), lm_head, inv_freq)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] -> cos, signed sin (`rotate`): [num_tokens, head_dim] in the compute dtype."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [num_tokens, head_dim // 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]: cos/sin as the reference takes them
        scaling, half = self.spec.rope_attention_scaling, freqs.shape[-1]
        sin = angles.sin() * scaling
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return (angles.cos() * scaling).to(self.embed.dtype), signed_sin.to(self.embed.dtype)

    def forward(self, token_ids: torch.Tensor, meta: StepMetadata, cache: PagedKVCache) -> torch.Tensor:
        """token_ids: [num_tokens] -> logits [num_outputs, vocab] (float32) at `meta.logits_index`."""
        hidden = self.run_layers(F.embedding(token_ids, self.embed), meta, cache, 0, len(self.layers))
        return self.logits(hidden, meta)

    def run_layers(self, hidden: torch.Tensor, meta: StepMetadata, cache: PagedKVCache, start: int,
                   stop: int) -> torch.Tensor:
        """Decoder layers [start, stop) over hidden [num_tokens, hidden_size] (the embedded tokens when start is
        0) -> same shape. A forward pass may go in several calls over consecutive ranges (a pausable step)."""
        delta = None
        for layer in itertools.islice(self.layers, start, stop):  # a ModuleList slice would build a new one
            hidden, delta = layer.forward(hidden, delta, meta, cache, self.lora_op)  # no hooks (DecoderLayer.forward)
        return hidden + delta

    def logits(self, hidden: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """The last layer's hidden [num_tokens, hidden_size] -> logits [num_outputs, vocab] (float32) at
        `meta.logits_index`."""
        hidden = rms_norm(hidden.index_select(0, meta.logits_index), self.final_norm, self.spec.rms_norm_eps)
        if self.head_on_kernel and hidden.shape[0] <= nf4_cpu.DENSE_MAX_TOKENS:
            return nf4_cpu.dense_linear(hidden, self.kernel_head)  # [num_outputs, vocab]
        return F.linear(hidden, self.lm_head).float()  # [num_outputs, vocab]

    def projections(self) -> Iterator[tuple[int, str, MultiLoraLinear]]:
        for layer in self.layers:
            for name, projection in layer.proj.items():
                yield layer.layer, name, projection

    def set_slot(self, slot: int, weights: LoraWeights) -> None:
        """Load one adapter into `slot` of every projection; projections it does not target are cleared.

        Every module is checked before anything is written, so a refused adapter leaves the slot as it was.
        """
        projections = {(layer, name): p for layer, name, p in self.projections()}
        for key, (lora_a, lora_b, _) in weights.items():
            if key not in projections:
                raise ValueError(f"adapter targets layer {key[0]} {key[1]}, which the model does not have")
            projections[key].slots.check_fits(lora_a, lora_b)
        for layer, name, projection in self.projections():
            if (layer, name) in weights:
                lora_a, lora_b, scale = weights[(layer, name)]
                projection.slots.set_slot(slot, lora_a, lora_b, scale)
            else:
                projection.slots.reset_slot(slot)

    def reset_slot(self, slot: int) -> None:
        for _, _, projection in self.projections():
            projection.slots.reset_slot(slot)

    def base_linear_bytes(self) -> int:
        """Resident bytes of the base projections' weights (NF4 data and quantization state)."""
        return sum(p.base.resident_bytes() for _, _, p in self.projections())

    def lora_slot_bytes(self) -> int:
        return sum(p.slots.resident_bytes() for _, _, p in self.projections())


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"checkpoint lacks tensor {name}")
    return tensors.pop(name)
