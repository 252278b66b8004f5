"""The Llama forward pass of the in-flight batching engine, over a slotted KV cache.

* Weights come straight from the HF folder's safetensors, in the engine's dtype (fp32 on
  the CPU, fp16 on CUDA) and on its device. The forward pass is written here, not
  ``transformers``': q/k/v and gate/up projections are fused into one matmul each, and the
  whole running batch is decoded in one pass per step.
* The KV cache is owned by the engine (``kv_slots.KVSlots``): one tensor per K and V,
  ``[layers, slots, kv_heads, capacity, head_dim]``. ``prefill`` fills one slot, a whole
  prompt at once or chunk by chunk (a chunk attends to the slot's cached prefix); ``decode``
  runs one token for slots ``0..n-1`` and reads the cache through plain views
  ``[:, :n, :, :L]`` without gathering; ``step`` does both in one pass (a mixed batch: the
  dense parts run once over the decode rows and the chunk's rows together, so every weight
  is read once per engine step; attention stays separate, each part as in its own pass).
* Each slot has its own position; RoPE is looked up per position and attention masks every
  slot to its own valid length, so sequences of any lengths share a decode step. GQA is done
  without repeating K/V: the query heads that share a KV head become extra query rows of it.
* RMSNorm and the logits are computed in fp32 (as transformers' LlamaRMSNorm does), so the
  sampler always sees fp32 logits. Every tensor is created on the engine's device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def eos_ids(model_dir: str | os.PathLike) -> set[int]:
    """End-of-sequence ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids = {eos} if isinstance(eos, int) else {int(e) for e in eos or []}
            if ids:
                return ids
    return set()


