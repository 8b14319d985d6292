"""
A Qwen2/Qwen3/Llama-compatible decoder that loads Hugging Face safetensors checkpoints directly, with
optional Bridge blocks (bridge.py) after every feed-forward block. Parameter names are HF's own
(model.layers.{i}.self_attn.q_proj.weight, ...), so a state_dict *is* an HF checkpoint.

Numerics follow HF's modeling_qwen2.py so that fp32 logits match to ~1e-5: RMSNorm casts back to the
input dtype *before* the weight multiply, RoPE angles are computed in fp32 in the split-halves
(rotate_half) layout, and attention is torch's scaled_dot_product_attention with GQA.
"""
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from bridge import BridgeConfig, make_block, bridge_mask, bridge_report

ARCHS = {'qwen2': 'Qwen2ForCausalLM', 'llama': 'LlamaForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

@dataclass
class ModelConfig:
    # field names are config.json's, so a checkpoint's config reads straight in
    model_type: str = 'qwen2'
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None           # qwen3 sets it explicitly; otherwise hidden_size // heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None      # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = True
    attention_bias: bool | None = None    # None = the family default (qwen2: True, llama/qwen3: False)
    torch_dtype: str = 'float32'
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.model_type not in ARCHS:
            raise ValueError(f"model_type={self.model_type!r} is not supported (supported: {sorted(ARCHS)})")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == 'qwen2'
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d, where='config.json'):
        d = dict(d)
        if d.get('use_sliding_window'):
            raise ValueError(f"{where}: use_sliding_window=true is not supported (full attention only)")
        if 'model_type' not in d:
            raise ValueError(f"{where}: missing field 'model_type'")
        # transformers 5.x moved rope_theta/rope_scaling into rope_parameters and torch_dtype to dtype
        rp = d.get('rope_parameters') or {}
        if 'rope_theta' not in d and 'rope_theta' in rp:
            d['rope_theta'] = rp['rope_theta']
        if not d.get('rope_scaling') and rp.get('rope_type', 'default') != 'default':
            d['rope_scaling'] = {k: v for k, v in rp.items() if k != 'rope_theta'}
        if d.get('dtype') and not d.get('torch_dtype'):
            d['torch_dtype'] = d['dtype']
        rs = d.get('rope_scaling')
        if rs and rs.get('rope_type', rs.get('type')) not in ('default', 'llama3'):
            raise ValueError(f"{where}: rope_scaling type {rs.get('rope_type', rs.get('type'))!r} is not supported "
                             "(supported: default, llama3)")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d['architectures'] = [ARCHS[self.model_type]]
        if d['rope_scaling'] is None:
            d.pop('rope_scaling')
        return d

# -----------------------------------------------------------------------------

PACKED = WeakIdKeyDictionary()  # first weight -> (key, packed, bias), outside the modules so deepcopy works

class Linear(nn.Linear):
    """nn.Linear with a CPU inference fast path: from 4 rows up, oneDNN on pre-packed weights beats MKL's sgemm
    (torch's F.linear) 1.4-2x on Intel Xeon and ~4x on AMD EPYC; below, MKL's mat-vec path is as fast or faster
    (`python bench.py --only=linear`). The packed copy costs one more copy of the weights (Linear.prepack = False:
    off), is made once a weight was used pack_after times unchanged (a one-off pass never pays for it) and remade when
    its version counter moves. The oneDNN ops are private to torch: if a release drops or changes them, the first
    call notices (an error, or a result unlike F.linear's) and the path turns itself off for good, silently."""
    prepack = (hasattr(torch.ops.mkldnn, '_linear_pointwise') and torch.backends.mkldnn.is_available()
               and platform.machine().lower() in ('x86_64', 'amd64'))  # measured on x86 only; elsewhere F.linear
    min_size = 2**17  # a oneDNN call costs ~15 us more than F.linear: not worth it for small weights
    min_rows = 4      # measured: packing loses 10-40% at 1-3 rows, wins 1.4-2x from 4 (Intel Xeon, bench.py)
    pack_after = 1    # measured (0.5B, width 4, 64 tokens, 1 thread): packing at the 2nd use pays within the answer
    checked = False   # the packed path's first result is compared with F.linear's, once per process

    def forward(self, x):
        return linears(x, self)[0]

