"""
Sampling, the reference: a token from softmax(logits / T) with top-k and top-p, and N-wide
generation, where the N rows of a prompt decode in lock-step so that Bridge can mix them at every
position. engine.py samples the same distribution faster (slots, keyed draws, compile); train.py
and this CLI run the engine:

    python sample.py --init_from=DIR --prompt="What is 12 times 7?" --width=8
"""
import os
import time
from dataclasses import dataclass

import torch

from settings import UserError

@dataclass
class Generation:
    # rows are grouped: row b answers prompt b // width; (B, T) fields are 0 / False / pad outside
    tokens: torch.Tensor       # (B, T) prompt + completion per row, right-padded with pad_id
    prompt_lens: torch.Tensor  # (B,) prompt length of each row
    lengths: torch.Tensor      # (B,) completion tokens per row, the stop token included
    finished: torch.Tensor     # (B,) True if the row ended on a stop token (False = truncated)
    logprobs: torch.Tensor     # (B, T) log p(token at t) under softmax(logits / temperature)
    alive: torch.Tensor        # (B, T) the Bridge mask the sampler used, per *input* position
    from_env: torch.Tensor     # (B, T) True where `env` wrote the token: kept out of the loss
    width: int
    entropy: torch.Tensor | None = None  # (B, T) entropy of each token's distribution

    @property
    def completion_mask(self):
        t = torch.arange(self.tokens.size(1), device=self.tokens.device)
        end = self.prompt_lens + self.lengths
        return (t >= self.prompt_lens[:, None]) & (t < end[:, None])

    def completions(self, drop_stop=True):
        """Each row's completion ids, without its stop token unless drop_stop=False."""
        n = self.lengths - (self.finished.long() if drop_stop else 0)
        starts = zip(self.prompt_lens.tolist(), n.tolist())
        return [self.tokens[b, p:p + k].tolist() for b, (p, k) in enumerate(starts)]

def sample_token(logits, temperature, top_k, top_p, generator, entropy=False):
    """logits (B, V) -> (token (B,), its log-prob (B,), entropy (B,) or None). The log-prob and
    the entropy are those of softmax(logits / T) before top-k/top-p: the policy GRPO's ratio uses
    (T = 0 is greedy; it reports them at T = 1)."""
    logits = logits.float()
    logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, -1)
    probs = logp.exp()
    ent = -(probs * logp).sum(-1) if entropy else None
    weights = probs
    if top_k:  # only the k likeliest tokens
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        weights = weights.masked_fill(logits < kth, 0.0)
    if top_p < 1.0:  # only the smallest set of likeliest tokens whose mass reaches top_p
        sorted_p, order = torch.sort(weights, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p * sorted_p.sum(-1, keepdim=True)
        weights = weights.masked_fill(drop.scatter(-1, order, drop), 0.0)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:  # multinomial needs no normalising: it draws i with probability w_i / sum w
        tok = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0], ent

def check_request(model, prompts, width, max_new_tokens, temperature, top_p):
    """What a sampler refuses (the engine too), as one line each."""
    if width < 1:
        raise UserError(f"width={width} must be >= 1")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1]")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    longest = max(map(len, prompts))
    ctx = model.config.max_position_embeddings
    if longest + max_new_tokens > ctx:
        raise UserError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                        f"the model's context of {ctx} (max_position_embeddings)")

