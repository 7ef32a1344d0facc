"""The LiteRT form of `CausalLM`: what litert-torch converts into a `.tflite` with `prefill_T` and `decode`
signatures and an external KV cache, in the contract LiteRT-LM 0.18's executor drives (that of litert-torch
0.10's `export_hf` models: `tokens [1, T]`, `input_pos [T]`, `kv_cache_k_i` [1, kv_heads, S, D] and
`kv_cache_v_i` [1, kv_heads, D, S] in and out, `logits [1, 1, vocab]` from decode only). LiteRT-LM reads the
context length from dimension 2 of `kv_cache_k_0`: the older [1, S, kv_heads, D] layout of litert-torch's
`generative` examples makes it read the head count instead ("38 >= 2" tokens refused).

Why not `CausalLM` as it is: its cache is a buffer mutated in place and attention reads a prefix whose length
depends on `input_pos` (a data-dependent shape). A `.tflite` has static shapes and no state, so here the cache
is an input returned updated (one `dynamic_update_slice` per tensor, litert-torch's composite that LiteRT's
runtime and GPU delegate recognise), and attention reads the whole cache under a causal mask built from
`input_pos`. Weights, norms, RoPE and the MLP are the model's own modules: same arithmetic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgepack.model import Attention, CausalLM, apply_rope, through

# What a masked score becomes: the float32 minimum, so that a row's softmax never sees inf - inf.
MASKED = torch.finfo(torch.float32).min


def kv_cache_class() -> Any:
    """litert-torch's pytree-registered cache: inputs and outputs get the names LiteRT-LM looks for
    (`kv_cache_k_0`, `kv_cache_v_0`, ...)."""
    from litert_torch.generative.layers import kv_cache

    return kv_cache


def empty_cache(model: CausalLM, length: int) -> Any:
    """A zero cache per layer, keys [1, kv_heads, length, head_dim], values [1, kv_heads, head_dim, length]
    (the sample input of a signature)."""
    kv = kv_cache_class()
    cfg = model.config
    keys, values = (1, cfg.num_kv_heads, length, cfg.head_dim), (1, cfg.num_kv_heads, cfg.head_dim, length)
    entries = tuple(kv.KVCacheEntry(torch.zeros(keys), torch.zeros(values)) for _ in range(cfg.num_layers))
    return kv.KVCache(entries)


class LiteRtAttention(nn.Module):
    """`Attention` over an external cache: new keys/values written at `input_pos[0]`, then every query attends
    to the whole cache, positions after its own masked out (grouped-query heads as one batched matmul)."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.attn = attn  # its linears, sub-norm and int8 rounding, used as they are
        self.groups = attn.num_heads // attn.num_kv_heads
        self.scale = 1.0 / math.sqrt(attn.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor, entry: Any) -> tuple[torch.Tensor, Any]:
        from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

        a, seq, d = self.attn, x.shape[1], self.attn.head_dim
        x = through(a.int8_inputs, x)
        q = a.q_proj(x).view(1, seq, a.num_heads, d)
        k = a.k_proj(x).view(1, seq, a.num_kv_heads, d)
        v = a.v_proj(x).view(1, seq, a.num_kv_heads, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        zero, start = torch.zeros([], dtype=torch.int32), input_pos[0].reshape([])
        k_all = dynamic_update_slice(entry.k_cache, k.transpose(1, 2), [zero, zero, start, zero])
        v_all = dynamic_update_slice(entry.v_cache, v.permute(0, 2, 3, 1), [zero, zero, zero, start])
        # [1, kv, G*T, D]: query heads h = kv * G + g, so each KV head's G query heads are contiguous
        q = q.transpose(1, 2).reshape(1, a.num_kv_heads, self.groups * seq, d)
        scores = torch.matmul(q, k_all.transpose(2, 3)) * self.scale + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v_all.transpose(2, 3))
        out = out.reshape(1, a.num_heads, seq, d).transpose(1, 2).reshape(1, seq, a.num_heads * d)
        out = through(a.attn_sub_norm, out)
        kv = kv_cache_class()
        return a.o_proj(through(a.int8_inputs, out)), kv.KVCacheEntry(k_all, v_all, entry.kv_layout)


class LiteRtProgram(nn.Module):
    """`forward(tokens [1, T] int32, input_pos [T] int32, kv_cache) -> {"logits"?, "kv_cache"}`: T new tokens at
    positions `input_pos` (consecutive), the cache returned with their keys/values written in. `logits=False`
    (prefill, as LiteRT-LM's prefill signatures are): the output layer does not run."""

    def __init__(self, model: CausalLM, logits: bool) -> None:
        super().__init__()
        self.model, self.logits = model, logits
        self.layers = nn.ModuleList(LiteRtAttention(layer.self_attn) for layer in model.model.layers)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: Any) -> dict[str, Any]:
        kv = kv_cache_class()
        model = self.model
        length = kv_cache.caches[0].k_cache.shape[2]
        groups = self.layers[0].groups
        positions = input_pos.float()
        angles = positions[:, None] * model.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()  # [T, D], as `apply_rope` takes them
        keys = torch.arange(length, dtype=torch.int32)
        mask = torch.where(keys[None, :] <= input_pos[:, None], 0.0, MASKED)  # [T, S]
        mask = mask.repeat(groups, 1)  # rows in the [G*T] order of the grouped queries
        x = model.model.embed_tokens(tokens)
        entries = []
        for layer, attention, entry in zip(model.model.layers, self.layers, kv_cache.caches):
            h, entry = attention(layer.input_layernorm(x), cos, sin, input_pos, mask, entry)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            entries.append(entry)
        out: dict[str, Any] = {"kv_cache": kv.KVCache(tuple(entries))}
        if self.logits:
            out = {"logits": model.lm_head(model.model.norm(x)), **out}
        return out
