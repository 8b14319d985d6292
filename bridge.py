"""
Bridge: attention along the *batch* axis (Dong et al., "Generalized Parallel Scaling with
Interdependent Generations", arXiv 2510.01143). After each feed-forward block, every token position s
lets the N sibling rows of one prompt read each other:

    Q_s = X[:, s] W_Q,  K_s = X[:, s] W_K,  V_s = X[:, s] W_V                      (paper, Bridge eq.)
    Bridge(X)[:, s] = Softmax(Mask_Bridge(Q_s K_s^T) / sqrt(d_head)) V_s W_O

The attention matrix is width x width, one per (group, position). There is no positional signal across
rows, so the block is permutation-equivariant and one trained model serves any width. W_O starts at zero,
so a fresh Bridge model is exactly its base model. Choices where the paper is silent follow
shared/docs/bridge-paper.md section 9 (inner width 512 = 4 heads x 128, RMSNorm input, no biases).
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ('bridge', 'self', 'pmatch')

@dataclass
class BridgeConfig:
    dim: int = 512              # inner width d_B of Q/K/V (paper: 2.8-5.1% extra params => d_B ~ 512)
    n_head: int = 4             # d_B is split into n_head heads of dim // n_head
    eps: float | None = None    # RMSNorm eps; None = the host model's rms_norm_eps
    layers: list | None = None  # indices of layers that get a block; None = every layer (paper: "after each")
    mode: str = 'bridge'        # 'bridge' | 'self' (same params, each row attends only to itself) | 'pmatch'

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"bridge mode={self.mode!r}: expected one of {MODES}")
        if self.dim < 1 or self.n_head < 1 or self.dim % self.n_head:
            raise ValueError(f"bridge dim={self.dim} must be a positive multiple of n_head={self.n_head}")
        if self.layers is not None:
            self.layers = sorted(int(i) for i in self.layers)

    def enabled(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config.json 'bridge' has unknown fields {sorted(unknown)}")
        return cls(**d)

def bridge_mask(alive, width):
    """The one place the Bridge mask is built (paper Fig. 2: "attention is masked for tokens from different prompts
    and from completed generations"). alive (B, T): False at finished or padded positions. -> (key_mask (G*T, 1, W, W)
    for SDPA, query_keep (B, T, 1)). Groups are contiguous rows by construction, so only the finished rule is a mask.
    The diagonal is always allowed, so no softmax row is empty (no NaN); query_keep then zeroes a dead query."""
    if alive is None:
        return None, None
    B, T = alive.shape
    if B % width:
        raise ValueError(f"alive has {B} rows, not a multiple of width={width}")
    a = alive.view(B // width, width, T).transpose(1, 2)                    # (G, T, W)
    eye = torch.eye(width, dtype=torch.bool, device=alive.device)
    key_mask = (a[..., None, :] | eye).reshape(-1, 1, width, width)          # query i may read key j
    return key_mask, alive[..., None]

class Bridge(nn.Module):
    """h <- h + W_O * MHA_over_rows(RMSNorm(h)), independently for every token position."""
    probe = None  # a BridgeProbe reads every call (set by BridgeProbe; None = the fused SDPA path)

    def __init__(self, hidden_size, cfg: BridgeConfig, norm: nn.Module, linear, linears):
        super().__init__()
        self.cfg, self.n_head, self.head_dim = cfg, cfg.n_head, cfg.dim // cfg.n_head
        # the host's RMSNorm module, Linear class and linears(x, *mods) (Linears sharing an input, run as one
        # matmul where that is faster) are passed in, so bridge.py does not import model.py
        self.norm, self.linears = norm, linears
        self.q_proj = linear(hidden_size, cfg.dim, bias=False)
        self.k_proj = linear(hidden_size, cfg.dim, bias=False)
        self.v_proj = linear(hidden_size, cfg.dim, bias=False)
        self.o_proj = linear(cfg.dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        # zero W_O: the block contributes nothing at step 0 yet W_O gets a gradient (paper: "contribute zero")
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, x, width, key_mask=None, query_keep=None):
        B, T, D = x.shape
        h, att = self.norm(x), None
        if self.cfg.mode == 'self' or width == 1:
            # softmax over a single key is 1, so attention reduces to V W_O: the "self-only" control
            y = self.o_proj(self.v_proj(h))
        else:
            G, H, hd = B // width, self.n_head, self.head_dim
            # (B, T, d_B) -> (G*T, H, W, hd): SDPA then attends over the W sibling rows of every (group, position)
            def rows(t):
                return t.view(G, width, T, H, hd).permute(0, 2, 3, 1, 4).reshape(G * T, H, width, hd)
            q, k, v = (rows(t) for t in self.linears(h, self.q_proj, self.k_proj, self.v_proj))
            if self.probe is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
            else:  # the same attention unfused, so that the probe can read its weights (paper eq.: softmax(QK^T))
                att = (q @ k.transpose(-1, -2) / hd ** 0.5).float()
                att = att.masked_fill(~key_mask, float('-inf')).softmax(-1) if key_mask is not None else att.softmax(-1)
                y = att.to(v.dtype) @ v
            y = self.o_proj(y.view(G, T, H, width, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd))
        if query_keep is not None:
            y = y * query_keep  # finished/padded rows neither read nor are read
        if self.probe is not None:
            self.probe(self, x, y, att, query_keep, width)
        return x + y

class PMatch(nn.Module):
    """The paper's parameter-matched baseline: a zero-initialised MLP after each FFN with Bridge's parameter
    count (D -> 2 d_B -> D = 4 D d_B) and no cross-row mixing at all."""
    probe = None

    def __init__(self, hidden_size, cfg: BridgeConfig, norm: nn.Module, linear, linears):
        super().__init__()
        self.cfg, self.norm = cfg, norm
        self.up_proj = linear(hidden_size, 2 * cfg.dim, bias=False)
        self.down_proj = linear(2 * cfg.dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.up_proj.weight, std=0.02)
        nn.init.zeros_(self.down_proj.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, x, width, key_mask=None, query_keep=None):
        y = self.down_proj(F.silu(self.up_proj(self.norm(x))))
        y = y if query_keep is None else y * query_keep
        if self.probe is not None:
            self.probe(self, x, y, None, query_keep, width)
        return x + y

def make_block(hidden_size, cfg: BridgeConfig, norm: nn.Module, linear, linears):
    return (PMatch if cfg.mode == 'pmatch' else Bridge)(hidden_size, cfg, norm, linear, linears)

def bridge_params(model):
    """(Bridge parameters, base parameters); a tied embedding counts once (named_parameters lists shared weights
    once), like HF's num_parameters()."""
    ps = list(model.named_parameters())
    extra = sum(p.numel() for n, p in ps if '.bridge.' in n)
    return extra, sum(p.numel() for _, p in ps) - extra

