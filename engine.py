"""
The sampling engine: what train.py and sample.py's CLI sample with (evaluation, the warm-up set,
GRPO's rollouts). It draws from the same distribution as sample.generate, the readable reference
(the tests hold it to that), and differs in how rows are laid out in time and how a token is drawn:
  slots       a static KV cache of S group slots, each one group of `width` rows. When every row
              of a group has stopped, its slot takes the next group and decoding goes on: prompts
              are prefilled ahead, many in one call, and a staged prompt's cache is copied into the
              slot the step it frees. Each group advances at its own position, its rows in
              lock-step; Bridge never mixes slots (groups are contiguous rows, and the rows of an
              empty slot are dead).
  weights     under bf16 autocast, train.py decodes from inference_copy(model): the Linear
              weights cast once per call, not at every step.
  one shape   compiled, the decode step keeps its shapes for the whole call (the cache, and
              attention over all of it under each row's mask), so it is captured once per width.
  drawing     an exact two-level exponential race instead of torch.multinomial: no scan over the
              vocabulary, no host sync (race)
  randomness  a row's draws are keyed on (its key, its position) by a counter-based hash, not drawn
              from a shared stream: its samples do not depend on S, on the order groups run in, or
              on the GPU. Rows that do not read each other give the same samples in groups of any
              width, given the same keys.
    keys = [key(seed, i, r) for i in range(len(prompts)) for r in range(4)]  # one per row
    gen = sample(model, prompts, keys, width=4, max_new_tokens=64, stop_ids=[eos], slots=8)
"""
import functools
import math
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
import torch.nn as nn

from checkpoint import meta_model
from fastpath import decode_kernel
from sample import Generation, check_request

M32 = 0xFFFFFFFF

