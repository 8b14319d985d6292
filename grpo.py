"""
GRPO for nanobridge: group-relative advantages, the clipped policy loss, each group's log-probs
computed jointly, and the update. (Its health warnings and the evaluation metrics are in
results.py.)
  - group_advantages: A_i = (r_i - mean(r)) / (std(r) + eps) per group (GRPO), or r_i - mean(r)
    (Dr. GRPO)
  - grpo_loss: PPO-style clipped surrogate + optional k3 KL, aggregated as dapo / grpo / dr_grpo
The Bridge paper trains with "a token-level normalized variant" of GRPO (DAPO, Yu et al. 2025;
docs/paper.md §3.2), hence loss_type='dapo' is the default. Formulas follow TRL's
GRPOTrainer._compute_loss. The rewards are the task's (tasks.py; grading.py for math).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# group-relative advantages
def group_advantages(rewards, width, scale="group", eps=1e-4):
    """Advantage of each completion relative to its group of `width` contiguous rows.
    GRPO (DeepSeekMath): A_i = (r_i - mean_g(r)) / (std_g(r) + eps), the same A for every token
    of o_i. Dr. GRPO (scale='none'): A_i = r_i - mean_g(r); dividing by std up-weights questions
    that are nearly always (or never) solved, a difficulty bias. std is unbiased (ddof=1) like
    TRL's and torch.std; a group of width 1 gets std 0, not NaN, so A = 0. A group of equal
    rewards gets A = 0: no learning signal (DAPO's dynamic sampling drops such groups)."""
    if rewards.ndim != 1 or width < 1 or rewards.numel() % width != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"width {width}")
    if scale not in ("group", "none"):
        raise ValueError(f"unknown scale {scale!r}; expected 'group' or 'none'")
    r = (rewards if rewards.is_floating_point() else rewards.float()).view(-1, width)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if width > 1 else torch.zeros_like(r)
        adv = adv / (std + eps)
    return adv.view(-1)

# -----------------------------------------------------------------------------
# the GRPO / DAPO / Dr. GRPO policy loss
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")

