"""
GRPO for nanobridge: verifiable rewards, group-relative advantages and the clipped policy loss.

Everything in the first part of this file is model-independent and pure:
  - math answer extraction + Hendrycks-style grading (exact Fraction arithmetic, no sympy, no eval)
  - group_advantages: A_i = (r_i - mean(r)) / (std(r) + eps) per group (GRPO), or r_i - mean(r) (Dr. GRPO)
  - grpo_loss: PPO-style clipped surrogate + optional k3 KL, aggregated as dapo / grpo / dr_grpo
The Bridge paper trains with "a token-level normalized variant" of GRPO (DAPO, Yu et al. 2025),
hence loss_type='dapo' is the default. Formulas follow TRL's GRPOTrainer._compute_loss.
"""
import json
import math
import random
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# answer extraction and grading
# Rewards run on untrusted model output, so every input is bounded: we only look at the tail of a
# completion, answers longer than MAX_ANSWER_CHARS are "no answer", and numbers with more than
# MAX_NUM_DIGITS digits are compared as strings (int() of a huge string is slow and, since
# Python 3.11, raises beyond 4300 digits).
MAX_TEXT_CHARS = 10_000
MAX_ANSWER_CHARS = 2_000
MAX_NUM_DIGITS = 100

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_GSM_RE = re.compile(r"####[ \t]*([^\n]*)")
# last-number fallback: "1,234.5", "-3", "2/3", ".5"; a '-' counts only if it is not a binary minus
_NUM_RE = re.compile(r"(?:(?<![0-9a-zA-Z)])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")

def _closing_brace(s, i=0):
    """Index of the '}' that closes the '{' at s[i], or None if it never closes."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return None

def _last_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} / '\\boxed 5'. None if absent or malformed."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    i = boxes[-1].end()
    if text[i:i + 1] == "{":
        # match braces by depth so that \boxed{\frac{1}{2}} returns \frac{1}{2}
        j = _closing_brace(text, i)
        return None if j is None else text[i + 1:j]  # unbalanced: a box that never closes -> no answer
    bare = re.match(r"[ \t]+([^\s$]+)", text[i:])  # Hendrycks also accepts "\boxed 5"
    # the last box decides; a malformed last box is "no answer", we do not go back to earlier boxes
    return bare.group(1) if bare else None

def extract_answer(text, fallback=True):
    """Final answer of a completion: last \\boxed{}, else GSM8K '#### n', else (fallback) the last number."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_TEXT_CHARS:]
    if _BOX_RE.search(text):  # a box is an explicit final answer: no fallback past it, even if malformed
        return _last_boxed(text)
    gsm = [g.strip() for g in _GSM_RE.findall(text) if g.strip()]
    if gsm:
        return gsm[-1]
    if fallback:
        nums = _NUM_RE.findall(text)
        return nums[-1] if nums else None
    return None

def normalize_answer(s):
    """Hendrycks MATH `_strip_string`, extended: canonical string form of an answer ('' = no answer)."""
    s = "" if s is None else str(s).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return ""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("\\displaystyle", "")
    s = re.sub(r"\\[td]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # LaTeX spacing; "1\,234" and "1{,}234" are thousands separators
    s = s.replace("{,}", ",").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", "")
    # trailing units: "5\text{ cm}", "5 \mbox{cm}^2" -> "5" (only after a number or a closing brace)
    s = re.sub(r"(?<=[0-9}.])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\^\{?\d\}?)?\s*$", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)  # unwrap \text{Evelyn} -> Evelyn
    # plain-word units after a bare number: "12 dollars", "5 cm" -> "12", "5"
    s = re.sub(r"^(-?[\d.,]+(?:/\d+)?)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*\.?$", r"\1", s)
    # short "x = 5" / "k=5" prefixes (Hendrycks keeps the rhs when the lhs has <= 2 chars)
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1]
    while s.startswith("{") and _closing_brace(s) == len(s) - 1:  # \boxed{{5}}: redundant grouping braces
        s = s[1:-1].strip()
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return s.rstrip(".")

_DEC = r"-?(?:\d+(?:\.\d*)?|\.\d+)"

