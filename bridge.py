"""
Bridge: attention along the *batch* axis (Dong et al., "Generalized Parallel Scaling with
Interdependent Generations", arXiv 2510.01143). After each feed-forward block, every token
position s lets the N sibling rows of one prompt read each other (docs/paper.md §2.2):

    Q_s = X[:, s] W_Q,  K_s = X[:, s] W_K,  V_s = X[:, s] W_V
    Bridge(X)[:, s] = Softmax(Mask_Bridge(Q_s K_s^T) / sqrt(d_head)) V_s W_O

The attention matrix is width x width, one per (group, position). There is no positional signal
across rows, so the block is permutation-equivariant and one trained model serves any width. W_O
starts at zero, so a fresh Bridge model is exactly its base model. Where the paper is silent
(inner width 512 = 4 heads x 128, RMSNorm input, no biases) the choices are docs/paper.md §8's.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ('bridge', 'self', 'pmatch')

@dataclass
class BridgeConfig:
    dim: int = 512              # inner width d_B of Q/K/V (2.8-5.1% extra params: d_B ~ 512)
    n_head: int = 4             # d_B is split into n_head heads of dim // n_head
    eps: float | None = None    # RMSNorm eps; None = the host model's rms_norm_eps
    layers: list | None = None  # layers that get a block; None = every layer ("after each FFN")
    mode: str = 'bridge'        # 'bridge' | 'self' (rows see only themselves) | 'pmatch'

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"bridge mode={self.mode!r}: expected one of {MODES}")
        if self.dim < 1 or self.n_head < 1 or self.dim % self.n_head:
            raise ValueError(f"bridge dim={self.dim} must be a positive multiple of "
                             f"n_head={self.n_head}")
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
    """The one place the Bridge mask is built (docs/paper.md §2.3: tokens of other prompts and of
    completed generations are masked). alive (B, T): False at finished or padded positions.
    -> (key_mask (G*T, 1, W, W) for SDPA, query_keep (B, T, 1)).
    Groups are contiguous rows by construction, so only the finished rule is a mask. The diagonal
    is always allowed: a row always reads at least itself, so no softmax row is empty (no NaN),
    and a finished row's own output is zeroed by query_keep instead. Which positions are finished
    is the sampler's rule (sample.generate: from the position whose input is a row's stop token),
    replayed here from `alive`."""
    if alive is None:
        return None, None
    B, T = alive.shape
    if B % width:
        raise ValueError(f"alive has {B} rows, not a multiple of width={width}")
    a = alive.view(B // width, width, T).transpose(1, 2)                    # (G, T, W)
    eye = torch.eye(width, dtype=torch.bool, device=alive.device)
    key_mask = (a[..., None, :] | eye).reshape(-1, 1, width, width)  # query i may read key j
    return key_mask, alive[..., None]

class Bridge(nn.Module):
    """h <- h + W_O MHA_over_rows(RMSNorm(h)), for every token position (docs/paper.md §2.1)."""

    def __init__(self, hidden_size, cfg: BridgeConfig, norm: nn.Module):
        super().__init__()
        self.cfg, self.n_head, self.head_dim = cfg, cfg.n_head, cfg.dim // cfg.n_head
        # the host's RMSNorm, passed in: model.py imports this file, not the other way round
        self.norm = norm
        self.q_proj = nn.Linear(hidden_size, cfg.dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, cfg.dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        # zero W_O: the block adds nothing at step 0, yet W_O gets a gradient (docs/paper.md §2.5)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.o_proj.weight)
        nn.init.ones_(self.norm.weight)

    def qkv(self, h):  # three projections of one input (fastpath.fuse runs them as one matmul)
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def attend(self, q, k, v, key_mask):
        """Softmax(Mask_Bridge(Q_s K_s^T) / sqrt(d)) V_s, for every (group, position) s at once (the
        Bridge equation), fused. probe.BridgeProbe swaps in the same attention unfused, to read
        its weights."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

    def forward(self, x, width, key_mask=None, query_keep=None):
        B, T, _ = x.shape
        h = self.norm(x)                           # the Bridge block's input normalisation
        if self.cfg.mode == 'self' or width == 1:  # softmax over one key is 1: attention is V
            y = self.v_proj(h)
        else:
            G, H, d = B // width, self.n_head, self.head_dim
            # Q_s = X_s W_Q, K_s = X_s W_K, V_s = X_s W_V, as (G*T, H, W, d): the W rows of one
            # (group, position) are one attention's queries and keys
            q, k, v = (t.view(G, width, T, H, d).permute(0, 2, 3, 1, 4).reshape(-1, H, width, d)
                       for t in self.qkv(h))
            y = self.attend(q, k, v, key_mask)
            y = y.view(G, T, H, width, d).permute(0, 3, 1, 2, 4).reshape(B, T, H * d)
        y = self.o_proj(y)                         # W_O, zero at init
        if query_keep is not None:
            y = y * query_keep                     # a finished or padded row writes nothing
        return x + y                               # the residual stream

class PMatch(nn.Module):
    """The paper's parameter-matched baseline (docs/paper.md §5): a zero-initialised MLP after each
    FFN with Bridge's parameter count (D -> 2 d_B -> D = 4 D d_B) and no cross-row mixing."""

    def __init__(self, hidden_size, cfg: BridgeConfig, norm: nn.Module):
        super().__init__()
        self.cfg, self.norm = cfg, norm
        self.up_proj = nn.Linear(hidden_size, 2 * cfg.dim, bias=False)
        self.down_proj = nn.Linear(2 * cfg.dim, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.up_proj.weight, std=0.02)
        nn.init.zeros_(self.down_proj.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, x, width, key_mask=None, query_keep=None):
        y = self.down_proj(F.silu(self.up_proj(self.norm(x))))
        return x + (y if query_keep is None else y * query_keep)

def make_block(hidden_size, cfg: BridgeConfig, norm: nn.Module):
    return (PMatch if cfg.mode == 'pmatch' else Bridge)(hidden_size, cfg, norm)

def bridge_params(model):
    """(Bridge parameters, base parameters); a tied embedding counts once (named_parameters lists
    shared weights once), like HF's num_parameters()."""
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
