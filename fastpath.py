"""
The model's fast paths, which change how it computes, never what. They act on a built model from
outside, as gpt-fast's quantize.py does, so model.py and bridge.py read as plain PyTorch:
  fuse(model, head_chunk)   all of the below; what train.py, sample.py and the benches run
  packed matmuls            on x86 CPUs, inference matmuls on oneDNN-packed weights, and the
                            projections that share an input (Q/K/V of attention and of Bridge,
                            gate/up of the MLP) as one matmul (not for FSDP units)
  decode_kernel(model)      a one-token decode step's attention without SDPA's GQA flag
  chunk_head(model, chunk)  the vocabulary head in token chunks, recomputed in backward: no
                            (tokens x V) logits ever exist, which is what lets one Bridge group of
                            long traces fit
The tests hold each to the plain model: the same tokens, log-probs and gradients.
"""
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

# first weight -> (key, uses, packed, bias), outside the modules so deepcopy works
PACKED = WeakIdKeyDictionary()

class Linear(nn.Linear):
    """nn.Linear with a CPU inference fast path: from 4 rows up, oneDNN on pre-packed weights beats
    MKL's sgemm (torch's F.linear) 1.4-2x on Intel Xeon and ~4x on AMD EPYC; below, MKL's mat-vec
    path is as fast or faster (`python bench.py --only=linear`). The packed copy costs one more copy
    of the weights (Linear.prepack = False: off), is made once a weight was used pack_after times
    unchanged (a one-off pass never pays for it) and remade when its version counter moves. The
    oneDNN ops are private to torch: if a release drops or changes them, the first call notices (an
    error, or a result unlike F.linear's) and the path turns itself off for good, silently."""
    # measured on x86 only; elsewhere F.linear
    prepack = (hasattr(torch.ops.mkldnn, '_linear_pointwise')
               and torch.backends.mkldnn.is_available()
               and platform.machine().lower() in ('x86_64', 'amd64'))
    # a oneDNN call costs ~15 us more than F.linear: not worth it for small weights
    min_size = 2**17
    # measured: packing loses 10-40% at 1-3 rows, wins 1.4-2x from 4 (Intel Xeon, bench.py)
    min_rows = 4
    # measured (0.5B, width 4, 64 tokens, 1 thread): packing at the 2nd use pays within the answer
    pack_after = 1
    # the packed path's first result is compared with F.linear's, once per process
    checked = False

    def forward(self, x):
        return linears(x, self)[0]

