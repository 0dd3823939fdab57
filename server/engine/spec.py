"""The shape of a Llama-family decoder, as the engine needs it (no file formats in here)."""

from __future__ import annotations

from dataclasses import dataclass

#: Projections that carry LoRA slot buffers, in the order a decoder layer applies them.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """Hyperparameters of a Llama-family decoder (llama, mistral, qwen2, qwen3).

    Every architectural difference the engine supports is a field here, so one model class serves
    all four families.
    """

    model_type: str
    """Hugging Face `model_type` the weights came from (informational)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads; fewer than `num_heads` means grouped-query attention."""
    head_dim: int
    rms_norm_eps: float
    rope_inv_freq: tuple[float, ...]
    """Inverse frequencies of the rotary embedding, scaling already applied; length head_dim // 2."""
    rope_attention_scaling: float
    """Factor applied to cos/sin (1.0 except for yarn-style scaling)."""
    tie_word_embeddings: bool
    qkv_bias: bool
    """q/k/v projections carry a bias (qwen2)."""
    qk_norm: bool
    """RMSNorm over head_dim on queries and keys before rotary (qwen3)."""
    sliding_windows: tuple[int | None, ...]
    """Per layer: attention window in tokens (a key at distance >= window is masked), or None."""
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one linear projection of a decoder layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return shapes[name]