def bridge_report(model):
    extra, base = bridge_params(model)
    cfg = model.bridge_config
    if cfg is None:
        return f"no Bridge; base model {base:,} params"
    n = sum(cfg.enabled(i) for i in range(model.config.num_hidden_layers))
    return (f"{cfg.mode}: {n} blocks, d_B={cfg.dim}, {cfg.n_head} heads, {extra:,} params "
            f"= {100 * extra / base:.2f}% of the {base:,}-param base model")

class BridgeProbe:
    """What the Bridge blocks do, read while the model runs (train.py's evaluation, sample.py --show_bridge):
      norm ratio   ||Bridge output|| / ||residual stream|| per layer (paper Fig. 7);
      sibling share per layer, the mean share of a live row's Bridge attention that went to its siblings rather
                   than to itself (0: it reads only itself; 1 - 1/w: uniform over w live rows; 0 for the self and
                   P-Match controls and at width 1, which have no cross-row path).
    Sums stay on the device: a float() per layer per decode step would be a host sync on a GPU. keep=True also keeps
    every call's head-averaged attention (B, T, W) of each row over its group, in call order (sample.py)."""

    def __init__(self, model, keep=False):
        self.layer = {b: i for i, l in enumerate(model.model.layers) if (b := getattr(l, 'bridge', None))}
        self.sums, self.kept, self.keep = {}, [], keep
        for b in self.layer:
            b.probe = self

    def __call__(self, block, x, y, att, keep, width):
        s = self.sums.setdefault(self.layer[block], [0.0, 0, 0.0, 0.0])  # norm-ratio sum, calls, share sum, rows
        B, T = x.shape[:2]
        live = keep[..., 0].float() if keep is not None else torch.ones(B, T, device=x.device)
        s[0], s[1], s[3] = s[0] + y.detach().float().norm() / x.detach().float().norm().clamp(min=1e-12), s[1] + 1, \
            s[3] + live.sum()
        a = None
        if att is not None:  # (G*T, H, W, W) -> each row's attention over its group, averaged over heads: (B, T, W)
            a = att.detach().float().mean(1).view(B // width, T, width, width).transpose(1, 2).reshape(B, T, width)
            r = torch.arange(B, device=a.device)
            s[2] = s[2] + ((1 - a[r, :, r % width]) * live).sum()  # 1 - the weight each row gives itself
        if self.keep:
            self.kept.append(a)

    def norm_ratios(self):  # {layer: mean ratio}
        return {i: float(s[0]) / s[1] for i, s in sorted(self.sums.items())}

    def sibling_shares(self):  # {layer: mean share over live rows}
        return {i: float(s[2]) / max(float(s[3]), 1) for i, s in sorted(self.sums.items())}

    def reset(self):
        self.sums, self.kept = {}, []

    def remove(self):
        for b in self.layer:
            b.probe = None