@torch.no_grad()
def generate(model, prompts, width=1, max_new_tokens=256, temperature=1.0, top_k=None, top_p=1.0,
             stop_ids=(), seed=None, pad_id=None, entropy=False, env=None):
    """prompts: token-id lists (lengths may differ) -> a Generation of len(prompts) * width rows.
    The `width` rows of prompt p are rows p*width .. p*width+width-1 and always sit at the same
    position, which is what Bridge needs (docs/paper.md §2.6): at every step the siblings' hidden
    states exist at the same position.
    env: an environment or tool that writes tokens itself (multi-turn RL). At every step
    env(steps, tokens, pos, u) gets each row's step (B,), the tokens so far (B, T), the positions
    about to be written (B,) and a uniform per row (B,) for its own draws; it returns None or (B,)
    ids, where an id >= 0 replaces that row's token. Siblings read it like any token; it gets
    log-prob 0 and is marked in from_env: the policy did not choose it, so GRPO leaves it out."""
    check_request(model, prompts, width, max_new_tokens, temperature, top_p)
    dev = model.lm_head.weight.device
    P, B = len(prompts), len(prompts) * width
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    L = int(lens.max())
    T = L + max_new_tokens
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    pad = int(stop[0]) if pad_id is None and stop_ids else (pad_id or 0)
    gen = torch.Generator(device=dev)
    # (not torch.seed(): that would reseed the global RNG)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))
    # 1) one prefill for all prompts, right-padded: causal attention never reads the padding
    x = torch.tensor([list(p) + [pad] * (L - len(p)) for p in prompts], device=dev)
    pre = model.make_cache(P, L)
    logits, _ = model(x, cache=pre, last=lens - 1)
    # 2) every prompt's cache and last logits go to its `width` rows
    cache = model.make_cache(B, T)
    cache.expand_from(pre, width)
    logits = logits[:, 0].repeat_interleave(width, 0)
    plen = lens.repeat_interleave(width)
    tokens = torch.full((B, T), pad, dtype=torch.long, device=dev)
    tokens[:, :L] = x.repeat_interleave(width, 0)
    logprobs = torch.zeros(B, T, device=dev)
    ents = torch.zeros(B, T, device=dev)
    alive = torch.zeros(B, T, dtype=torch.bool, device=dev)
    alive[:, :L] = torch.arange(L, device=dev) < plen[:, None]
    from_env = torch.zeros(B, T, dtype=torch.bool, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    # 3) lock-step decode: at step s every row feeds its token s-1 at position plen + s - 1
    for s in range(max_new_tokens):
        if s > 0:
            pos = plen + s - 1
            alive[rows, pos] = ~finished  # a row is no Bridge key from its stop token's position
            cache.kv_len = L + s  # attend over the filled part of the cache only
            logits, _ = model(tok[:, None], width=width, alive=(~finished)[:, None], cache=cache,
                              pos=pos)
            logits = logits[:, 0]
        tok, lp, ent = sample_token(logits, temperature, top_k, top_p, gen, entropy)
        if env is not None:  # the environment's tokens win
            u = torch.rand(B, generator=gen, device=dev)
            forced = env(torch.full_like(plen, s), tokens, plen + s, u)
            if forced is not None:
                hit = (forced >= 0) & ~finished
                from_env[rows, plen + s] = hit
                tok = torch.where(hit, forced, tok)
                lp = torch.where(hit, 0.0, lp)
        tok = torch.where(finished, pad, tok)
        tokens[rows, plen + s] = tok
        logprobs[rows, plen + s] = torch.where(finished, 0.0, lp)
        if entropy:
            ents[rows, plen + s] = torch.where(finished, 0.0, ent)
        lengths += ~finished
        finished |= torch.isin(tok, stop)
        if finished.all():
            break
    n = int((plen + lengths).max())
    return Generation(tokens[:, :n], plen, lengths, finished, logprobs[:, :n], alive[:, :n],
                      from_env[:, :n], width, ents[:, :n] if entropy else None)

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    import engine
    from checkpoint import DTYPES, load_model
    from distributed import free_cores
    from fastpath import fuse
    from probe import BridgeProbe, bridge_view
    from tokenizer import Tokenizer
    init_from = 'out/ckpt'  # an HF checkpoint directory (train.py writes out/ckpt)
    prompt = '12+34='       # "FILE:path" reads the prompt from a file
    system = ''             # system message ('' = the template's default, if any)
    chat_template = 'auto'  # 'auto': the checkpoint's template if it has one | 'plain' | 'none'
    width = 4               # N interdependent answers
    max_new_tokens = 64
    temperature = 0.8
    top_k = 0
    top_p = 1.0
    seed = 1337
    device = 'auto'
    dtype = 'auto'          # 'auto' = bfloat16 on CUDA, float32 on CPU
    compile = False         # compile the decode step (engine.py; not with show_bridge)
    show_bridge = False     # per token, the share of Bridge attention that went to siblings
    threads = 0             # CPU threads; 0 = pick from the free cores
    here = os.path.dirname(os.path.abspath(__file__))
    exec(open(os.path.join(here, 'configurator.py')).read())
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.split(':')[0] not in ('cpu', 'cuda'):
        raise UserError(f"device={device!r}: expected auto, cpu or cuda[:N]")
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but torch.cuda.is_available() is False")
    if dtype != 'auto' and dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') else 'float32'
    if prompt.startswith('FILE:'):
        with open(prompt[5:], encoding='utf-8') as f:
            prompt = f.read()
    torch.set_num_threads(threads or free_cores())
    model = fuse(load_model(init_from, device=device, dtype=DTYPES[dtype]))
    tok = Tokenizer.from_pretrained(init_from)
    if show_bridge and model.bridge_config is None:
        raise UserError(f"--show_bridge=True but {init_from} has no Bridge blocks "
                        f"(config.json has no 'bridge' entry)")
    probe = BridgeProbe(model, keep=True) if show_bridge else None
    raw = chat_template == 'none' or (chat_template == 'auto' and tok.chat_template is None)
    if raw:
        ids = tok.encode(prompt)
    else:
        template = 'plain' if chat_template == 'plain' else None
        ids = tok.encode_chat(prompt, system or None, template)
    t0 = time.time()
    keys = [engine.key(seed, r) for r in range(width)]  # one random stream per answer
    out = engine.sample(model, [ids], keys, width, max_new_tokens, temperature, top_k or None,
                        top_p, tok.stop_ids, compile=compile and not show_bridge)
    dt_s = time.time() - t0
    views = bridge_view(probe, out) if probe else None
    if views:
        print("Bridge, per generated token: share = the tenths (0-9) of this answer's Bridge "
              "attention that went to its siblings rather than itself, averaged over heads and "
              "layers; reads = the sibling it read most ('=': none by 1% more than another)")
    for i, c in enumerate(out.completions()):
        cut = '' if out.finished[i] else ', truncated'
        print(f"--- answer {i + 1}/{width} ({len(c)} tokens{cut})\n{tok.decode(c)}")
        if views:
            print(views[i])
    n = int(out.lengths.sum())
    print(f"--- {n} tokens in {dt_s:.2f}s: {n / dt_s:.1f} tokens/s "
          f"(all {width} rows counted, prefill included)")