def linears(x, *mods):
    """[m(x) for m in mods] for Linears that share their input (Q/K/V, gate/up). On the CPU fast path they run
    as one packed matmul on the stacked weights, like nanoGPT's fused c_attn: ~8% less decode time at 0.5B."""
    ws, w = [m.weight for m in mods], mods[0].weight
    plain = lambda: [F.linear(x, m.weight, m.bias) for m in mods]  # (autocast picks its own dtype)
    if (sum(v.numel() for v in ws) < Linear.min_size or not Linear.prepack or x.device.type != 'cpu'
            or torch.is_grad_enabled() or w.dtype not in (torch.float32, torch.bfloat16) or x.dtype != w.dtype
            or x.numel() < Linear.min_rows * x.size(-1) or torch.compiler.is_compiling()
            or torch.is_autocast_enabled('cpu')):
        return plain()
    ps = [p for m in mods for p in (m.weight, m.bias) if p is not None]
    key = tuple((p.data_ptr(), p._version) for p in ps)
    seen, uses, packed, bias = PACKED.get(w, (None, 0, None, None))
    if seen != key:  # new, or updated since it was packed
        uses, packed = 0, None
    if packed is None and uses < Linear.pack_after:
        PACKED[w] = key, uses + 1, None, None
        return plain()
    try:
        if packed is None:
            bias = torch.cat([m.bias for m in mods]).detach() if mods[0].bias is not None else None
            packed = torch.ops.mkldnn._reorder_linear_weight((ws[0] if len(ws) == 1 else torch.cat(ws)).detach())
            PACKED[w] = key, uses, packed, bias
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '').split([v.size(0) for v in ws], -1)
        if not Linear.checked:
            ref = torch.cat(plain(), -1)
            if not (torch.cat(y, -1) - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-6:  # bf16 weights: ~1e-3
                raise RuntimeError('the packed matmul disagrees with F.linear')
            Linear.checked = True
        return y
    except Exception:  # a private op missing, renamed or changed: off for good, and the plain path answers
        Linear.prepack = False
        PACKED.clear()
        return plain()

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # HF order: normalise in fp32, cast back, *then* scale (matters for bit-exact bf16 parity)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

def rope_inv_freq(cfg: ModelConfig):
    dim = cfg.head_dim
    # on the CPU even inside torch.device('meta'): meta arithmetic imports torch._dynamo, seconds of start-up
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device='cpu').float() / dim))
    rs = cfg.rope_scaling
    if rs and rs.get('rope_type', rs.get('type')) == 'llama3':
        # Llama 3.1 long-context rule: keep high frequencies, divide low ones by `factor`, blend in between
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
    """cos/sin for positions pos (B, T), in fp32 like HF, as (B, 1, T, head_dim) in the model dtype."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)

def apply_rope(x, cos, sin):
    # split-halves layout (HF rotate_half): pairs are (i, i + d/2), not adjacent (i, i+1) as in Meta's code
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

def _chunk_logits(h, w, temperature):
    # one function for the forward pass and the backward recompute: the same ops on the same inputs, the same bits
    z = (h @ w.T).float()  # the matmul in h's dtype (bf16 under autocast), the softmax in fp32
    return z if temperature == 1 else z.div_(temperature)

class ChunkedLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] over token chunks: no (tokens x V) logits ever exist, in forward or backward.
    Forward keeps only each token's logsumexp; backward recomputes each chunk's logits (as Liger, TRL, verl do).
    At V = 151,936 the unchunked head holds ~3 fp32 copies of the logits: 1.8 MB per token."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        w, out = weight.to(h.dtype), torch.empty(h.size(0), device=h.device)  # under autocast one bf16 copy of W
        lse = torch.empty_like(out)
        for i in range(0, h.size(0), chunk):
            t, z = targets[i:i + chunk], _chunk_logits(h[i:i + chunk], w, temperature)
            zt, m = z.gather(1, t.clamp(min=0)[:, None])[:, 0], z.amax(1)  # ignored (-1) targets read column 0
            s = z.sub_(m[:, None]).exp_().sum(1).log_()  # logsumexp in place: one chunk x V buffer, not two
            out[i:i + chunk] = ((zt - m) - s).masked_fill_(t < 0, 0)
            lse[i:i + chunk] = m + s
            del z  # free this chunk's logits before the next chunk's exist
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        T, C, w = ctx.temperature, ctx.chunk, weight.to(h.dtype)
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # summed in fp32
        g = grad_out.float().masked_fill(targets < 0, 0) / T  # 1/T: z = h W^T / T
        for i in range(0, h.size(0), C):
            t, gc, hc = targets[i:i + C], g[i:i + C, None], h[i:i + C]
            # d log p_target / dz = onehot(target) - softmax(z), built in place in the recomputed logits
            dz = _chunk_logits(hc, w, T).sub_(lse[i:i + C, None]).exp_().mul_(-gc)
            dz = dz.scatter_add_(1, t.clamp(min=0)[:, None], gc).to(h.dtype)
            if gh is not None:
                gh[i:i + C] = dz @ w
            if gw is not None:  # in place: a V x D temporary per chunk would cost ~1 GB at the 1.5B shape
                gw.addmm_(dz.T, hc) if dz.dtype == gw.dtype else gw.add_(dz.T @ hc)
            del dz
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None

def head_logprobs(h, weight, targets, temperature=1.0, chunk=1024):
    """(N, D) normed hidden states -> (N,) fp32 log softmax(h W^T / T)[targets], 0 where a target is -1."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):  # the head's matmul runs in autocast's dtype, as lm_head's would
        h = h.to(torch.get_autocast_dtype(kind))
    return ChunkedLogProbs.apply(h, weight, targets, temperature, chunk or max(1, h.size(0)))