def _to_fraction(s):
    """Exact value of a normalised numeric answer (int, decimal, 1,234, a/b, \\frac{a}{b}), else None."""
    if sum(c.isdigit() for c in s) > MAX_NUM_DIGITS:
        return None
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators; "1,2" stays a tuple
        s = s.replace(",", "")
    if re.fullmatch(_DEC, s):
        return Fraction(s)
    m = re.fullmatch(rf"(-?)(?:\\frac\{{({_DEC})\}}\{{({_DEC})\}}|({_DEC})/({_DEC}))", s)
    if m:
        num, den = Fraction(m.group(2) or m.group(4)), Fraction(m.group(3) or m.group(5))
        if den == 0:
            return None
        return -num / den if m.group(1) else num / den
    return None

def is_equiv(pred, gold):
    """True if pred and gold are the same answer: exact numeric equality, else normalised string equality."""
    try:
        a, b = normalize_answer(pred), normalize_answer(gold)
        if not a or not b:
            return False
        fa, fb = _to_fraction(a), _to_fraction(b)
        if fa is not None and fb is not None:
            return fa == fb  # Fraction: 0.5 == 1/2 == \frac{1}{2} exactly, no float round-off
        return a == b
    except Exception:  # a reward must never crash a training run
        return False

def gold_answer(gold):
    """Gold answer from a dataset field: GSM8K '... #### 72' -> '72', a MATH solution -> its last box."""
    if not isinstance(gold, str):
        return None if gold is None else str(gold)
    if "####" in gold:
        return gold.split("####")[-1].strip()
    if _BOX_RE.search(gold):
        return _last_boxed(gold[-MAX_TEXT_CHARS:])
    return gold.strip()

def math_reward(text, gold, fallback=True):
    """1.0 if the completion's final answer equals the gold answer, else 0.0 (never raises)."""
    try:
        return 1.0 if is_equiv(extract_answer(text, fallback), gold_answer(gold)) else 0.0
    except Exception:
        return 0.0

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
    count of the WHOLE batch on all ranks and then simply sums the gradients (train.sync_grads).
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
# data: the embedded procedural task and JSONL readers
def addition_problems(split, digits=2, n_test=512):
    """Embedded task: 'ab+cd=' -> 'SSS;SSS', a draft sum then the final sum (zero-padded so every row of a group
    writes its final digits at the same timesteps, where Bridge can compare them). Reward is on the final only,
    so a row whose draft is wrong can still be saved by reading its siblings. The held-out split is a fixed
    hash of the operands, so train and test never overlap at any difficulty."""
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    n, out = 10 ** digits, []
    held_out = lambda a, b: (a * 7919 + b * 104729) % 16 == 0
    if n * n <= 200_000:
        pairs = [(a, b) for a in range(n) for b in range(n)]
    else:
        rng = random.Random(0)
        pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(200_000)]
    for a, b in pairs:
        if held_out(a, b) == (split == 'test'):
            s = f"{a + b:0{digits + 1}d}"
            out.append({'prompt': f"{a:0{digits}d}+{b:0{digits}d}=", 'answer': s, 'response': f"{s};{s}"})
    if split == 'test':
        random.Random(1).shuffle(out)
        out = out[:n_test]
    return out

def skewed_digits(n, generator, k=10):
    """n symbols floor(k u^4), u ~ U(0, 1): the largest of 4 is uniform over 0..k-1, so at width 4 no answer is
    likelier than another, and a row that sees only its own symbol can do no better than answer it."""
    return (k * torch.rand(n, generator=generator) ** 4).long()

def max_chance(w, k=10):
    """The Bayes limit of a row that sees only its own symbol s (skewed_digits) when the answer is the largest of
    its w rows: sum_s P(s) max_m P(max = m | s). 1 at w=1, 0.347 at w=4 (k=10), where the best guess is s itself."""
    F = lambda j: ((j + 1) / k) ** 0.25 if j >= 0 else 0.0  # P(symbol <= j)
    return sum((F(s) - F(s - 1)) * max(F(m) ** (w - 1) - (F(m - 1) ** (w - 1) if m > s else 0) for m in range(s, k))
               for s in range(k))

