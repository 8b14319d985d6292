"""
A Qwen2/Qwen3/Llama-compatible decoder with optional Bridge blocks (bridge.py) after every
feed-forward block. Parameter names are Hugging Face's own (model.layers.{i}.mlp.up_proj.weight,
...), so a state_dict *is* an HF checkpoint (checkpoint.py reads and writes them).

Numerics follow HF's modeling_qwen2.py so that fp32 logits match to ~1e-5: RMSNorm casts back to
the input dtype *before* the weight multiply, RoPE angles are computed in fp32 in the split-halves
(rotate_half) layout, and attention is torch's scaled_dot_product_attention with GQA. What makes it
fast acts on it from outside: fastpath.py (packed CPU matmuls, the decode attention kernel, the
vocabulary head in chunks), distributed.py (FSDP2), engine.py (sampling).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bridge import BridgeConfig, bridge_mask, make_block

@dataclass
class ModelConfig:
    # field names are config.json's, so a checkpoint's config reads straight in
    model_type: str = 'qwen2'             # 'qwen2' | 'llama' | 'qwen3'
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None           # qwen3 sets it; otherwise hidden_size // heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None      # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = True
    attention_bias: bool | None = None    # None = the family's (qwen2: True, others: False)
    torch_dtype: str = 'float32'
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.model_type not in ('qwen2', 'llama', 'qwen3'):
            raise ValueError(f"model_type={self.model_type!r} is not supported "
                             f"(supported: llama, qwen2, qwen3)")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == 'qwen2'
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # HF order: normalise in fp32, cast back, *then* scale (bit-exact bf16 parity)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

def rope_inv_freq(cfg: ModelConfig):
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs and rs.get('rope_type', rs.get('type')) == 'llama3':
        # Llama 3.1's long context: keep high frequencies, divide low ones by `factor`, blend
        factor, lo, hi = rs['factor'], rs['low_freq_factor'], rs['high_freq_factor']
        old = rs['original_max_position_embeddings']
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv

def rope(pos, inv_freq, dtype):
    """cos/sin for positions pos (B, T), in fp32 like HF, as (B, 1, T, head_dim) in `dtype`."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)