def mix(x):
    """murmur3's 32-bit finaliser, on Python ints or int64 tensors holding 32-bit words: a
    bijection that scrambles every bit. A tensor's products may wrap past 2^63; their low 32 bits,
    all that is kept, are still exact."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)

def key(*parts):
    """A 32-bit key from integers (a seed, a set, a problem, a row ...), on the host."""
    h = 0x9E3779B9
    for p in parts:
        h = mix((h ^ (int(p) & M32)) * 0x01000193 & M32)
    return h

@functools.lru_cache
def columns(sizes, device):
    """Each column's salt and index for uniforms(keys, sizes): block s's columns 1 .. n_s."""
    salts = torch.cat([torch.full((n,), s * 0x27D4EB2F & M32) for s, n in enumerate(sizes)])
    index = torch.cat([torch.arange(1, n + 1) for n in sizes])
    return salts.to(device), index.to(device)

def uniforms(keys, sizes):
    """Uniforms in (0, 1), one (B, n) block per n in `sizes`: element i of block s in row b is a
    function of (keys[b], s, i) alone. One pass for all of a step's draws (a decode step is
    short: each tensor op costs about as much as its arithmetic)."""
    salts, index = columns(tuple(sizes), keys.device)
    h = mix(mix(keys[:, None] ^ salts) ^ index)
    return ((h.double() + 0.5) / 2**32).split(list(sizes), -1)

@functools.cache  # the largest divisor of V up to sqrt(V): K chunks of V // K (K = 1 for a prime V)
def n_chunks(V):
    return next(d for d in range(math.isqrt(V), 0, -1) if V % d == 0)

def distribution(logits, temperature, top_k, top_p, entropy=False):
    """sample.sample_token's distribution: logits (B, V) -> (probs (B, V) of softmax(logits / T),
    the weights to draw from (probs after top-k/top-p, not renormalised), entropy (B,) of probs or
    None). T = 0 leaves probs at T = 1 (greedy draws the argmax)."""
    x = logits.float() / temperature if temperature not in (0, 1) else logits.float()
    # one fused softmax, not log_softmax + exp: at V = 150k every full pass costs ~0.05 ms a row
    probs = torch.softmax(x, -1)
    ent = None
    if entropy:  # H = logsumexp(x) - sum p x, and logsumexp(x) = x_i - log p_i for any i
        pmax, imax = probs.max(-1, keepdim=True)
        with torch.autocast(x.device.type, enabled=False):  # a bf16 dot over 150k terms is off
            dot = (probs[:, None] @ x[:, :, None])[:, 0, 0]  # by ~0.1 nats
        ent = (x.gather(-1, imax) - pmax.log())[:, 0] - dot
    sample = probs
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        sample = sample.masked_fill(logits < kth, 0.0)
    if top_p < 1.0:  # keep the smallest prefix with mass >= p
        sorted_p, order = torch.sort(sample, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p * sorted_p.sum(-1, keepdim=True)
        sample = sample.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs, sample, ent

def race(sample, exponentials):
    """Exact sampling in two levels, first a chunk of the vocabulary by its mass, then a token in
    it, each by the exponential race (argmax_i w_i / E_i with E_i ~ Exp(1) picks i with probability
    w_i / sum w). A scan over all V entries (cumsum, or torch.multinomial's V draws) costs more
    than the matmul that made the logits; this needs one sum and ~2 sqrt(V) random numbers, and
    never syncs with the host. exponentials(w, level) -> E, shaped like w (level 0: the chunks,
    1: the tokens of the chosen chunk)."""
    B, V = sample.shape
    K = n_chunks(V)
    chunks = sample.reshape(B, K, V // K)
    # (E is clamped above 0: a draw may be exactly 0, and 0 / 0 would let a zero-mass entry win)
    pick = lambda w, level: (w / exponentials(w, level).clamp_(min=1e-30)).argmax(-1)
    j = pick(chunks.sum(-1), 0)
    return j * (V // K) + pick(torch.take_along_dim(chunks, j[:, None, None], 1)[:, 0], 1)

def sample_keyed(logits, temperature, top_k, top_p, u, entropy=False):
    """sample.sample_token, with each row's exponentials from its own uniforms u: (B, K) for the
    race's chunks and (B, V / K) for the tokens of the chosen chunk (K = n_chunks(V))."""
    probs, weights, ent = distribution(logits, temperature, top_k, top_p, entropy)
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        tok = race(weights, lambda w, level: (-u[level].log()).to(w.dtype))
    return tok, probs.gather(-1, tok[:, None])[:, 0].log(), ent

@dataclass
class Stats:
    """What a call's layout cost. occupancy: slot-steps holding a group over all slot-steps. kept:
    row-steps that produced a kept token over the row-steps of occupied slots; for stop lengths
    i.i.d. uniform on [1, n] its lock-step bound is (w + 1) / 2w (a group decodes until its
    longest row stops)."""
    steps: int = 0
    slot_steps: int = 0
    busy_slot_steps: int = 0
    row_steps: int = 0
    kept_row_steps: int = 0

    @property
    def occupancy(self):
        return self.busy_slot_steps / max(self.slot_steps, 1)

    @property
    def kept(self):
        return self.kept_row_steps / max(self.row_steps, 1)

    def line(self, width):
        bound = (width + 1) / (2 * width)
        return (f"sampling at width {width}: {self.steps} decode steps, slot occupancy "
                f"{self.occupancy:.3f}, kept row-steps {self.kept:.3f} (lock-step bound for "
                f"uniform lengths {bound:.3f})")

# a compiled step keeps its static addresses across calls: one cache per (model, B, T, dtype)
CACHES = {}

def cached(model, B, T):
    dtype = model.make_cache(1, 1).k.dtype
    k = (id(model), B, T, dtype)
    if k not in CACHES:
        CACHES.clear()  # one run samples one shape per stage: keep only the latest
        CACHES[k] = model.make_cache(B, T)
    return CACHES[k]

# prompt tokens one staging prefill holds at most: its activations stay small beside the cache
STAGE_TOKENS = 16384
COPIES = WeakKeyDictionary()  # model -> its bf16 inference copy, freed with the model

@torch.no_grad()
def inference_copy(model):
    """The model with its Linear weights in bf16, as autocast would cast them at every step:
    decoding from it under bf16 autocast computes exactly what decoding from the fp32 weights
    does, without casting every weight at every step (compiled, inside every captured step).
    Made once per model (2 bytes per parameter, which memory.py counts) and refreshed from the
    model's weights at every call: one read of the weights, against thousands of steps."""
    c = COPIES.get(model)
    if c is None:
        c = decode_kernel(meta_model(model.config, model.bridge_config))
        c.to_empty(device=model.lm_head.weight.device)
        if model.config.tie_word_embeddings:  # a bf16 head beside the fp32 embedding, as autocast
            c.lm_head.weight = nn.Parameter(torch.empty_like(c.lm_head.weight))
        for m in c.modules():
            if isinstance(m, nn.Linear):
                m.to(torch.bfloat16)
        COPIES[model] = c.requires_grad_(False)
    c.load_state_dict(model.state_dict())  # copy_ casts to each copy's dtype
    for name, b in model.named_buffers():  # RoPE's frequencies are not in the state dict
        c.get_buffer(name).copy_(b)
    return c

def stage(model, groups, prompts, pad):
    """Prefill the prompts of `groups` in one call: [groups, (K, V) stacked (2, layers, n, heads,
    L, dim), each one's first logits (n, vocab), its length (n,), its padded tokens (n, L)]."""
    dev = model.lm_head.weight.device
    lens = torch.tensor([len(prompts[g]) for g in groups], device=dev)
    L = int(lens.max())
    x = torch.tensor([prompts[g] + [pad] * (L - len(prompts[g])) for g in groups], device=dev)
    pre = model.make_cache(len(groups), L)
    first = model(x, cache=pre, last=lens - 1)[0][:, 0]
    return [groups, torch.stack([pre.k, pre.v]), first, lens, x]

@torch.no_grad()
def sample(model, prompts, keys, width=1, max_new_tokens=256, temperature=1.0, top_k=None,
           top_p=1.0, stop_ids=(), slots=None, pad_id=None, entropy=False, env=None,
           compile=False, cap=None, check_every=None):
    """prompts: token-id lists, one group of `width` rows each; keys: one integer per row
    (engine.key). Returns a Generation whose rows are in the order of the prompts, as
    sample.generate lays them out, with its Stats as `.stats`.
      slots   groups decoded at once (None: all)
      cap     the cache length (prompt + answer), fixed for a run so that a compiled step is
              reused across calls (default: the longest prompt + max_new_tokens)
      env     env(steps (B,), tokens (B, T), pos (B,), u (B,)): each row's step, the tokens so far,
              the positions about to be written, and a uniform keyed on the row and its position;
              returns None or (B,) ids, >= 0 where the environment writes that row's token."""
    check_request(model, prompts, width, max_new_tokens, temperature, top_p)
    n_groups, w, dev = len(prompts), width, model.lm_head.weight.device
    if len(keys) != n_groups * w:
        raise ValueError(f"{n_groups} prompts of {w} rows need {n_groups * w} keys (one per row), "
                         f"not {len(keys)}")
    longest = max(map(len, prompts))
    S = min(slots or n_groups, n_groups)
    B, T = S * w, cap or longest + max_new_tokens
    if longest + max_new_tokens > T:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"the engine's cache of {T}")
    if T > model.config.max_position_embeddings:
        raise ValueError(f"cache of {T} tokens exceeds the model's context of "
                         f"{model.config.max_position_embeddings}")
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    pad = int(stop[0]) if pad_id is None and stop_ids else (pad_id or 0)
    # a host sync is free on CPU, costly on GPU
    check_every = check_every or (1 if dev.type == 'cpu' else 8)
    cache = cached(model, B, T) if compile else model.make_cache(B, T)
    step_fn = model
    if compile:  # written in place at fixed addresses: say so, or CUDA graphs are not captured
        mode = 'reduce-overhead' if dev.type == 'cuda' else None
        step_fn = torch.compile(model, dynamic=False, mode=mode)
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
    # every row's state, on the device; a slot's rows are rows slot*w .. slot*w+w-1
    tokens = torch.full((B, T), pad, dtype=torch.long, device=dev)
    logprobs = torch.zeros(B, T, device=dev)
    ents = torch.zeros(B, T, device=dev)
    alive = torch.zeros(B, T, dtype=torch.bool, device=dev)
    from_env = torch.zeros(B, T, dtype=torch.bool, device=dev)
    plen = torch.zeros(B, dtype=torch.long, device=dev)
    step = torch.zeros(B, dtype=torch.long, device=dev)  # row's step s: it writes plen + s next
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    finished = torch.ones(B, dtype=torch.bool, device=dev)  # an empty slot's rows: dead to Bridge
    held = torch.zeros(B, dtype=torch.bool, device=dev)  # the rows of a slot that holds a group
    row_keys = torch.zeros(B, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    group_of = [None] * S  # the group each slot holds (None: empty)
    started = [0] * S      # the decode step at which it was prefilled
    length = [0] * S       # its prompt's length
    queue, stats, it, staged = list(range(n_groups)), Stats(), 0, None
    # every group's rows, in the order of the prompts, copied out when the group is done
    fields = (tokens, logprobs, alive, from_env, ents, plen, lengths, finished)
    out = [torch.empty((n_groups * w, *f.shape[1:]), dtype=f.dtype, device=dev) for f in fields]
    logits = None
    while queue or any(g is not None for g in group_of):
        # 1) one decode step for the rows of every started group; empty slots' rows are dead
        if logits is not None:
            pos = (plen + step - 1).clamp(max=T - 1)  # (an empty slot's rows stay where they were)
            alive[rows, pos] = ~finished
            # compiled, attention reads the whole cache (one shape); eager, up to the furthest row
            furthest = [n + it - s for n, s, g in zip(length, started, group_of) if g is not None]
            cache.kv_len = T if compile else min(T, max(furthest, default=0) + 1)
            last = tokens.gather(1, pos[:, None])
            logits = step_fn(last, width=w, alive=(~finished)[:, None], cache=cache, pos=pos)[0]
            logits = logits[:, 0]
        # 2) refill: each empty slot takes the next staged group. Prompts are prefilled ahead, up
        # to S at a time in one call (as the first fill), and a staged prompt's cache is copied
        # into its slot the step the slot frees: no slot waits for a prefill of its own
        free = [j for j in range(S) if group_of[j] is None]
        while free and (staged or queue):
            if not staged:  # the next groups, up to S and STAGE_TOKENS prompt tokens
                n = max(1, min(S, STAGE_TOKENS // longest))
                staged = stage(model, [queue.pop(0) for _ in queue[:n]], prompts, pad)
            new, pre, first, lens, x = staged
            n = min(len(free), len(new))
            taken, free = free[:n], free[n:]
            staged = [new[n:], pre[:, :, n:], first[n:], lens[n:], x[n:]] if n < len(new) else None
            L = int(lens[:n].max())
            r = torch.tensor([j * w + i for j in taken for i in range(w)], device=dev)  # their rows
            src = torch.arange(n, device=dev).repeat_interleave(w)  # each row's staged prompt
            cache.k[:, r, :, :L] = pre[0][:, src, :, :L]
            cache.v[:, r, :, :L] = pre[1][:, src, :, :L]
            if logits is None:  # the first fill: the rows of slots still empty get dead logits
                logits = first.new_zeros(B, first.size(-1))
            logits = logits.index_copy(0, r, first[src].to(logits.dtype))
            tokens[r] = pad
            tokens[r, :L] = x[src, :L]
            plen[r] = lens[src]
            step[r], lengths[r], finished[r], held[r] = 0, 0, False, True
            alive[r] = torch.arange(T, device=dev) < plen[r][:, None]
            logprobs[r], ents[r], from_env[r] = 0.0, 0.0, False
            row_keys[r] = torch.tensor([keys[g * w + i] for g in new[:n] for i in range(w)],
                                       device=dev)
            for j, g in zip(taken, new[:n]):
                group_of[j], started[j], length[j] = g, it, len(prompts[g])
        # 3) every running row draws its token at position plen + step, keyed on row and position
        at = (plen + step).clamp(max=T - 1)
        K = n_chunks(logits.size(-1))
        u = uniforms(mix(row_keys ^ at), (K, logits.size(-1) // K, 1))  # race levels 0, 1; the env
        tok, lp, ent = sample_keyed(logits, temperature, top_k, top_p, u[:2], entropy)
        forced = env(step, tokens, at, u[2][:, 0]) if env is not None else None
        if forced is not None:  # the environment's tokens win
            hit = (forced >= 0) & ~finished
            from_env[rows, at] = hit
            tok, lp = torch.where(hit, forced, tok), torch.where(hit, 0.0, lp)
        tok = torch.where(finished, pad, tok)
        tokens[rows, at] = tok
        logprobs[rows, at] = torch.where(finished, 0.0, lp)
        if entropy:
            ents[rows, at] = torch.where(finished, 0.0, ent)
        busy = sum(g is not None for g in group_of)
        stats.steps += 1
        stats.slot_steps += S
        stats.busy_slot_steps += busy
        stats.row_steps += busy * w
        lengths += ~finished
        finished |= torch.isin(tok, stop)
        step += held
        it += 1
        # 4) a group is done when its rows have all stopped (checked every check_every steps: a
        # host sync) or it has drawn max_new_tokens; its rows are copied out, its slot freed
        capped = lambda j: it - started[j] >= max_new_tokens
        done = [j for j in range(S) if group_of[j] is not None and capped(j)]
        if it % check_every == 0 or done or not queue:
            stopped = finished.view(S, w).all(1).tolist()
            done = [j for j in range(S) if group_of[j] is not None and (stopped[j] or capped(j))]
        if done:  # all done groups' rows in one copy per field
            src = torch.tensor([j * w + i for j in done for i in range(w)], device=dev)
            dst = torch.tensor([group_of[j] * w + i for j in done for i in range(w)], device=dev)
            for o, f in zip(out, fields):
                o[dst] = f[src]
            finished[src], held[src] = True, False
            for j in done:
                group_of[j] = None
    tokens, logprobs, alive, from_env, ents, plen, lengths, finished = out
    stats.kept_row_steps = int(lengths.sum())  # every kept token is one row-step
    n = int((plen + lengths).max())
    gen = Generation(tokens[:, :n], plen, lengths, finished, logprobs[:, :n], alive[:, :n],
                     from_env[:, :n], w, ents[:, :n] if entropy else None)
    gen.stats = stats
    return gen
