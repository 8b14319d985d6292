"""
GRPO for nanobridge: group-relative advantages, the clipped policy loss, each group's log-probs computed jointly,
the update, its health warnings, and the evaluation metrics at every width.
  - group_advantages: A_i = (r_i - mean(r)) / (std(r) + eps) per group (GRPO), or r_i - mean(r) (Dr. GRPO)
  - grpo_loss: PPO-style clipped surrogate + optional k3 KL, aggregated as dapo / grpo / dr_grpo
The Bridge paper trains with "a token-level normalized variant" of GRPO (DAPO, Yu et al. 2025), hence
loss_type='dapo' is the default. Formulas follow TRL's GRPOTrainer._compute_loss. The rewards are the task's
(tasks.py; grading.py for math).
"""
import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# group-relative advantages
def group_advantages(rewards, width, scale="group", eps=1e-4):
    """Advantage of each completion relative to its group of `width` contiguous rows. GRPO (DeepSeekMath):
    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), the same A for every token of o_i. Dr. GRPO (scale='none'):
    A_i = r_i - mean_g(r); dividing by std up-weights questions that are nearly always (or never) solved, a difficulty
    bias. std is unbiased (ddof=1) like TRL's and torch.std; a group of width 1 gets std 0, not NaN, so A = 0. A group
    of equal rewards gets A = 0: it carries no learning signal (DAPO's dynamic sampling drops such groups)."""
    if rewards.ndim != 1 or width < 1 or rewards.numel() % width != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of width {width}")
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
    """Clipped GRPO surrogate. logp, old_logp, ref_logp, mask: (B, T) per completion token; adv: (B,).
    Per token (PPO clip, DAPO clip-higher when eps_high > eps_low):
        r_t = exp(logp - old_logp)
        L_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
        KL_t = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3 estimator, >= 0)
    Aggregation over the masked tokens (|o_i| = number of completion tokens of row i):
        'dapo'    : sum_i sum_t L / sum_i |o_i|        DAPO token-level loss, the Bridge paper's choice
        'grpo'    : 1/B sum_i (1/|o_i|) sum_t L         DeepSeekMath; short answers weigh more per token
        'dr_grpo' : sum_i sum_t L / (B * max_tokens)   Dr. GRPO, a constant normaliser
    normalizer (dapo only): use this number instead of the local sum(mask). The tokens of one optimizer
    step are spread over micro-batches (and ranks) of different lengths, so policy_update passes the token
    count of the WHOLE batch on all ranks and then simply sums the gradients (distributed.Ranks.sync_grads).
    Returns (loss, stats); stats are python floats: clip_frac (= low + high), clip_low_frac,
    clip_high_frac, kl (mean k3, 0 when off) and ratio_mean, all over the masked tokens.
    Note: on-policy (old_logp = logp.detach()) r_t = 1 and the loss VALUE is ~0 (the advantages are
    centred), but its gradient -A/N * grad(logp) is not: watch the reward, not the loss."""
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
    A = adv.to(logp.dtype).unsqueeze(1)  # (B, 1): one advantage per sequence, broadcast over its tokens
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
    if loss_type == "dapo":
        denom = normalizer if normalizer is not None else n_tok.clamp(min=1)  # all-zero mask -> loss 0
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
    """The one function that computes log-probs (for the loss, old and reference policies): log p(tokens[t] |
    tokens[<t]) under softmax(logits / T), aligned with tokens[:, 1:]. With Bridge the whole group goes through
    the model together, under the same alive mask as at sampling, because each row's distribution depends on its
    siblings; any other recomputation gives a wrong importance ratio (bridge-paper.md sec. 9.7). The vocabulary
    head then runs in token chunks (fastpath.head_logprobs): memory does not grow with rows x tokens x V.
    start: skip the head before this position (prompts need no log-probs); those columns are 0."""
    _, nll = model(tokens[:, :-1], tokens[:, 1:], width=width, alive=alive[:, :-1], start=start,
                   temperature=temperature, reduction='none')
    return F.pad(-nll, (start, 0))