class KVCache:
    """Static, pre-allocated keys/values (n_layers, B, n_kv_heads, max_len, head_dim): no reallocation while
    decoding, and the prompt's rows can be copied to its `width` siblings once after a single prefill."""

    def __init__(self, cfg: ModelConfig, batch, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in 'kv')
        self.kv_len = max_len  # how much of the cache attention reads; decode loops shrink it to what is filled
        self.rows = torch.arange(batch, device=device)  # row index for per-row writes, made once, not per step

    def expand_from(self, other, width):
        """Copy the prompt cache `other` (P rows) into this one's P*width rows (nanochat's prefill(other))."""
        L, P, H, T, D = other.k.shape
        self.k[:, :, :, :T].view(L, P, width, H, T, D).copy_(other.k[:, :, None])
        self.v[:, :, :, :T].view(L, P, width, H, T, D).copy_(other.v[:, :, None])

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        if cfg.model_type == 'qwen3':  # Qwen3 normalises q and k per head, before RoPE
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, layer=0, pos=None, attn_mask=None):
        B, T, _ = x.shape
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        if hasattr(self, 'q_norm'):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cache is not None:  # the cache holds the compute dtype; under autocast k (fp32 RoPE) and v (bf16) differ
            k, v = k.to(cache.k.dtype), v.to(cache.v.dtype)
        if cache is not None and pos is None:    # prefill from position 0: store, attend causally to itself
            cache.k[layer, :B, :, :T], cache.v[layer, :B, :, :T] = k, v
        elif cache is not None:                  # one decode step: write at each row's own position
            cache.k[layer, cache.rows, :, pos], cache.v[layer, cache.rows, :, pos] = k[:, :, 0], v[:, :, 0]
            k, v = cache.k[layer, :, :, :cache.kv_len], cache.v[layer, :, :, :cache.kv_len]
            # the one query of each head becomes one of n_rep queries on its kv head: no GQA flag, so CUDA may pick
            # its memory-efficient kernel (which refuses GQA) instead of the math kernel that copies K/V every step
            y = F.scaled_dot_product_attention(q.reshape(B, self.nkv, self.nh // self.nkv, self.hd), k, v,
                                               attn_mask=attn_mask)
            return self.o_proj(y.reshape(B, 1, self.nh * self.hd))
        # is_causal is upper-left aligned, so it is only right when q_len == kv_len (prefill, training)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                           enable_gqa=self.nh != self.nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, bridge: BridgeConfig | None):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if bridge is not None and bridge.enabled(layer):  # paper Fig. 2: a Bridge block after each FFN
            self.bridge = make_block(cfg.hidden_size, bridge, RMSNorm(cfg.hidden_size, bridge.eps or cfg.rms_norm_eps),
                                     Linear, linears)

    def forward(self, x, cos, sin, width, bmask, cache, pos, attn_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer, pos, attn_mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if hasattr(self, 'bridge'):
            x = self.bridge(x, width, *bmask)
        return x

def saved_bytes_per_token(cfg: ModelConfig, bridge: BridgeConfig | None, width, bf16):
    """Bytes autograd keeps per token in one Block (its Bridge included), measured: one Block runs on CPU on
    uninitialised weights under the run's autocast, and saved_tensors_hooks add up the storages it saves. Two
    lengths, so that what does not grow with tokens (autocast's weight copies) cancels."""
    with torch.device('meta'):
        block = Block(cfg, 0, bridge)
    block.to_empty(device='cpu')
    params, sizes = {p.untyped_storage().data_ptr() for p in block.parameters()}, []
    for T in (8, 16):
        seen = {}
        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.zeros(width, T, cfg.hidden_size, requires_grad=True)
        cos, sin = rope(torch.arange(T).expand(width, T), rope_inv_freq(cfg), x.dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            block(x, cos, sin, width, bridge_mask(torch.ones(width, T, dtype=torch.bool), width), None, None, None)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / (8 * width)

def memory_estimate(cfg: ModelConfig, bridge, n_params, n_train, rows, mb_rows, tokens, new_tokens, chunk, width,
                    bf16, fsdp=0, beta=0.0, checkpointing=True):
    """{item: bytes} at a GRPO run's peak on one rank, which train.py prints at start. rows: rollout rows per rank;
    mb_rows: rows of one gradient micro-batch (whole groups); tokens: prompt + new_tokens; fsdp: the FSDP ranks (0:
    none), of which each keeps 1/fsdp of the weights and their state, and gathers in the compute dtype all weights for
    a rollout, or two blocks (one prefetched) and the head for the update, where a block's gradients meet too."""
    L, V, cdt, S = cfg.num_hidden_layers, cfg.vocab_size, 2 if bf16 else 4, fsdp or 1
    kv_token = 2 * L * cfg.num_key_value_heads * cfg.head_dim * cdt  # K and V of every layer, per cached token
    act = saved_bytes_per_token(cfg, bridge, width, bf16)
    head_tokens = min(chunk or mb_rows * new_tokens, mb_rows * new_tokens)
    # checkpointing keeps each block's fp32 input and recomputes one block at a time; the gradients flowing back
    # through that block take about as much again (measured, bench.py's memory rows)
    acts = {c: mb_rows * tokens * ((L * 4 * cfg.hidden_size if c else L * act) + 2 * act) for c in (True, False)}
    # one chunk's fp32 logits (under bf16 also the bf16 product they are cast from: measured); the normed hidden
    head = (6 if bf16 else 4) * head_tokens * V + mb_rows * tokens * 4 * cfg.hidden_size
    # AdamW's foreach step makes a temporary fp32 copy of its parameters (sqrt of exp_avg_sq): measured at 0.5B
    m = {'weights (fp32)': 4 * n_params / S, 'gradients': 4 * n_train / S, 'AdamW state': 8 * n_train / S,
         'AdamW step temporaries': 4 * n_train / S, 'reference model (beta > 0)': 4 * n_params / S if beta > 0 else 0,
         'bf16 weight copies (autocast)': 2 * n_params if bf16 and not fsdp else 0,
         f'rollout KV cache ({kv_token:,} B/token)': kv_token * rows * tokens + 4 * 4 * rows * V,
         'update activations, grad_checkpoint on': acts[True] + head,
         'update activations, grad_checkpoint off': acts[False] + head}
    if fsdp:
        with torch.device('meta'):
            block = sum(p.numel() for p in Block(cfg, 0, bridge).parameters())
        m['rollout: weights gathered (FSDP)'] = cdt * n_params
        m['update: 2 blocks + head gathered (FSDP)'] = cdt * (2 * block + V * cfg.hidden_size) + 4 * block
    fixed = sum(v for k, v in m.items() if not k.startswith(('rollout', 'update')))
    update = m.get('update: 2 blocks + head gathered (FSDP)', 0) + m[f'update activations, grad_checkpoint '
                                                                      f'{"on" if checkpointing else "off"}']
    m['peak'] = fixed + max(sum(v for k, v in m.items() if k.startswith('rollout')), update)
    return m

def check_memory(m, device, verbose=True):
    """Print the estimate; stop with a one-line error on CUDA if it cannot fit, warn on CPU."""
    if verbose:
        print('memory estimate per rank:\n' + '\n'.join(f"  {k:<48} {v / 2**30:8.2f} GiB" if v >= 2**30 else
                                                        f"  {k:<48} {v / 2**20:8.1f} MiB" for k, v in m.items()))
    if device.type == 'cuda':  # the weights may already be on the device
        have = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    else:
        with open('/proc/meminfo') as f:
            have = int(next(l for l in f if l.startswith('MemAvailable')).split()[1]) * 1024
    msg = (f"the run needs ~{m['peak'] / 2**30:.1f} GiB per rank but {device} has {have / 2**30:.1f} GiB: lower width, "
           "max_new_tokens, batch_prompts or micro_groups, logprob_chunk, or set grad_checkpoint=True")
    if m['peak'] > 0.95 * have and device.type == 'cuda':
        raise ValueError(msg)
    if m['peak'] > 0.95 * have and verbose:
        print(f"WARNING: {msg}")

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, bridge: BridgeConfig | None = None):
        super().__init__()
        self.config, self.bridge_config = config, bridge
        self.grad_checkpoint = False  # recompute each block (its Bridge included) in backward: store only its input
        self.head_chunk = 1024        # tokens per chunk of the vocabulary head when targets are given (0 = all)
        self.model = nn.ModuleDict(dict(
            # on the meta device (from_pretrained) no default init: it would import torch._dynamo, as above
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size, _weight=torch.empty(
                config.vocab_size, config.hidden_size) if torch.empty(0).is_meta else None),
            layers=nn.ModuleList(Block(config, i, bridge) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer('inv_freq', rope_inv_freq(config).to(self.lm_head.weight.device), persistent=False)
        if not self.lm_head.weight.is_meta:  # from scratch (from_pretrained builds on 'meta' and loads instead)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, 'bias', None) is not None:
                        nn.init.zeros_(m.bias)
            for b in self.bridge_modules():
                b.reset_parameters()  # Bridge keeps its own init: zero W_O

    def bridge_modules(self):
        return [l.bridge for l in self.model.layers if hasattr(l, 'bridge')]

    def forward(self, idx, targets=None, width=1, alive=None, cache=None, pos=None, last=None, start=0,
                temperature=1.0, reduction='mean'):
        """idx (B, T) -> (logits (B, T, V), loss). Rows are grouped into contiguous blocks of `width` siblings for
        Bridge; alive (B, T) marks positions that are not finished/padded (None = all alive). With a cache: pos=None
        prefills from position 0; pos (B,) decodes one token per row at its position. last (B,) returns logits only
        there (a prefill needs each prompt's last), start > 0 only from there (the log-prob pass needs no prompt):
        the vocabulary head is a small model's biggest matmul. With targets (-1 = no loss) no logits are built: the
        head runs in token chunks (head_logprobs); loss is the mean cross-entropy of softmax(logits / temperature),
        or with reduction='none' the per-token negative log-probs (B, T - start) that GRPO needs."""
        B, T = idx.shape
        if B % width:
            raise ValueError(f"batch of {B} rows is not divisible by width={width}")
        if alive is not None and alive.shape != idx.shape:
            raise ValueError(f"alive has shape {tuple(alive.shape)}, expected {tuple(idx.shape)} like idx")
        x = self.model.embed_tokens(idx)
        positions = pos[:, None] if pos is not None else torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = rope(positions, self.inv_freq, x.dtype)
        # decode: row b sees cache positions 0..pos[b]
        attn_mask = None if pos is None else (torch.arange(cache.kv_len, device=idx.device) <= pos[:, None])[:, None, None]
        bmask = bridge_mask(alive, width) if self.bridge_config is not None else (None, None)
        for block in self.model.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():  # whole groups stay together inside the block
                x = checkpoint(block, x, cos, sin, width, bmask, cache, pos, attn_mask, use_reentrant=False,
                               preserve_rng_state=False)  # no dropout: nothing random to replay
            else:
                x = block(x, cos, sin, width, bmask, cache, pos, attn_mask)
        if last is not None:
            x = x[torch.arange(B, device=idx.device), last][:, None]
        x = self.model.norm(x[:, start:])
        if targets is None:
            return self.lm_head(x), None
        t = targets[:, start:]
        nll = -head_logprobs(x.flatten(0, 1), self.lm_head.weight, t.reshape(-1), temperature,
                             self.head_chunk).view(t.shape)
        return None, nll if reduction == 'none' else nll.sum() / (t >= 0).sum().clamp(min=1)

    def with_bridge(self, bridge: BridgeConfig):
        """This model with zero-initialised Bridge blocks added: still exactly the same function (zero W_O). A sharded
        model's weights are gathered whole on every rank first; the result is unsharded, on the same device."""
        sd = {k: v.full_tensor() if hasattr(v, 'full_tensor') else v for k, v in self.state_dict().items()}
        with sd['model.norm.weight'].device:  # built where the weights are: a 1.5B init on the CPU takes ~15 s
            new = Transformer(self.config, bridge)
        new.load_state_dict(sd, strict=False)
        new.grad_checkpoint, new.head_chunk = self.grad_checkpoint, self.head_chunk
        return new

    def make_cache(self, batch, max_len):
        # the compute dtype: under autocast (fp32 master weights, bf16 matmuls) that is autocast's, not the weights'
        p, kind = self.lm_head.weight, self.lm_head.weight.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else p.dtype
        return KVCache(self.config, batch, max_len, p.device, dtype)

    # ------------------------------------------------------------------ checkpoints in HF layout

    def hf_state_dict(self, base_only=False, sd=None):
        sd = dict(self.state_dict() if sd is None else sd)  # sd: e.g. the full state that FSDP gathers on rank 0
        if self.config.tie_word_embeddings:
            sd.pop('lm_head.weight', None)  # HF tied checkpoints store the matrix once
        return {k: v for k, v in sd.items() if not (base_only and '.bridge.' in k)}

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, bridge: BridgeConfig | None = None, verbose=True):
        cfg_path = os.path.join(path, 'config.json')
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
        try:
            with open(cfg_path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
        config = ModelConfig.from_dict(raw, cfg_path)
        saved_bridge = BridgeConfig.from_dict(raw['bridge']) if raw.get('bridge') else None
        bridge = bridge or saved_bridge
        dtype = dtype or DTYPES.get(config.torch_dtype, torch.float32)
        device = torch.device(device or 'cpu')
        with torch.device('meta'):  # no memory until the real tensors arrive
            model = cls(config, bridge)
        expected = {k: v.shape for k, v in model.hf_state_dict().items()}
        tensors, unexpected, bad = {}, [], []
        for f in _weight_files(path):
            for k, shape, read in read_safetensors(f):
                if k.endswith('rotary_emb.inv_freq') or (k == 'lm_head.weight' and config.tie_word_embeddings):
                    continue  # derived buffers, or a redundant copy of the tied matrix
                if k not in expected:
                    unexpected.append(k)
                elif shape != tuple(expected[k]):
                    bad.append(f"{k}: checkpoint {shape} vs model {tuple(expected[k])}")
                elif device.type == 'meta':  # shapes only (train.py --dry_run): read nothing
                    tensors[k] = torch.empty(shape, dtype=dtype, device=device)
                else:  # one tensor at a time: peak RAM stays ~ one model + one tensor
                    tensors[k] = read().to(device=device, dtype=dtype)
        missing = [k for k in expected if k not in tensors and not (bridge is not None and saved_bridge is None
                                                                     and '.bridge.' in k)]
        if missing or unexpected or bad:
            hint = " (Bridge weights do not match the Bridge config)" if any('.bridge.' in k for k in
                                                                              missing + unexpected + bad) else ""
            raise ValueError(f"checkpoint {path} does not match {config.model_type} config{hint}:\n" + "\n".join(
                [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected] +
                [f"  wrong shape: {b}" for b in bad]))
        model.load_state_dict(tensors, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for b in model.bridge_modules():  # a base checkpoint gets fresh, zero-output Bridge blocks
            if any(p.is_meta for p in b.parameters()):
                b.to_empty(device=device).to(dtype).reset_parameters()
        model.inv_freq = rope_inv_freq(config).to(device)
        if verbose and bridge is not None:
            print(bridge_report(model))
        return model.eval()

    def save_pretrained(self, path, base_only=False, max_shard_bytes=5 * 2**30, state_dict=None):
        """HF layout: config.json + model.safetensors, or shards + model.safetensors.index.json. Bridge weights
        are extra tensors (model.layers.{i}.bridge.*) plus a "bridge" entry in config.json; base_only=True drops
        both, so transformers and any HF tool can read the result. Every file is written atomically.
        state_dict: write these tensors instead of the module's own (a sharded model's, gathered)."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.hf_state_dict(base_only, state_dict).items()}
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if cur and size + n > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + n
        shards.append(cur)
        names = ['model.safetensors'] if len(shards) == 1 else \
            [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
        for name, shard in zip(names, shards):
            atomic_write(os.path.join(path, name), lambda tmp, s=shard: save_file(s, tmp, metadata={'format': 'pt'}))
        if len(shards) > 1:
            index = {'metadata': {'total_size': sum(v.numel() * v.element_size() for v in sd.values())},
                     'weight_map': {k: n for n, s in zip(names, shards) for k in s}}
            atomic_write(os.path.join(path, 'model.safetensors.index.json'), json.dumps(index, indent=2))
        keep = set(names) | ({'model.safetensors.index.json'} if len(shards) > 1 else set())
        for f in os.listdir(path):  # weights of an earlier save with another shard layout would be read instead
            if f not in keep and (f in ('model.safetensors', 'model.safetensors.index.json')
                                  or re.fullmatch(r'model-\d{5}-of-\d{5}\.safetensors', f)):
                os.remove(os.path.join(path, f))
        cfg = self.config.to_dict()
        cfg['torch_dtype'] = str(self.lm_head.weight.dtype).replace('torch.', '')
        if self.bridge_config is not None and not base_only:
            cfg['bridge'] = self.bridge_config.to_dict()
        atomic_write(os.path.join(path, 'config.json'), json.dumps(cfg, indent=2))

# -----------------------------------------------------------------------------
# FSDP2 (train.py --fsdp=True under torchrun), in torchtitan's layout
def shard(model, world, bf16, train=True):
    """Each Block (its Bridge inside) is one FSDP unit, gathered for its forward and again for its backward; the
    embedding and [norm, lm_head] are units too (tied, all three are one: a weight lives in one unit), and the
    root holds the rest. Every rank still owns whole Bridge groups: only weights are split, never a batch."""
    from torch.distributed.device_mesh import init_device_mesh  # imported when used: ~0.6 s of every start
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    Linear.prepack = False  # FSDP refills gathered weights in place without a version bump: a packed copy goes stale
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    kw = dict(mesh=init_device_mesh(model.lm_head.weight.device.type, (world,)), mp_policy=mp)
    for block in model.model.layers:
        fully_shard(block, **kw)
    head = [model.model.norm, model.lm_head]
    if model.config.tie_word_embeddings:
        head.insert(0, model.model.embed_tokens)
    else:
        fully_shard(model.model.embed_tokens, **kw)
    fully_shard(head, reshard_after_forward=not train, **kw)  # backward needs the head first: keep it (torchtitan)
    fully_shard(model, **kw)
    for m in fsdp_units(model):  # every loss here is normalised over all ranks' batch, so ranks' gradients are SUMMED
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model

def fsdp_units(model):
    fsdp = sys.modules.get('torch.distributed.fsdp')  # imported by shard(): before it, nothing is sharded
    return [m for m in model.modules() if fsdp and isinstance(m, fsdp.FSDPModule)]

def full_state(model, opt=None, fsdp=False, load=None):
    """The model's state_dict, or with opt the optimizer's, or with load set the optimizer's to it. Under FSDP every
    rank takes part, and rank 0 receives the whole tensors (on CPU, one at a time) keyed by parameter name (the same
    HF checkpoint as without FSDP); loaded, each rank keeps its shard."""
    if not fsdp:
        return model.state_dict() if opt is None else opt.state_dict() if load is None else opt.load_state_dict(load)
    from torch.distributed.checkpoint import state_dict as dcp
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=load is None)
    return dcp.get_model_state_dict(model, options=full) if opt is None else dcp.get_optimizer_state_dict(
        model, opt, options=full) if load is None else dcp.set_optimizer_state_dict(model, opt, load, options=full)

@contextmanager
def gathered(model, fsdp):
    """One all-gather of every unit per rollout, not one per layer per decoded token; sharded again after. Ranks
    may then decode different numbers of steps: nothing is gathered inside the loop."""
    if fsdp:
        model.set_reshard_after_forward(False)
    yield
    for m in fsdp_units(model) if fsdp else []:  # back to shard()'s layout (the head kept after forward), sharded
        m.set_reshard_after_forward(m is not model.lm_head, recurse=False)
        m.reshard()

ST_DTYPES = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16, 'F64': torch.float64,
             'I64': torch.int64, 'I32': torch.int32, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}

def read_safetensors(path):
    """The one tensor loader: yields (name, shape, read) for each tensor of a .safetensors file, where read()
    reads just that tensor with plain file I/O. No mmap, so pages of the file never count as a second copy of
    the model in RAM. Format: 8-byte little-endian header size, a JSON header, then the raw bytes."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        try:
            n = int.from_bytes(f.read(8), 'little')
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
            entries = [(k, v['dtype'], tuple(v['shape']), v['data_offsets']) for k, v in header.items()
                       if k != '__metadata__']
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        for k, dt, shape, (start, end) in entries:
            if dt not in ST_DTYPES:
                raise ValueError(f"{path}: tensor {k} has unsupported dtype {dt}")
            if 8 + n + end > size or end - start != math.prod(shape) * ST_DTYPES[dt].itemsize:
                raise ValueError(f"{path}: corrupt or truncated safetensors file (tensor {k} is out of bounds)")

            def read(k=k, dt=dt, shape=shape, start=start):
                t = torch.empty(shape, dtype=ST_DTYPES[dt])
                f.seek(8 + n + start)
                f.readinto(t.view(-1).view(torch.uint8).numpy())  # straight into the tensor's memory
                return t
            yield k, shape, read

def _weight_files(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: invalid shard index ({e})") from None
        for s in shards:
            if not os.path.isfile(os.path.join(path, s)):
                raise FileNotFoundError(f"shard {s} named in {index} is missing")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(single):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return [single]

os.umask(_UMASK := os.umask(0o022))  # the process's umask: reading it means setting it, so put it back at once

def atomic_write(path, data):
    """Write to a temp file, then rename: a crash never leaves a half-written file under the real name.
    data is text, or a function that writes the temp path it is given (safetensors, torch.save)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix=os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def atomic_dir(path, write):
    """atomic_write for a whole directory: write(new) fills a fresh sibling path.new, which then replaces path
    by two renames (path -> path.old, path.new -> path). A crash before them leaves the old directory whole;
    between them path is missing, and recover_dir() completes the swap on the next start."""
    recover_dir(path)
    new, old = path + '.new', path + '.old'
    os.makedirs(new)
    write(new)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)  # absent on the first save

def recover_dir(path):
    """Undo what a crashed atomic_dir left: path.new is complete if path.old exists (path is renamed away only
    after path.new is written), so it becomes path; any other leftover was never committed."""
    new, old = path + '.new', path + '.old'
    if not os.path.exists(path) and os.path.exists(old):
        os.replace(new if os.path.exists(new) else old, path)
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)
