"""
What the Bridge blocks do, read from outside while the model runs (train.py's evaluation, sample.py
--show_bridge). Forward hooks on each block read its input, its width and its live positions by
name (register_forward_hook with_kwargs=True, bound to the block's signature), so a block called
with keyword arguments is read the same; to keep the attention weights, each Bridge's fused
`attend` is shadowed by the same attention unfused until remove().
"""
import inspect
from dataclasses import dataclass

import torch

from bridge import Bridge

@dataclass
class ProbeSums:
    """One layer's running sums. They stay on the device: a float() per layer per decode step is
    a host sync."""
    ratio: torch.Tensor | float = 0.0   # sum over live tokens of ||Bridge output|| / ||residual||
    tokens: torch.Tensor | float = 0.0  # the live tokens summed in `ratio`
    share: torch.Tensor | float = 0.0   # sum of 1 - (a row's weight on itself), >= 2 rows live
    reads: torch.Tensor | float = 0.0   # the (row, position) pairs summed in `share`

class BridgeProbe:
    """What the Bridge blocks do:
      norm ratio     ||Bridge output|| / ||residual stream|| per token, averaged over live tokens
                     (paper Fig. 7);
      sibling share  1 - the attention weight a row gives itself, averaged over the (row, position)
                     pairs where attention ran over 2 or more live rows: 1 - 1/n for uniform
                     attention over n live rows.
    Only calls at width >= 2 count: a shared prefill runs every prompt once, at width 1, where
    siblings do not exist yet. Finished and padded positions count for neither (their output is
    zeroed). The self and P-Match controls have no cross-row attention: their share stays 0.
    keep=True also keeps every counted call's head-averaged attention of each row over its group,
    (B, T, W), in call order (bridge_view)."""

    def __init__(self, model, keep=False):
        layers = enumerate(model.model.layers)
        self.layer = {b: i for i, l in layers if (b := getattr(l, 'bridge', None))}  # block: layer
        self.sums, self.kept, self.keep, self.att = {}, [], keep, None
        self.hooks = [b.register_forward_hook(self.read, with_kwargs=True) for b in self.layer]
        for b in self.layer:
            if isinstance(b, Bridge):
                b.attend = self.attend  # an instance attribute shadows the fused method

    def attend(self, q, k, v, key_mask):
        """Bridge.attend unfused, keeping its weights: softmax(Q K^T / sqrt(d)), masked keys at
        -inf."""
        att = (q @ k.transpose(-1, -2) / q.size(-1) ** 0.5).float()
        if key_mask is not None:
            att = att.masked_fill(~key_mask, float('-inf'))
        self.att = att.softmax(-1)
        return self.att.to(v.dtype) @ v

    def read(self, block, args, kwargs, out):
        call = inspect.signature(block.forward).bind(*args, **kwargs).arguments  # by name
        x, width, keep = call['x'], call['width'], call.get('query_keep')
        att, self.att = self.att, None
        if width == 1:
            return
        B, T = x.shape[:2]
        live = torch.ones(B, T, dtype=torch.bool, device=x.device) if keep is None else keep[..., 0]
        x, y = x.detach().float(), (out - x).detach().float()  # y: what the block added
        s = self.sums.setdefault(self.layer[block], ProbeSums())
        s.ratio = s.ratio + (y.norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12) * live).sum()
        s.tokens = s.tokens + live.sum()
        if att is None:
            return
        # (G*T, H, W, W) -> each row's attention over its group, averaged over heads: (B, T, W)
        a = att.detach().mean(1).view(B // width, T, width, width).transpose(1, 2)
        a = a.reshape(B, T, width)
        n = live.view(B // width, width, T).sum(1, keepdim=True).expand(-1, width, -1)
        counted, r = live & (n.reshape(B, T) >= 2), torch.arange(B, device=x.device)
        s.share = s.share + ((1 - a[r, :, r % width]) * counted).sum()
        s.reads = s.reads + counted.sum()
        if self.keep:
            self.kept.append(a)

    def layers(self):  # (layer, its sums) for every Bridge layer, counted or not, in layer order
        return [(i, self.sums.get(i, ProbeSums())) for i in sorted(self.layer.values())]

    def norm_ratios(self):  # {layer: mean ratio over live tokens}; 0 where nothing was counted
        return {i: float(s.ratio) / max(float(s.tokens), 1) for i, s in self.layers()}

    def sibling_shares(self):  # {layer: mean share}; 0 where no attention ran over >= 2 live rows
        return {i: float(s.share) / max(float(s.reads), 1) for i, s in self.layers()}

    def reset(self):
        self.sums, self.kept = {}, []

    def remove(self):
        for h in self.hooks:
            h.remove()
        for b in self.layer:
            b.__dict__.pop('attend', None)

def bridge_view(probe, gen):
    """sample.py --show_bridge: what every row read from its siblings, per generated token. probe:
    a BridgeProbe(keep=True) that saw the sampling: one call per Bridge layer for every decode step,
    each row's attention over its group averaged over heads; token s (s >= 1) was chosen by decode
    step s. Token 0 comes from the shared prefill, where the siblings are identical copies ('.')."""
    calls, L, W = probe.kept, len(probe.layer), gen.width
    if not calls:
        return ["  (no cross-row attention to show: width 1, or a self/pmatch model)"] * (
            gen.tokens.size(0))
    steps = [torch.stack(calls[k:k + L]).mean(0)[:, -1] for k in range(0, len(calls), L)]
    att = torch.stack(steps, 1).float().cpu()

    def most(w, who):  # the sibling read most, '=' when none stands out by 1%
        if len(w) > 1 and w.max() - w.min() <= 0.01 * w.max():
            return '='
        return who[int(w.argmax())]
    out = []
    for b, n in enumerate(gen.lengths.tolist()):
        sibs = [j for j in range(W) if j != b % W]
        who = ['123456789abcdefghijklmnopqrstuvwxyz?'[min(j, 35)] for j in sibs]
        s = att[b, :n - 1, sibs]  # its siblings' weights at every token after the first
        m = most(s.sum(0), who)   # their sum is its share
        shares = ''.join(str(min(9, int(10 * v))) for v in s.sum(1).tolist())
        reads = ''.join(most(w, who) for w in s)
        mean = s.sum(1).mean() if n > 1 else 0
        overall = 'no sibling more than another' if m == '=' else 'answer ' + m
        out.append(f"  share  .{shares}\n  reads  .{reads}\n"
                   f"  mean share {mean:.2f}; read most overall: {overall}")
    return out
