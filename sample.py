"""
Sampling: token sampling, and interdependent N-wide generation with a static KV cache, where the N rows of a prompt
decode in lock-step so that Bridge can mix them at every position. CLI:

    python sample.py --init_from=DIR --prompt="What is 12 times 7?" --width=8
"""
import functools
import math
import os
import time
from dataclasses import dataclass

import torch

from settings import UserError

# -----------------------------------------------------------------------------
# N-wide generation: one prefill per prompt, its KV cache copied to `width` rows, rows decode in lock-step
@dataclass
class Generation:
    tokens: torch.Tensor       # (B, T) prompt + completion per row, right-padded with pad_id; row b = prompt b // width
    prompt_lens: torch.Tensor  # (B,) prompt length of each row
    lengths: torch.Tensor      # (B,) completion tokens per row, the stop token included
    finished: torch.Tensor     # (B,) True if the row ended on a stop token (False = truncated)
    logprobs: torch.Tensor     # (B, T) log p(token at t) under softmax(logits / temperature); 0 outside completions
    alive: torch.Tensor        # (B, T) the Bridge mask the sampler used, per *input* position
    from_env: torch.Tensor     # (B, T) True where `env` wrote the token: not sampled, log-prob 0, kept out of the loss
    width: int
    entropy: torch.Tensor | None = None  # (B, T) entropy of the distribution each token was drawn from (entropy=True)

    @property
    def completion_mask(self):
        t = torch.arange(self.tokens.size(1), device=self.tokens.device)
        return (t >= self.prompt_lens[:, None]) & (t < (self.prompt_lens + self.lengths)[:, None])

    def completions(self, drop_stop=True):
        """Each row's completion ids, without its stop token unless drop_stop=False."""
        n = self.lengths - (self.finished.long() if drop_stop else 0)
        return [self.tokens[b, p:p + k].tolist() for b, (p, k) in enumerate(zip(self.prompt_lens.tolist(), n.tolist()))]

@functools.cache  # the largest divisor of V up to sqrt(V): K chunks of V // K (K = 1 for a prime V)
def n_chunks(V): return next(d for d in range(math.isqrt(V), 0, -1) if V % d == 0)