def linears(x, *mods):
    """[m(x) for m in mods] for Linears that share their input (Q/K/V, gate/up). On the CPU fast
    path they run as one packed matmul on the stacked weights, like nanoGPT's fused c_attn: ~8% less
    decode time at 0.5B."""
    ws, w = [m.weight for m in mods], mods[0].weight
    plain = lambda: [F.linear(x, m.weight, m.bias) for m in mods]  # (autocast picks its own dtype)
    if (sum(v.numel() for v in ws) < Linear.min_size or not Linear.prepack or x.device.type != 'cpu'
            or torch.is_grad_enabled() or w.dtype not in (torch.float32, torch.bfloat16)
            or x.dtype != w.dtype or x.numel() < Linear.min_rows * x.size(-1)
            or torch.compiler.is_compiling() or torch.is_autocast_enabled('cpu')):
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
            packed = torch.ops.mkldnn._reorder_linear_weight(
                (ws[0] if len(ws) == 1 else torch.cat(ws)).detach())
            PACKED[w] = key, uses, packed, bias
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '').split(
            [v.size(0) for v in ws], -1)
        if not Linear.checked:
            ref = torch.cat(plain(), -1)
            # bf16 weights: ~1e-3
            if not (torch.cat(y, -1) - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-6:
                raise RuntimeError('the packed matmul disagrees with F.linear')
            Linear.checked = True
        return y
    except Exception:
        # a private op missing, renamed or changed: off for good, and the plain path answers
        Linear.prepack = False
        PACKED.clear()
        return plain()

class Fused:
    """Stands in for a module's qkv / gate_up method: its projections of one input as one matmul. A
    plain object, not a Module, so the state_dict keeps HF's names (q_proj, k_proj, ...) and nothing
    is registered twice."""

    def __init__(self, *mods):
        self.mods = mods

    def __call__(self, x):
        return linears(x, *self.mods)

def fuse(model, head_chunk=1024):
    """Every fast path, applied to a built model: every nn.Linear becomes a packed Linear (its class
    swapped in place, as torch.nn.utils.parametrize does, so parameters, names, tying and optimizer
    state are untouched), each module's qkv(x) / gate_up(x) runs its projections as one matmul,
    and decode_kernel and chunk_head attach. Not for FSDP units (attach instead): FSDP refills
    gathered weights in place without a version bump, so a packed copy would go stale."""
    attach(model, head_chunk)
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
        if hasattr(m, 'qkv'):  # Attention and Bridge
            m.qkv = Fused(m.q_proj, m.k_proj, m.v_proj)
        if hasattr(m, 'gate_up'):  # the MLP
            m.gate_up = Fused(m.gate_proj, m.up_proj)
    return model

def attach(model, head_chunk=1024):
    """The fast paths that do not copy weights (an FSDP model's too): decode_kernel, chunk_head."""
    return chunk_head(decode_kernel(model), head_chunk)

# -----------------------------------------------------------------------------
# the decode step's attention kernel

class DecodeAttention:
    """Stands in for Attention.sdpa. In a decode step (one query per row, under a mask) each query
    head becomes one of n_rep queries on its kv head: SDPA then needs no GQA flag, so CUDA may pick
    its memory-efficient kernel (which refuses GQA) over the math kernel, which copies K and V at
    every step. Training and prefill (no mask) take the plain call."""

    def __init__(self, n_kv_heads):
        self.nkv = n_kv_heads

    def __call__(self, q, k, v, attn_mask, causal):
        B, nh, T, hd = q.shape
        if attn_mask is None or T > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                                  enable_gqa=nh != self.nkv)
        q = q.reshape(B, self.nkv, nh // self.nkv, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return y.reshape(B, nh, 1, hd)

def decode_kernel(model):
    for m in model.modules():
        if hasattr(m, 'sdpa'):
            m.sdpa = DecodeAttention(m.nkv)
    return model

# -----------------------------------------------------------------------------
# the vocabulary head in token chunks

def _chunk_logits(h, w, temperature):
    # one function for the forward pass and the backward recompute: the same ops on the same
    # inputs, the same bits
    z = (h @ w.T).float()  # the matmul in h's dtype (bf16 under autocast), the softmax in fp32
    return z if temperature == 1 else z.div_(temperature)

class ChunkedLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] over token chunks: no (tokens x V) logits ever exist, in
    forward or backward. Forward keeps only each token's logsumexp; backward recomputes each chunk's
    logits (as Liger, TRL, verl do). At V = 151,936 the unchunked head holds ~3 fp32 copies of the
    logits: 1.8 MB per token."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        # under autocast one bf16 copy of W
        w, out = weight.to(h.dtype), torch.empty(h.size(0), device=h.device)
        lse = torch.empty_like(out)
        for i in range(0, h.size(0), chunk):
            t, z = targets[i:i + chunk], _chunk_logits(h[i:i + chunk], w, temperature)
            # ignored (-1) targets read column 0
            zt, m = z.gather(1, t.clamp(min=0)[:, None])[:, 0], z.amax(1)
            # logsumexp in place: one chunk x V buffer, not two
            s = z.sub_(m[:, None]).exp_().sum(1).log_()
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
        # summed in fp32
        gw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        g = grad_out.float().masked_fill(targets < 0, 0) / T  # 1/T: z = h W^T / T
        for i in range(0, h.size(0), C):
            t, gc, hc = targets[i:i + C], g[i:i + C, None], h[i:i + C]
            # d log p_target / dz = onehot(target) - softmax(z), built in place in
            # the recomputed logits
            dz = _chunk_logits(hc, w, T).sub_(lse[i:i + C, None]).exp_().mul_(-gc)
            dz = dz.scatter_add_(1, t.clamp(min=0)[:, None], gc).to(h.dtype)
            if gh is not None:
                gh[i:i + C] = dz @ w
            # in place: a V x D temporary per chunk would cost ~1 GB at the 1.5B shape
            if gw is not None:
                gw.addmm_(dz.T, hc) if dz.dtype == gw.dtype else gw.add_(dz.T @ hc)
            del dz
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None

def head_logprobs(h, weight, targets, temperature=1.0, chunk=1024):
    """(N, D) normed hidden states -> (N,) fp32 log softmax(h W^T / T)[targets], 0
    where a target is -1."""
    kind = h.device.type
    # the head's matmul runs in autocast's dtype, as lm_head's would
    if torch.is_autocast_enabled(kind):
        h = h.to(torch.get_autocast_dtype(kind))
    return ChunkedLogProbs.apply(h, weight, targets, temperature, chunk)

class ChunkedHead:
    """Stands in for Transformer.token_logprobs: the same log-probs through head_logprobs."""

    def __init__(self, lm_head, chunk):
        self.lm_head, self.chunk = lm_head, chunk

    def __call__(self, x, targets, temperature):
        lp = head_logprobs(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), temperature,
                           self.chunk)
        return lp.view(targets.shape)

def chunk_head(model, chunk=1024):
    """The vocabulary head in chunks of `chunk` tokens (0: the plain head, full logits)."""
    if chunk:
        model.token_logprobs = ChunkedHead(model.lm_head, chunk)
    elif 'token_logprobs' in vars(model):
        del model.token_logprobs
    return model