def grpo_loss(logp, old_logp, adv, mask, ref_logp=None, beta=0.0, eps_low=0.2, eps_high=0.2,
              loss_type="dapo", max_tokens=None, normalizer=None):
    """Clipped GRPO surrogate. logp, old_logp, ref_logp, mask: (B, T) per completion token;
    adv: (B,). Per token (PPO clip, DAPO clip-higher when eps_high > eps_low):
        r_t = exp(logp - old_logp)
        L_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
        KL_t = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3 estimator, >= 0)
    Aggregation over the masked tokens (|o_i| = number of completion tokens of row i):
        'dapo'    : sum_i sum_t L / sum_i |o_i|        DAPO token-level loss, the paper's choice
        'grpo'    : 1/B sum_i (1/|o_i|) sum_t L        DeepSeekMath; short answers weigh more
        'dr_grpo' : sum_i sum_t L / (B * max_tokens)   Dr. GRPO, a constant normaliser
    normalizer (dapo only): use this number instead of the local sum(mask). The tokens of one
    optimizer step are spread over micro-batches (and ranks) of different lengths, so backward()
    passes the token count of the WHOLE batch on all ranks and then simply sums the gradients
    (distributed.Ranks.sync_grads).
    Returns (loss, stats); stats are python floats: clip_frac (= low + high), clip_low_frac,
    clip_high_frac, kl (mean k3, 0 when off) and ratio_mean, all over the masked tokens.
    Note: on-policy (old_logp = logp.detach()) r_t = 1 and the loss VALUE is ~0 (the advantages
    are centred), but its gradient -A/N * grad(logp) is not: watch the reward, not the loss."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_type == "dr_grpo" and not max_tokens:
        raise ValueError("loss_type='dr_grpo' needs max_tokens (the max completion length)")
    if normalizer is not None and loss_type != "dapo":
        raise ValueError("normalizer only applies to loss_type='dapo'")
    B = logp.shape[0]
    assert old_logp.shape == logp.shape == mask.shape and adv.shape == (B,), "shape mismatch"
    m = mask.bool()
    maskf = m.to(logp.dtype)
    A = adv.to(logp.dtype).unsqueeze(1)  # (B, 1): one advantage per sequence, over its tokens
    # torch.where instead of multiplying by the mask: pad positions may hold -inf log-probs, and
    # exp(inf) * 0 = nan would poison both the loss and the gradient
    ratio = torch.exp(torch.where(m, logp - old_logp, 0.0))
    per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl = torch.zeros_like(per_token)
    if beta > 0 and ref_logp is not None:
        d = torch.where(m, ref_logp - logp, 0.0)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    per_token = per_token * maskf
    n_tok = maskf.sum()
    if loss_type == "dapo":  # an all-zero mask gives loss 0
        denom = normalizer if normalizer is not None else n_tok.clamp(min=1)
        loss = per_token.sum() / denom
    elif loss_type == "grpo":
        loss = (per_token.sum(-1) / maskf.sum(-1).clamp(min=1)).mean()
    else:  # dr_grpo
        loss = per_token.sum() / (B * max_tokens)
    with torch.no_grad():
        # the clip is active where the clamped branch wins: ratio above 1+eps_high with A > 0
        # (stop pushing a token up further) or below 1-eps_low with A < 0 (stop pushing it down)
        low = (ratio < 1 - eps_low) & (A < 0) & m
        high = (ratio > 1 + eps_high) & (A > 0) & m
        n = n_tok.clamp(min=1)
        stats = {"clip_frac": (low | high).sum() / n, "clip_low_frac": low.sum() / n,
                 "clip_high_frac": high.sum() / n, "kl": (kl * maskf).sum() / n,
                 "ratio_mean": (ratio * maskf).sum() / n}
    return loss, {k: v.item() for k, v in stats.items()}

# -----------------------------------------------------------------------------
# log-probs and the policy update
def token_logprobs(model, tokens, width, alive, temperature=1.0, start=0):
    """The one function that computes log-probs (for the loss, old and reference policies):
    log p(tokens[t] | tokens[<t]) under softmax(logits / T), aligned with tokens[:, 1:]. With
    Bridge the whole group goes through the model together, under the same alive mask as at
    sampling, because each row's distribution depends on its siblings; any other recomputation
    gives a wrong importance ratio (docs/paper.md §8.7). The vocabulary head then runs in token
    chunks (fastpath.head_logprobs): memory does not grow with rows x tokens x V.
    start: skip the head before this position (prompts need no log-probs); those columns are 0."""
    _, nll = model(tokens[:, :-1], tokens[:, 1:], width=width, alive=alive[:, :-1], start=start,
                   temperature=temperature, reduction='none')
    return F.pad(-nll, (start, 0))

@dataclass
class Rollout:
    """prompts x width rows from the sampler, plus rewards and per-row advantages."""
    tokens: torch.Tensor
    alive: torch.Tensor
    mask: torch.Tensor      # (B, T-1) completion tokens in the loss, aligned with tokens[:, 1:]
    adv: torch.Tensor
    width: int
    prompt_lens: torch.Tensor
    entropy: torch.Tensor | None = None  # (B, T-1) the sampler's per-token entropy, like mask

    @classmethod
    def from_generation(cls, gen, rewards, width, scale='group', mask_truncated=False):
        # the tokens the policy chose, not the environment's
        mask = (gen.completion_mask & ~gen.from_env)[:, 1:]
        if mask_truncated:  # DAPO's overlong filtering: a cut answer says nothing of its quality
            mask = mask & gen.finished[:, None]
        adv = group_advantages(rewards.to(gen.tokens.device), width, scale)
        ent = gen.entropy[:, 1:] if gen.entropy is not None else None
        return cls(gen.tokens, gen.alive, mask, adv, width, gen.prompt_lens, ent)

    def micro_batches(self, groups):
        """Row slices of whole groups: Bridge couples a group's rows, so a group is never split."""
        step = (groups or self.tokens.size(0) // self.width) * self.width
        return [slice(i, i + step) for i in range(0, self.tokens.size(0), step)]

def logprobs(model, ro, mb, temperature):
    """A micro-batch's log-probs (token_logprobs), the head run from its first completion on."""
    start = int(ro.prompt_lens[mb].min()) - 1
    return token_logprobs(model, ro.tokens[mb], ro.width, ro.alive[mb], temperature, start)

@torch.no_grad()
def frozen_logprobs(model, ro, mbs, temperature, ref=None, beta=0.0, num_iterations=1,
                    autocast=None):
    """([old], [ref]) per micro-batch, computed before any update. old: the sampling policy's
    log-probs when it will move between inner iterations (num_iterations > 1; else None: the
    ratio's denominator is the detached current log-prob). ref: the KL reference's, if beta > 0."""
    old, refs = [None] * len(mbs), [None] * len(mbs)
    with autocast or nullcontext():
        for j, mb in enumerate(mbs):
            if num_iterations > 1:
                old[j] = logprobs(model, ro, mb, temperature)
            if ref is not None and beta > 0:
                refs[j] = logprobs(ref, ro, mb, temperature)
    return old, refs

def backward(model, ro, mb, old, ref_logp, n_tok, n_rows, temperature=1.0, loss_type='dapo',
             eps_low=0.2, eps_high=0.2, beta=0.0, max_tokens=None, autocast=None):
    """One micro-batch of whole groups: its loss and backward -> its statistics, each weighted by
    its share of the step's n_tok loss tokens (the micro-batches' add up to the step's means).
    The loss is normalised over the whole batch on every rank (tokens for dapo, rows for grpo and
    dr_grpo), so micro-batch and rank gradients simply add up."""
    with autocast or nullcontext():
        logp = logprobs(model, ro, mb, temperature)
    m = ro.mask[mb]
    kw = {'normalizer': n_tok} if loss_type == 'dapo' else {}
    denominator = logp.detach() if old is None else old
    loss, st = grpo_loss(logp, denominator, ro.adv[mb], m, ref_logp, beta, eps_low, eps_high,
                         loss_type, max_tokens, **kw)
    if loss_type != 'dapo':
        loss = loss * m.size(0) / n_rows  # per-row means: weight by this micro-batch's rows
    loss.backward()
    w = float(m.sum())
    # the sampling policy's entropy (nan if the rollout has none): a diagnostic, not in the loss
    st['entropy'] = math.nan
    if ro.entropy is not None:
        st['entropy'] = float((ro.entropy[mb] * m).sum() / max(w, 1))
    return {k: v * w / max(n_tok, 1) for k, v in st.items()}

def accumulate(model, ro, mbs, old, refs, n_tok, n_rows, **kw):
    """backward() over every micro-batch of one inner iteration -> their statistics, summed: the
    step's token-weighted means (the gradients add up in .grad)."""
    sums = {}
    for j, mb in enumerate(mbs):
        for k, v in backward(model, ro, mb, old[j], refs[j], n_tok, n_rows, **kw).items():
            sums[k] = sums.get(k, 0.0) + v
    return sums

def gradients(model, ro, micro_groups=0, temperature=1.0, autocast=None, **kw):
    """One rank's gradients of one rollout, one inner iteration, no KL reference: what one step of
    train.grpo_stage computes on a single rank (bench.py and the tests call it) -> its stats."""
    mbs = ro.micro_batches(micro_groups)
    old, refs = frozen_logprobs(model, ro, mbs, temperature, autocast=autocast)
    n_tok, n_rows = float(ro.mask.sum()), ro.mask.size(0)
    return accumulate(model, ro, mbs, old, refs, n_tok, n_rows, temperature=temperature,
                      autocast=autocast, **kw)