def distribution(logits, temperature, top_k, top_p, entropy=False):
    """logits (B, V) -> (probs (B, V) of softmax(logits / T), the weights to draw from (probs after top-k/top-p, not
    renormalised), entropy (B,) of probs or None). T = 0 leaves probs at T = 1 (greedy draws the argmax)."""
    x = logits.float() / temperature if temperature not in (0, 1) else logits.float()
    # one fused softmax, not log_softmax + exp: with a 150k vocabulary every full pass costs ~0.05 ms per row
    probs = torch.softmax(x, -1)
    ent = None
    if entropy:  # H = logsumexp(x) - sum p x, and logsumexp(x) = x_i - log p_i for any i: take the likeliest
        pmax, imax = probs.max(-1, keepdim=True)
        with torch.autocast(x.device.type, enabled=False):  # a bf16 dot over 150k terms is off by ~0.1 nats
            ent = (x.gather(-1, imax) - pmax.log())[:, 0] - (probs[:, None] @ x[:, :, None])[:, 0, 0]
    sample = probs
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        sample = sample.masked_fill(logits < kth, 0.0)
    if top_p < 1.0:
        sorted_p, order = torch.sort(sample, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p * sorted_p.sum(-1, keepdim=True)  # keep the smallest
        sample = sample.masked_fill(drop.scatter(-1, order, drop), 0.0)                    # prefix with mass >= p
    return probs, sample, ent

def race(sample, exponentials):
    """Exact sampling in two levels, first a chunk of the vocabulary by its mass, then a token inside it, each by the
    exponential race (argmax_i w_i / E_i with E_i ~ Exp(1) picks i with probability w_i / sum w). A scan over all V
    entries (cumsum, or the V random draws of torch.multinomial) costs more than the matmul that made the logits;
    this needs one sum and ~2 sqrt(V) random numbers, and never syncs with the host. exponentials(w, level) -> E,
    shaped like w (level 0: the chunks, 1: the tokens of the chosen chunk)."""
    B, V = sample.shape
    K = n_chunks(V)
    chunks = sample.reshape(B, K, V // K)
    # (E is clamped above 0: a draw may be exactly 0, and 0 / 0 would let a zero-mass entry win)
    pick = lambda w, level: (w / exponentials(w, level).clamp_(min=1e-30)).argmax(-1)
    j = pick(chunks.sum(-1), 0)
    return j * (V // K) + pick(torch.take_along_dim(chunks, j[:, None, None], 1)[:, 0], 1)

def sample_token(logits, temperature, top_k, top_p, generator, entropy=False):
    """logits (B, V) -> (token (B,), log-prob (B,) of that token under softmax(logits / T), entropy (B,) of that
    distribution or None). The log-prob and the entropy are the ones GRPO uses (temperature-scaled, before
    top-k/top-p truncation; T = 0 reports them at T = 1)."""
    probs, sample, ent = distribution(logits, temperature, top_k, top_p, entropy)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        tok = race(sample, lambda w, level: torch.empty_like(w).exponential_(generator=generator))
    return tok, probs.gather(-1, tok[:, None])[:, 0].log(), ent

@torch.no_grad()
def generate(model, prompts, width=1, max_new_tokens=256, temperature=1.0, top_k=None, top_p=1.0, stop_ids=(),
             seed=None, pad_id=None, check_every=None, compile=False, entropy=False, env=None):
    """prompts: list of token-id lists (lengths may differ). Returns a Generation with len(prompts) * width rows;
    the `width` rows of prompt p are rows p*width .. p*width+width-1 and always sit at the same timestep, which
    is what Bridge needs: at every step its siblings' hidden states exist at the same position.
    env: an environment or tool that writes tokens itself (multi-turn RL): env(steps, tokens, pos, u) is called at
    every step with each row's step s (B,), the (B, T) tokens so far, the (B,) positions about to be written and a
    (B,) uniform for the environment's own draws; it returns None or (B,) ids,
    where an id >= 0 replaces that row's sampled token. Rows and siblings read it like any token, but it is marked
    in from_env and gets log-prob 0: the policy did not choose it, so GRPO leaves it out of the loss."""
    for bad, msg in ((width < 1, f"width={width} must be >= 1"), (temperature < 0, f"temperature={temperature} must "
                      "be >= 0 (0 = greedy)"), (max_new_tokens < 1, f"max_new_tokens={max_new_tokens} must be >= 1"),
                     (not 0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]"),
                     (not prompts or any(len(p) == 0 for p in prompts), "every prompt needs at least one token")):
        if bad:
            raise UserError(msg)
    ctx = model.config.max_position_embeddings
    P, B, dev = len(prompts), len(prompts) * width, model.lm_head.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    Lmax = int(lens.max())
    if Lmax + max_new_tokens > ctx:
        raise UserError(f"prompt of {Lmax} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                        f"context of {ctx} (max_position_embeddings)")
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    pad = int(stop[0]) if pad_id is None and stop_ids else (pad_id or 0)
    check_every = check_every or (1 if dev.type == 'cpu' else 8)  # a host sync is free on CPU, costly on GPU
    # optional: compile the one-token decode step (static shapes, so it compiles once; 'reduce-overhead' adds CUDA
    # graphs on GPU). The prefill stays eager: its shape changes with every batch of prompts. Not with a BridgeProbe
    # attached: its Python bookkeeping must run at every step (train.py and the CLI do not ask for both).
    step = torch.compile(model, dynamic=False, mode='reduce-overhead' if dev.type == 'cuda' else None) \
        if compile else model
    gen = torch.Generator(device=dev)
    # (not torch.seed(): that would reseed the global RNG)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
    # 1) one prefill for all prompts (right-padded; padding sits after each prompt so causal attention ignores it)
    x = torch.tensor([list(p) + [pad] * (Lmax - len(p)) for p in prompts]).to(dev)  # one host-to-device copy
    T = Lmax + max_new_tokens
    cache = model.make_cache(B, -(-T // 64) * 64 if compile else T)  # compiled: fewer distinct shapes to compile
    if compile:  # the cache is mutated in place at fixed addresses: say so, or CUDA graphs are not captured
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
    pre = model.make_cache(P, Lmax)
    logits, _ = model(x, cache=pre, last=lens - 1)
    cache.expand_from(pre, width)  # 2) every prompt's cache goes to its `width` rows; logits likewise
    del pre
    logits = logits[:, 0].repeat_interleave(width, 0)
    plen = lens.repeat_interleave(width)
    tokens = torch.full((B, T), pad, dtype=torch.long, device=dev)
    tokens[:, :Lmax] = x.repeat_interleave(width, 0)
    logprobs = torch.zeros(B, T, device=dev)
    ents = torch.zeros(B, T, device=dev) if entropy else None  # GRPO's entropy diagnostic, nearly free here
    alive = torch.zeros(B, T, dtype=torch.bool, device=dev)
    from_env = torch.zeros(B, T, dtype=torch.bool, device=dev)
    alive[:, :Lmax] = torch.arange(Lmax, device=dev) < plen[:, None]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    # 3) lock-step decode: at step s every row feeds its token s-1 at position plen + s - 1
    for s in range(max_new_tokens):
        if s > 0:
            pos = plen + s - 1
            alive[rows, pos] = ~finished  # a row stops being a Bridge key from the position of its stop token
            # attend only over the filled part of the cache; compiled, keep every step's shapes static instead
            cache.kv_len = cache.k.size(3) if compile else Lmax + s
            logits, _ = step(tok[:, None], width=width, alive=(~finished)[:, None], cache=cache, pos=pos)
            logits = logits[:, 0]
        tok, lp, ent = sample_token(logits, temperature, top_k, top_p, gen, entropy)
        if env is not None and (forced := env(torch.full_like(plen, s), tokens, plen + s,
                                              torch.rand(B, generator=gen, device=dev))) is not None:  # env wins
            hit = (forced >= 0) & ~finished
            from_env[rows, plen + s] = hit
            tok, lp = torch.where(hit, forced, tok), torch.where(hit, 0.0, lp)
        tok = torch.where(finished, pad, tok)
        tokens[rows, plen + s] = tok
        logprobs[rows, plen + s] = torch.where(finished, 0.0, lp)
        if entropy:
            ents[rows, plen + s] = torch.where(finished, 0.0, ent)
        lengths += ~finished
        finished |= torch.isin(tok, stop)
        if (s + 1) % check_every == 0 and bool(finished.all()):  # the only host sync in the loop
            break
    n = int((plen + lengths).max())
    return Generation(tokens[:, :n], plen, lengths, finished, logprobs[:, :n], alive[:, :n], from_env[:, :n],
                      width, ents[:, :n] if entropy else None)

def bridge_view(probe, gen):
    """sample.py --show_bridge: what every row read from its siblings, per generated token. probe: a
    BridgeProbe(keep=True) that saw generate(): one call per Bridge layer for every decode step, each row's attention
    over its group averaged over heads; token s (s >= 1) was chosen by decode step s. Token 0 comes from the shared
    prefill, where the siblings are identical copies ('.')."""
    calls, L, W = probe.kept, len(probe.layer), gen.width
    if not calls:
        return ["  (no cross-row attention to show: width 1, or a self/pmatch model)"] * (gen.tokens.size(0))
    att = torch.stack([torch.stack(calls[k:k + L]).mean(0)[:, -1] for k in range(0, len(calls), L)], 1).float().cpu()
    most = lambda w, who: '=' if len(w) > 1 and w.max() - w.min() <= 0.01 * w.max() else who[int(w.argmax())]
    out = []
    for b, n in enumerate(gen.lengths.tolist()):
        sibs = [j for j in range(W) if j != b % W]
        who, s = ['123456789abcdefghijklmnopqrstuvwxyz?'[min(j, 35)] for j in sibs], att[b, :n - 1, sibs]
        m = most(s.sum(0), who)  # s: its siblings' weights at every token after the first; their sum is its share
        out.append(f"  share  .{''.join(str(min(9, int(10 * v))) for v in s.sum(1).tolist())}\n"
                   f"  reads  .{''.join(most(w, who) for w in s)}\n  mean share {s.sum(1).mean() if n > 1 else 0:.2f}; "
                   f"read most overall: {'no sibling more than another' if m == '=' else 'answer ' + m}")
    return out

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from probe import BridgeProbe
    from checkpoint import DTYPES, load_model
    from distributed import free_cores
    from fastpath import fuse
    from tokenizer import Tokenizer
    init_from = 'out/ckpt'  # an HF checkpoint directory (train.py writes out/ckpt)
    prompt = '12+34='       # "FILE:path" reads the prompt from a file
    system = ''             # system message ('' = the template's default, if any)
    chat_template = 'auto'  # 'auto' = the checkpoint's template if it has one, else the raw prompt | 'plain' | 'none'
    width = 4               # N interdependent answers
    max_new_tokens = 64
    temperature = 0.8
    top_k = 0
    top_p = 1.0
    seed = 1337
    device = 'auto'
    dtype = 'auto'          # 'auto' = bfloat16 on CUDA, float32 on CPU
    compile = False         # torch.compile the one-token decode step (not with show_bridge, which reads every step)
    show_bridge = False     # after each answer: per token, the share of its Bridge attention that went to siblings
    threads = 0             # CPU threads; 0 = pick from the free cores
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if device.split(':')[0] not in ('cpu', 'cuda') or (device.startswith('cuda') and not torch.cuda.is_available()):
        raise UserError(f"device={device!r}: expected auto, cpu or cuda[:N] (with CUDA available)")
    if dtype != 'auto' and dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
    dt = DTYPES[dtype] if dtype != 'auto' else (torch.bfloat16 if device.startswith('cuda') else torch.float32)
    if prompt.startswith('FILE:'):
        with open(prompt[5:], encoding='utf-8') as f:
            prompt = f.read()
    torch.set_num_threads(threads or free_cores())
    model = fuse(load_model(init_from, device=device, dtype=dt))
    tok = Tokenizer.from_pretrained(init_from)
    if show_bridge and model.bridge_config is None:
        raise UserError(f"--show_bridge=True but {init_from} has no Bridge blocks (config.json has no 'bridge' entry)")
    probe = BridgeProbe(model, keep=True) if show_bridge else None
    raw = chat_template == 'none' or (chat_template == 'auto' and tok.chat_template is None)
    ids = tok.encode(prompt) if raw else \
        tok.encode_chat(prompt, system or None, 'plain' if chat_template == 'plain' else None)
    t0 = time.time()
    out = generate(model, [ids], width, max_new_tokens, temperature, top_k or None, top_p, tok.stop_ids, seed,
                   compile=compile and not show_bridge)
    dt_s = time.time() - t0
    views = bridge_view(probe, out) if probe else None
    if views:
        print("Bridge, per generated token: share = the tenths (0-9) of this answer's Bridge attention that went to "
              "its siblings rather than itself, averaged over heads and layers; reads = the sibling it read most "
              "('=': none by 1% more than another)")
    for i, c in enumerate(out.completions()):
        cut = '' if out.finished[i] else ', truncated'
        print(f"--- answer {i + 1}/{width} ({len(c)} tokens{cut})\n{tok.decode(c)}")
        if views:
            print(views[i])
    n = int(out.lengths.sum())
    print(f"--- {n} tokens in {dt_s:.2f}s: {n / dt_s:.1f} tokens/s (all {width} rows counted, prefill included)")