def maxdigit_problems(split, n=4096):
    """The positive control (task='maxdigit'): every prompt is 'max?', the environment writes 'd;' (d from
    skewed_digits) and the stop token, the policy writes only F, and the reward asks for F = the largest d of the
    group, which only siblings can tell. The SFT responses are self-only: F is d half the time, else a random
    digit, so GRPO starts from a policy that never reads siblings but still explores (after SFT on 'd;d' alone, F
    was nearly deterministic and sibling reading took off in 1 seed of 3)."""
    g = torch.Generator().manual_seed(int(split == 'test'))
    d, r = skewed_digits(n, g), torch.randint(10, (n,), generator=g)
    f = torch.where(torch.rand(n, generator=g) < 0.5, r, d)
    return [{'prompt': 'max?', 'answer': None, 'response': f"{x};{y}"}
            for x, y in zip(d.tolist(), f.tolist())]

def maxdigit_env(tok, seed):
    """The positive control's environment (generate's env hook): it writes 'd;' and the stop token, the policy only F.
    Its digits come from a generator of their own, not the sampler's random stream."""
    g, fixed = torch.Generator().manual_seed(seed), {1: tok.encode(';')[0], 3: tok.eos_id}
    def env(s, tokens, pos):
        if s == 0:  # a digit the policy cannot choose
            return torch.tensor(tok.encode('0123456789'))[skewed_digits(len(pos), g)].to(pos.device)
        return torch.full_like(pos, fixed[s]) if s in fixed else None
    return env

def maxdigit_answers(texts, w):
    """The gold answer of every row: the largest digit the environment wrote (each text's first character) in its group."""
    return [max(t[:1] for t in texts[i - i % w:i - i % w + w]) for i in range(len(texts))]

def final_answer(text):
    """'draft;final' -> (draft, final); either may be None."""
    draft, _, final = text.partition(';')
    return draft.strip() or None, (final.strip() or None) if _ else None

def add_reward(text, answer):
    return 1.0 if final_answer(text)[1] == answer else 0.0