def apply_rope(x, cos, sin):
    # split-halves layout (HF rotate_half): pairs are (i, i + d/2), not (i, i+1) as in Meta's code
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class KVCache:
    """Static keys/values (n_layers, B, n_kv_heads, max_len, head_dim): no reallocation while
    decoding, and a prompt's rows are copied to its `width` siblings once, after one prefill."""

    def __init__(self, cfg: ModelConfig, batch, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.kv_len = max_len  # how much of the cache attention reads (the filled part)
        self.rows = torch.arange(batch, device=device)  # for per-row writes, made once

    def expand_from(self, other, width):
        """Copy the prompt cache `other` (P rows) into this one's P*width rows."""
        L, P, H, T, D = other.k.shape
        self.k[:, :, :, :T].view(L, P, width, H, T, D).copy_(other.k[:, :, None])
        self.v[:, :, :, :T].view(L, P, width, H, T, D).copy_(other.v[:, :, None])

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        if cfg.model_type == 'qwen3':  # Qwen3 normalises q and k per head, before RoPE
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def qkv(self, x):  # three projections of one input (fastpath.fuse: one matmul on a CPU)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def sdpa(self, q, k, v, attn_mask, causal):  # (fastpath.fuse: a faster kernel for decoding)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                              enable_gqa=self.nh != self.nkv)

    def forward(self, x, cos, sin, cache=None, layer=0, pos=None, attn_mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        if hasattr(self, 'q_norm'):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cache is not None:  # the cache's dtype; under autocast k (fp32 RoPE) and v (bf16) differ
            k, v = k.to(cache.k.dtype), v.to(cache.v.dtype)
        if cache is not None and pos is None:  # prefill from position 0: store, attend causally
            cache.k[layer, :B, :, :T] = k
            cache.v[layer, :B, :, :T] = v
        elif cache is not None:  # one decode step: write at each row's own position, read the rest
            cache.k[layer, cache.rows, :, pos] = k[:, :, 0]
            cache.v[layer, cache.rows, :, pos] = v[:, :, 0]
            k = cache.k[layer, :, :, :cache.kv_len]
            v = cache.v[layer, :, :, :cache.kv_len]
        # is_causal is upper-left aligned: right only when q_len == kv_len (prefill, training)
        y = self.sdpa(q, k, v, attn_mask, causal=attn_mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def gate_up(self, x):  # two projections of one input (fastpath.fuse: one matmul on a CPU)
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, bridge: BridgeConfig | None):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if bridge is not None and bridge.enabled(layer):  # paper Fig. 2: Bridge after each FFN
            norm = RMSNorm(cfg.hidden_size, bridge.eps or cfg.rms_norm_eps)
            self.bridge = make_block(cfg.hidden_size, bridge, norm)

    def forward(self, x, cos, sin, width, bmask, cache, pos, attn_mask):
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos, sin, cache, self.layer, pos, attn_mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if hasattr(self, 'bridge'):  # h <- h + Bridge(Norm_B(h)), across the rows of each group
            x = self.bridge(x, width, *bmask)
        return x

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, bridge: BridgeConfig | None = None):
        super().__init__()
        self.config = config
        self.bridge_config = bridge
        self.grad_checkpoint = False  # recompute each block (its Bridge included) in backward
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i, bridge) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer('inv_freq', rope_inv_freq(config), persistent=False)
        if not self.lm_head.weight.is_meta:  # built on 'meta', the weights are loaded instead
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, 'bias', None) is not None:
                        nn.init.zeros_(m.bias)
            for b in self.bridge_modules():
                b.reset_parameters()  # Bridge keeps its own init: zero W_O

    def bridge_modules(self):
        return [l.bridge for l in self.model.layers if hasattr(l, 'bridge')]

    def forward(self, idx, targets=None, width=1, alive=None, cache=None, pos=None, last=None,
                start=0, temperature=1.0, reduction='mean'):
        """idx (B, T) -> (logits (B, T, V), loss).
        Rows are contiguous groups of `width` siblings for Bridge; alive (B, T) marks positions
        that are not finished or padded (None = all alive).
        With a cache: pos=None prefills from position 0; pos (B,) decodes one token per row at
        its position. last (B,) returns logits only there (a prefill needs each prompt's last);
        start > 0 only from there (the log-prob pass needs none for the prompt).
        With targets (-1 = no loss): no logits; loss is the mean cross-entropy of
        softmax(logits / T), or with reduction='none' the per-token negative log-probs
        (B, T - start) that GRPO needs."""
        B, T = idx.shape
        if B % width:
            raise ValueError(f"batch of {B} rows is not divisible by width={width}")
        if alive is not None and alive.shape != idx.shape:
            raise ValueError(f"alive has shape {tuple(alive.shape)}, expected {tuple(idx.shape)}")
        x = self.model.embed_tokens(idx)
        if pos is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        else:
            positions = pos[:, None]
        cos, sin = rope(positions, self.inv_freq, x.dtype)
        attn_mask = None
        if pos is not None:  # decode: row b sees cache positions 0 .. pos[b]
            attn_mask = (torch.arange(cache.kv_len, device=idx.device) <= pos[:, None])
            attn_mask = attn_mask[:, None, None]
        bmask = (None, None)
        if self.bridge_config is not None:
            bmask = bridge_mask(alive, width)
        for block in self.model.layers:
            args = (x, cos, sin, width, bmask, cache, pos, attn_mask)
            if self.grad_checkpoint and torch.is_grad_enabled():  # a group stays in one block
                # no dropout: no random state to replay
                x = checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(*args)
        if last is not None:
            x = x[torch.arange(B, device=idx.device), last][:, None]
        x = self.model.norm(x[:, start:])
        if targets is None:
            return self.lm_head(x), None
        t = targets[:, start:]
        nll = -self.token_logprobs(x, t, temperature)
        if reduction == 'none':
            return None, nll
        return None, nll.sum() / (t >= 0).sum().clamp(min=1)

    def token_logprobs(self, x, targets, temperature):
        """log softmax(lm_head(x) / T)[targets] in fp32, 0 where a target is -1: GRPO's log pi
        (docs/paper.md §3.2). fastpath.chunk_head computes the same in token chunks."""
        logits = self.lm_head(x).float() / temperature
        logp = torch.log_softmax(logits, -1)
        logp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return logp.masked_fill(targets < 0, 0.0)

    def with_bridge(self, bridge: BridgeConfig, state_dict=None):
        """This model with zero-initialised Bridge blocks added: the same function (zero W_O).
        state_dict: the weights to start from when this model's are sharded."""
        sd = self.state_dict() if state_dict is None else state_dict
        with sd['model.norm.weight'].device:  # built where the weights are: faster than the CPU
            new = Transformer(self.config, bridge)
        new.load_state_dict(sd, strict=False)
        new.grad_checkpoint = self.grad_checkpoint
        return new

    def make_cache(self, batch, max_len):
        # the compute dtype: under autocast (fp32 weights, bf16 matmuls) autocast's
        p = self.lm_head.weight
        kind = p.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else p.dtype
        return KVCache(self.config, batch, max_len, p.device, dtype)
