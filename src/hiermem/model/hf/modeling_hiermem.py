"""The hiermem anchor as a transformers model: Llama with QK-norm over the full q and k projections.

`hiermem export` copies this file, unchanged, next to an exported anchor whenever no stock architecture matches
it exactly; `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` then loads it. It must stay
self-contained (torch and transformers only), since it is loaded from the export folder without hiermem.

Why not a stock architecture: the anchor is a pre-norm Llama block whose attention RMS-normalises the whole q
projection and the whole k projection (one gain per channel, before the heads are split; docs/method.md §2.1).
Qwen3, Gemma 3 and Cohere normalise per head; OLMo 2/3 and FlexOlmo normalise the full projection but put their
norms after attention and FFN (post-norm); OLMoE is a mixture of experts. Transformers' LlamaConfig also
refuses a hidden_size that is not a multiple of num_attention_heads (the paper's 160M anchor: d 512, 12 heads of
32), though the Llama code, which sizes q_proj by head_dim, computes such a model correctly; HiermemConfig
allows it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


@strict
class HiermemConfig(LlamaConfig):
    """LlamaConfig plus `qk_norm` (RMSNorm over the full q and k projections); any attention width."""

    model_type = "hiermem"
    qk_norm: bool = True

    def validate_architecture(self):
        """Llama's check that hidden_size is a multiple of num_attention_heads is dropped: head_dim is explicit
        and q_proj/o_proj are sized num_attention_heads * head_dim, so the code needs no such relation."""


class HiermemAttention(LlamaAttention):
    """Llama attention with q_norm / k_norm applied to the full projections before the heads are split."""

    def __init__(self, config: HiermemConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(config.num_attention_heads * self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(config.num_key_value_heads * self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        # transformers before 5.24 names the cache past_key_values: an export is loaded by whatever version
        # its user has, and a cache that went unnoticed into kwargs would decode without the past
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states)).view(hidden_shape).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states)).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attention(self, query_states, key_states, value_states, attention_mask,
                                              dropout=0.0 if not self.training else self.attention_dropout,
                                              scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class HiermemDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: HiermemConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = HiermemAttention(config, layer_idx)


class HiermemModel(LlamaModel):
    config_class = HiermemConfig

    def __init__(self, config: HiermemConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(HiermemDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class HiermemForCausalLM(LlamaForCausalLM):
    config_class = HiermemConfig

    def __init__(self, config: HiermemConfig):
        super().__init__(config)
        self.model = HiermemModel(config)
        self.post_init()


__all__ = ["HiermemConfig", "HiermemForCausalLM", "HiermemModel"]