def read_jsonl(path, kind, keys=None):
    """GSM8K (question, answer '... #### n'), MATH (problem, solution with \\boxed{}), or generic (prompt, answer):
    keys=(prompt_key, answer_key) reads any other layout, e.g. ('problem', 'answer') for AIME/AMC/MATH-500 files."""
    keys = keys or {'gsm8k': ('question', 'answer'), 'math': ('problem', 'solution'), 'jsonl': ('prompt', 'answer')}[kind]
    out = []
    with open(path, encoding='utf-8') as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                q, a = d[keys[0]], d[keys[1]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected a JSON object with {keys} ({type(e).__name__}: {e})") from None
            gold = gold_answer(a) if kind != 'math' else extract_answer(a, fallback=False)
            if gold is None:
                raise ValueError(f"{path}:{i}: no final answer found in {keys[1]!r}")
            out.append({'prompt': q, 'answer': gold, 'response': str(a)})
    if not out:
        raise ValueError(f"{path}: the dataset is empty")
    return out

# -----------------------------------------------------------------------------
# log-probs and the policy update
def token_logprobs(model, tokens, width, alive, temperature=1.0, start=0):
    """The one function that computes log-probs (for the loss, old and reference policies): log p(tokens[t] |
    tokens[<t]) under softmax(logits / T), aligned with tokens[:, 1:]. With Bridge the whole group goes through
    the model together, under the same alive mask as at sampling, because each row's distribution depends on its
    siblings; any other recomputation gives a wrong importance ratio (bridge-paper.md sec. 9.7). The vocabulary
    head then runs in token chunks (model.head_logprobs): memory does not grow with rows x tokens x V.
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
    signal (every group has zero reward std), every completion truncated, and a collapse: reward 0 on every group for
    10 steps after it had reached 0.2, from which GRPO does not recover (no right answer is left to learn from)."""

    def __init__(self):
        self.said, self.best, self.zeros = set(), (0.0, 0), 0

    def __call__(self, step, reward, zero_std, trunc, max_tokens):
        """The messages not said before, for this step's mean reward and its zero-std and truncated fractions."""
        self.best, self.zeros = max(self.best, (reward, -step)), self.zeros + 1 if reward == 0 else 0
        news = {'std': zero_std == 1 and reward < 1 and f"grpo step {step}: every group has zero reward std, so "
                "there is no learning signal: check max_new_tokens, the reward and the prompt format (zero_std column)",
                'trunc': trunc == 1 and f"grpo step {step}: every completion hit max_new_tokens={max_tokens}",
                'collapse': self.zeros >= 10 and self.best[0] >= 0.2 and f"GRPO has collapsed: reward 0 on every group "
                f"for the last {self.zeros} steps, after {self.best[0]:.2f} at step {-self.best[1]}. No sampled answer "
                "is right any more, so there is nothing to learn from: stop it, and rerun with a lower --lr or more "
                "--batch_prompts"}
        out = [msg for k, msg in news.items() if msg and k not in self.said]
        self.said |= {k for k, msg in news.items() if msg}
        return out

# -----------------------------------------------------------------------------
# evaluation at every width
def eval_metrics(texts, problems, w, reward_fn, draft_fn, lengths):
    """(sum, count) pairs (so ranks can add them up) for one width. Rows come in groups of w.
    acc: mean per-response accuracy; pass@w: >= 1 correct in the group; maj: the group's plurality answer is right;
    gpass@tau: >= ceil(tau * w) correct (G-Pass@w_tau, Liu et al. 2024, with n = k = w);
    agree: fraction of sibling pairs with the same final answer; fix: P(row correct | its own draft is wrong and the
    plurality of its siblings' drafts is right) - about 0 for independent rows, well above 0 if Bridge reads siblings."""
    r = torch.tensor([reward_fn(t, p) for t, p in zip(texts, problems)]).view(-1, w)
    G = r.size(0)
    finals = [(draft_fn(t)[1] if draft_fn else extract_answer(t)) for t in texts]
    m = {'acc': (r.sum().item(), r.numel()), 'pass@w': ((r.sum(1) > 0).sum().item(), G),
         'len': (float(lengths.sum()), r.numel())}
    for tau in (0.25, 0.5, 0.75, 1.0):
        m[f'gpass@{tau}'] = ((r.sum(1) >= math.ceil(tau * w)).sum().item(), G)
    maj, agree, pairs, fix, fix_n = 0, 0, 0, 0, 0
    for g in range(G):
        fs = finals[g * w:(g + 1) * w]
        top = Counter(f for f in fs if f is not None).most_common(1)
        maj += bool(top) and reward_fn(f";{top[0][0]}" if draft_fn else f"\\boxed{{{top[0][0]}}}", problems[g * w]) > 0
        agree += sum(fs[i] is not None and fs[i] == fs[j] for i in range(w) for j in range(i + 1, w))
        pairs += w * (w - 1) // 2
        if draft_fn and w > 1:
            drafts = [draft_fn(t)[0] for t in texts[g * w:(g + 1) * w]]
            gold = problems[g * w]['answer']
            for i in range(w):
                sib = Counter(d for j, d in enumerate(drafts) if j != i and d is not None).most_common(1)
                if drafts[i] != gold and sib and sib[0][0] == gold:
                    fix, fix_n = fix + int(r[g, i] > 0), fix_n + 1
    return {**m, 'maj': (maj, G), 'agree': (agree, pairs), 'fix': (fix, fix_n)}  # a count of 0: undefined

def format_table(results):
    widths = [k for k in results if isinstance(k, int)]
    cols = ['acc', 'pass@w', 'maj', 'gpass@0.25', 'gpass@0.5', 'gpass@0.75', 'gpass@1.0', 'agree', 'fix',
            'width_gain', 'chance', 'sibling', 'len']
    lines = ['width ' + ' '.join(f"{c:>10}" for c in cols)]
    for w in widths:
        lines.append(f"{w:>5} " + ' '.join(f"{results[w][c]:>10.3f}" if c in results[w] else f"{'-':>10}"
                                           for c in cols))
    for key, what in (('bridge_norm_ratio', 'Bridge output / residual norm'),
                      ('bridge_sibling_share', "share of a row's Bridge attention on its siblings")):
        if results.get(key):
            lines.append(f"{what} per layer at width {results['probe_width']}: "
                         + ' '.join(f"{v:.3g}" for v in results[key].values()))
    return '\n'.join(lines)