class LlamaWeights:
    """The weights of a Llama checkpoint, laid out for the fused forward below."""

    def __init__(self, model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype):
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.config = cfg
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise NotImplementedError("biases in attention/MLP are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.get('hidden_act')}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"rope type {rope}")
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

        self.n_layers = cfg["num_hidden_layers"]
        self.hidden = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads", self.n_heads)
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = float(cfg["rms_norm_eps"])
        self.vocab = cfg["vocab_size"]
        self.max_positions = int(cfg.get("max_position_embeddings", 2048))

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {model_dir}")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))  # on the CPU; each tensor moves once below

        def get(name: str) -> torch.Tensor:
            return sd[name].to(device=device, dtype=dtype)

        def fused(*names: str) -> torch.Tensor:
            return torch.cat([sd[n] for n in names]).to(device=device, dtype=dtype).contiguous()

        self.embed = get("model.embed_tokens.weight")
        self.lm_head = get("lm_head.weight") if "lm_head.weight" in sd else self.embed
        self.final_norm = get("model.norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                ln1=get(p + "input_layernorm.weight"),
                ln2=get(p + "post_attention_layernorm.weight"),
                qkv=fused(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                o=get(p + "self_attn.o_proj.weight"),
                gate_up=fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=get(p + "mlp.down_proj.weight"),
            ))


class Llama:
    def __init__(self, model_dir: str | os.PathLike, *, context_length: int | None,
                 device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.w = w = LlamaWeights(model_dir, device, dtype)
        self.context_length = int(context_length or w.max_positions)
        inv_freq = 1.0 / (w.rope_theta ** (
            torch.arange(0, w.head_dim, 2, dtype=torch.int64, device=device).float() / w.head_dim))
        freqs = torch.outer(torch.arange(self.context_length, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)  # [context, head_dim]
        self.scale = w.head_dim ** -0.5

    def new_cache(self, slots: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.w
        shape = (w.n_layers, slots, w.n_kv, capacity, w.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: the statistics in fp32, then back to the weights' dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.w.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        h = self._rms(x, layer["ln2"])
        gate, up = F.linear(h, layer["gate_up"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer["down"])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x, self.w.final_norm), self.w.lm_head).float()

    # ---- the two attentions, shared by prefill, decode and the mixed step -------------------
    def _chunk_setup(self, T: int, start: int):
        """RoPE tables and (``start > 0``) the mask of a prompt chunk at positions
        ``start..start+T-1`` of one slot."""
        w = self.w
        S = start + T  # keys this chunk attends to: the cached prefix and the chunk itself
        cos, sin = self.cos[start:S][None], self.sin[start:S][None]  # broadcast over heads
        mask = None
        if start:
            # Query i (position start + i) sees keys 0..start + i. SDPA's is_causal aligns
            # a non-square mask top-left, so the mask is explicit (additive, as in decode),
            # laid out for the GQA rows below: row r * T + i is query i of repeat r.
            keys = torch.arange(S, device=self.device)[None, :]
            queries = torch.arange(start, S, device=self.device)[:, None]
            mask = torch.zeros(T, S, dtype=self.dtype, device=self.device)
            mask.masked_fill_(keys > queries, float("-inf"))
            mask = mask.repeat(w.n_heads // w.n_kv, 1)  # [rep * T, S]
        return cos, sin, mask

    def _chunk_attention(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, start: int,
                         setup) -> torch.Tensor:
        """Attention of a chunk's rows q/k/v [T, H*D | KV*D] (fills the slot's cache at
        ``start..start+T-1``); returns [T, H*D]."""
        w = self.w
        T, H, KV, D = q.shape[0], w.n_heads, w.n_kv, w.head_dim
        S = start + T
        rep = H // KV  # query head h uses KV head h // rep, as transformers' repeat_kv
        cos, sin, mask = setup
        q = self._rope(q.view(T, H, D).transpose(0, 1), cos, sin)  # [H, T, D]
        k = self._rope(k.view(T, KV, D).transpose(0, 1), cos, sin)  # [KV, T, D]
        v = v.view(T, KV, D).transpose(0, 1)
        k_cache[li, slot, :, start:S] = k
        v_cache[li, slot, :, start:S] = v
        if not start:  # the one-shot path, exactly as before chunking existed
            attn = F.scaled_dot_product_attention(
                q[None], k.repeat_interleave(rep, 0)[None], v.repeat_interleave(rep, 0)[None],
                is_causal=True, scale=self.scale)[0]  # [H, T, D]
        else:
            # GQA without repeating the cached prefix: the `rep` query heads of a KV head
            # become extra query rows of it (heads h = kv * rep + r, as repeat_interleave).
            # 4-D inputs: with 3-D ones CPU SDPA takes its math path, ~3.5x slower here.
            attn = F.scaled_dot_product_attention(
                q.reshape(1, KV, rep * T, D), k_cache[li, slot, None, :, :S], v_cache[li, slot, None, :, :S],
                attn_mask=mask, scale=self.scale).view(H, T, D)
        return attn.transpose(0, 1).reshape(T, H * D)

    def _decode_setup(self, positions: torch.Tensor, capacity: int, max_position: int | None = None):
        """Cache rows, mask and RoPE tables of one decode token for each of slots 0..n-1.
        ``max_position``: ``positions.max()`` known on the host (no device sync on CUDA)."""
        w = self.w
        n, KV = positions.shape[0], w.n_kv
        L = (int(positions.max()) if max_position is None else max_position) + 1  # longest valid cache length after this step
        # Flat row of (slot, kv head, position) in a layer's cache viewed as [-1, head_dim]:
        # index_copy_ there is far cheaper than advanced-index assignment.
        slots = torch.arange(n, device=self.device)[:, None]
        heads = torch.arange(KV, device=self.device)[None, :]
        cache_rows = ((slots * KV + heads) * capacity + positions[:, None]).reshape(-1)
        # Additive mask: slot i attends to cache positions <= its own position (its history
        # + this token). A float mask is a little faster than a bool one in CPU SDPA.
        valid = torch.arange(L, device=self.device)[None, :] <= positions[:, None]
        mask = torch.zeros(n, 1, 1, L, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~valid[:, None, None, :], float("-inf"))
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [n, 1, D]
        return cache_rows, mask, L, cos, sin

    def _decode_attention(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, setup) -> torch.Tensor:
        """Attention of the decode rows q/k/v [n, H*D | KV*D], row i = slot i (writes each
        row's K/V at its position); returns [n, H*D]."""
        w = self.w
        n, H, KV, D = q.shape[0], w.n_heads, w.n_kv, w.head_dim
        rep = H // KV
        cache_rows, mask, L, cos, sin = setup
        q = self._rope(q.view(n, H, D), cos, sin)
        k = self._rope(k.view(n, KV, D), cos, sin)
        kc, vc = k_cache[li], v_cache[li]
        kc.view(-1, D).index_copy_(0, cache_rows, k.reshape(n * KV, D))
        vc.view(-1, D).index_copy_(0, cache_rows, v.reshape(n * KV, D))
        # GQA without repeating K/V: the `rep` query heads of a KV head are its rows.
        attn = F.scaled_dot_product_attention(
            q.view(n, KV, rep, D), kc[:n, :, :L], vc[:n, :, :L],
            attn_mask=mask, scale=self.scale)  # [n, KV, rep, D]
        return attn.reshape(n, H * D)

    def _qkv(self, x: torch.Tensor, layer: dict):
        w = self.w
        h = self._rms(x, layer["ln1"])
        return F.linear(h, layer["qkv"]).split([w.n_heads * w.head_dim, w.n_kv * w.head_dim,
                                                 w.n_kv * w.head_dim], dim=-1)

    # ---- the forward passes -----------------------------------------------------------------
    def prefill(self, tokens: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot: int, start: int = 0) -> torch.Tensor:
        """Runs prompt tokens at positions ``start..start+T-1`` of one cache slot and fills the
        slot there; fp32 logits of the last position [vocab]. ``start = 0``: a whole prompt (or
        its first chunk); ``start > 0``: a later chunk, positions ``< start`` already cached."""
        w = self.w
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        x = w.embed[ids]  # [T, hidden]
        setup = self._chunk_setup(len(tokens), start)
        for li, layer in enumerate(w.layers):
            q, k, v = self._qkv(x, layer)
            attn = self._chunk_attention(li, q, k, v, k_cache, v_cache, slot, start, setup)
            x = x + F.linear(attn, layer["o"])
            x = self._mlp(x, layer)
        return self._logits(x[-1:])[0]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """One token for each of slots 0..n-1 (row i = slot i); fp32 logits [n, vocab]."""
        w = self.w
        setup = self._decode_setup(positions, k_cache.shape[3], max_position)
        x = w.embed[tokens]  # [n, hidden]
        for li, layer in enumerate(w.layers):
            q, k, v = self._qkv(x, layer)
            attn = self._decode_attention(li, q, k, v, k_cache, v_cache, setup)
            x = x + F.linear(attn, layer["o"])
            x = self._mlp(x, layer)
        return self._logits(x)

    def step(self, decode_tokens: torch.Tensor, decode_positions: torch.Tensor, chunk_tokens: list[int],
             chunk_slot: int, chunk_start: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
             chunk_logits: bool = True, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``decode`` of slots 0..n-1 and ``prefill(chunk_tokens, slot=chunk_slot,
        start=chunk_start)`` in ONE pass (a mixed batch): per layer, RMSNorm, the qkv and o
        projections and the MLP run once over the n decode rows followed by the T chunk rows
        (every weight read once); only attention is separate, each part exactly as in its own
        pass. ``chunk_slot`` must not be one of 0..n-1. Returns the decode rows' fp32 logits
        [n, vocab] and, with ``chunk_logits`` (the chunk ends its prompt), its last position's
        [vocab], else None (the lm_head then runs on the decode rows only)."""
        w = self.w
        n, T = decode_tokens.shape[0], len(chunk_tokens)
        if not n or not T:
            raise ValueError("step: a mixed pass needs decode rows and chunk tokens")
        decode_setup = self._decode_setup(decode_positions, k_cache.shape[3], max_position)
        chunk_setup = self._chunk_setup(T, chunk_start)
        ids = torch.cat([decode_tokens, torch.tensor(chunk_tokens, dtype=torch.long, device=self.device)])
        x = w.embed[ids]  # [n + T, hidden]: the decode rows, then the chunk's
        for li, layer in enumerate(w.layers):
            q, k, v = self._qkv(x, layer)
            attn = torch.cat([
                self._decode_attention(li, q[:n], k[:n], v[:n], k_cache, v_cache, decode_setup),
                self._chunk_attention(li, q[n:], k[n:], v[n:], k_cache, v_cache, chunk_slot, chunk_start, chunk_setup),
            ])
            x = x + F.linear(attn, layer["o"])
            x = self._mlp(x, layer)
        if not chunk_logits:
            return self._logits(x[:n]), None
        logits = self._logits(torch.cat([x[:n], x[-1:]]))
        return logits[:n], logits[n]