@dataclass
class Rollout:
    """prompts x width rows from generate(), plus rewards and per-row advantages."""
    tokens: torch.Tensor
    alive: torch.Tensor
    mask: torch.Tensor      # (B, T-1) completion tokens that enter the loss, aligned with tokens[:, 1:]
    adv: torch.Tensor
    width: int
    prompt_lens: torch.Tensor
    entropy: torch.Tensor | None = None  # (B, T-1) the sampler's per-token entropy, aligned like mask

    @classmethod
    def from_generation(cls, gen, rewards, width, scale='group', mask_truncated=False):
        mask = (gen.completion_mask & ~gen.from_env)[:, 1:]  # the tokens the policy chose, not the environment's
        if mask_truncated:  # DAPO's overlong filtering: a cut-off answer says nothing about its quality
            mask = mask & gen.finished[:, None]
        adv = group_advantages(rewards.to(gen.tokens.device), width, scale)
        ent = gen.entropy[:, 1:] if gen.entropy is not None else None
        return cls(gen.tokens, gen.alive, mask, adv, width, gen.prompt_lens, ent)

    def micro_batches(self, groups):
        """Row slices of whole groups: Bridge couples a group's rows, so a group is never split."""
        step = (groups or self.tokens.size(0) // self.width) * self.width
        return [slice(i, i + step) for i in range(0, self.tokens.size(0), step)]

def policy_update(model, ro, update, all_sum, micro_groups=0, ref=None, temperature=1.0, loss_type='dapo',
                  eps_low=0.2, eps_high=0.2, beta=0.0, num_iterations=1, max_tokens=None, autocast=None):
    """num_iterations optimizer steps on one rollout. The loss is normalised over the whole batch on every rank
    (tokens for dapo, rows for grpo/dr_grpo), so micro-batch and rank gradients simply add up."""
    autocast = autocast or nullcontext()
    mbs = ro.micro_batches(micro_groups)
    n_tok, n_rows = all_sum(ro.mask.sum(), ro.mask.size(0))
    old, refs = [None] * len(mbs), [None] * len(mbs)

    def logprobs(m, mb):  # a micro-batch's log-probs; logits only from its first completion token on
        return token_logprobs(m, ro.tokens[mb], ro.width, ro.alive[mb], temperature, int(ro.prompt_lens[mb].min()) - 1)
    with torch.no_grad(), autocast:
        for j, mb in enumerate(mbs):
            if num_iterations > 1:  # the policy moves after the first update, so freeze the sampling policy
                old[j] = logprobs(model, mb)
            if ref is not None and beta > 0:
                refs[j] = logprobs(ref, mb)
    sums = {}
    for it in range(num_iterations):
        for j, mb in enumerate(mbs):
            with autocast:
                logp = logprobs(model, mb)
            m = ro.mask[mb]
            kw = {'normalizer': n_tok} if loss_type == 'dapo' else {}
            loss, st = grpo_loss(logp, logp.detach() if old[j] is None else old[j], ro.adv[mb], m, refs[j], beta,
                                 eps_low, eps_high, loss_type, max_tokens, **kw)
            if loss_type != 'dapo':
                loss = loss * m.size(0) / n_rows  # per-row means: weight by this micro-batch's share of rows
            loss.backward()
            w = float(m.sum())
            # the sampling policy's entropy (nan if the rollout has none): a diagnostic, not part of the loss
            st['entropy'] = float((ro.entropy[mb] * m).sum() / max(w, 1)) if ro.entropy is not None else math.nan
            for k, v in st.items():  # token-weighted means, averaged over the inner iterations
                sums[k] = sums.get(k, 0.0) + v * w / max(n_tok, 1) / num_iterations
        sums['gnorm'] = sums.get('gnorm', 0.0) + update() / num_iterations
    keys = ['clip_frac', 'kl', 'entropy']
    return {**dict(zip(keys, all_sum(*[sums[k] for k in keys]))), 'gnorm': sums['gnorm']}

class Health:
    """GRPO's warnings, each said once, in words (the log line's columns show the numbers step by step): no learning
    signal (every group with zero reward std, `window` steps in a row), every completion truncated, and a collapse:
    the reward's mean over the last `window` steps has fallen below half of its best such mean (>= 0.1) and stayed
    there for `window` steps. A healthy run's 5-step mean moves by a few hundredths; a collapsing one keeps fewer right
    answers to learn from at every step, and rarely recovers (RESULTS.md, seed 4: 0.52 at step 1, 0.05 by step 30)."""
    window = 5

    def __init__(self):
        self.said, self.rewards, self.best, self.low, self.flat = set(), [], (0.0, 0), 0, 0

    def __call__(self, step, reward, zero_std, trunc, max_tokens):
        """The messages not said before, for this step's mean reward and its zero-std and truncated fractions."""
        w, r = self.window, self.rewards
        r.append(reward)
        mean = sum(r[-w:]) / w
        if len(r) >= w:  # a full window: one lucky step is not a best to fall from
            self.best = max(self.best, (mean, -step))
            self.low = self.low + 1 if mean < self.best[0] / 2 else 0
        # a near-deterministic policy has a step of all-equal groups now and then; `w` in a row means no signal
        self.flat = self.flat + 1 if zero_std == 1 and reward < 1 else 0
        news = {'std': self.flat >= w and f"grpo steps {step - w + 1}-{step}: every group has zero reward std, so "
                "there is no learning signal: check max_new_tokens, the reward and the prompt format (zero_std column)",
                'trunc': trunc == 1 and f"grpo step {step}: every completion hit max_new_tokens={max_tokens}",
                'collapse': self.low >= w and self.best[0] >= 0.1 and f"GRPO is collapsing: the reward, averaged over "
                f"{w} steps, reached {self.best[0]:.2f} at step {-self.best[1]} and has stayed below half of that for "
                f"{self.low} steps ({mean:.2f} now). With fewer right answers there is less to learn from at every "
                "step, and it rarely recovers: stop it, and rerun with a lower --lr, more --batch_prompts, or a KL "
                "term (--beta)"}
        out = [msg for k, msg in news.items() if msg and k not in self.said]
        self.said |= {k for k, msg in news.items() if msg}
        return out

# -----------------------------------------------------------------------------
# evaluation at every width
def eval_metrics(texts, problems, w, task, lengths, finished=None):
    """(sum, count) pairs (so ranks can add them up) for one width. Rows come in groups of w. finished: False for a
    row cut before its stop token, which scores 0 and gives no final answer (None: every row finished).
    acc: mean per-response accuracy; pass@w: >= 1 correct in the group; maj: the group's plurality answer is right;
    gpass@tau: >= ceil(tau * w) correct (G-Pass@w_tau, Liu et al. 2024, with n = k = w);
    agree: fraction of sibling pairs with the same final answer; fix: P(row correct | its own draft is wrong and the
    plurality of its siblings' drafts is right) - about 0 for independent rows, well above 0 if Bridge reads siblings
    (tasks whose answers carry a draft)."""
    done = [True] * len(texts) if finished is None else [bool(f) for f in finished]
    r = torch.tensor([task.reward(t, p) * f for t, p, f in zip(texts, problems, done)]).view(-1, w)
    G = r.size(0)
    finals = [task.final(t) if f else None for t, f in zip(texts, done)]
    m = {'acc': (r.sum().item(), r.numel()), 'pass@w': ((r.sum(1) > 0).sum().item(), G),
         'len': (float(lengths.sum()), r.numel())}
    for tau in (0.25, 0.5, 0.75, 1.0):
        m[f'gpass@{tau}'] = ((r.sum(1) >= math.ceil(tau * w)).sum().item(), G)
    maj, agree, pairs, fix, fix_n = 0, 0, 0, 0, 0
    for g in range(G):
        fs = finals[g * w:(g + 1) * w]
        top = Counter(f for f in fs if f is not None).most_common(1)
        maj += bool(top) and task.correct(top[0][0], problems[g * w])
        agree += sum(fs[i] is not None and fs[i] == fs[j] for i in range(w) for j in range(i + 1, w))
        pairs += w * (w - 1) // 2
        if task.draft and w > 1:
            drafts = [task.draft(t)[0] for t in texts[g * w:(g + 1) * w]]
            gold = problems[g * w]['answer']
            for i in range(w):
                sib = Counter(d for j, d in enumerate(drafts) if j != i and d is not None).most_common(1)
                if drafts[i] != gold and sib and sib[0][0] == gold:
                    fix, fix_n = fix + int(r[g, i] > 0), fix_n + 1
    return {**m, 'maj': (maj, G), 'agree': (agree, pairs), 'fix': (fix, fix_n)}  # a count of 0: undefined
