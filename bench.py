"""
Benchmarks nanobridge against Hugging Face transformers (and TRL) on the SAME weights, every figure measured in
this run, side by side (interleaved repeats, so load on a shared machine hits both sides alike), and against the
machine's own measured memory bandwidth. Prints one markdown table.
    python bench.py                  # CPU, fp32, ~6 minutes
    python bench.py --quick=True     # smoke test, ~1-2 minutes
    python bench.py --real=DIR       # a real HF checkpoint instead of the random Qwen2.5-0.5B-shaped model
    python bench.py --device=cuda    # bf16, adds a Qwen2.5-1.5B-shaped model at widths 1, 16, 64
"""
import gc, os, random, statistics, sys, tempfile, time
from contextlib import nullcontext

import torch

import grpo
from bridge import BridgeConfig
from model import ModelConfig, Transformer
from sample import generate

# -----------------------------------------------------------------------------
device = 'cpu'
real = ''               # an HF checkpoint directory to use instead of the random 0.5B-shaped model
widths = '1,8,16'       # decode widths (rows per prompt)
bridge_widths = '8,16'  # widths at which decode with Bridge is raced against decode without
new_tokens = 32         # decode length for the tiny model; bigger models use half (their steps are slow on CPU)
prompt_len = 64
tiny_vocab = 151936     # the tiny model keeps Qwen's vocab, so its lm_head is as wide as a real model's
repeats = 3             # timed repeats per figure (median), after one warm-up; bigger models use one fewer
threads = 0             # CPU threads, the same for every side; 0 = the free cores, as train.py picks them
trl = True              # race one GRPO step against TRL's GRPOTrainer (CPU only, when trl is importable)
grpo_prompt_len = 16    # prompt length of that GRPO race
quick = False           # smoke test: few tokens, one repeat, a 2-layer 0.5B shape
seed = 1337
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

dev = torch.device(device)
cuda = dev.type == 'cuda'
assert not cuda or torch.cuda.is_available(), "--device=cuda but torch.cuda.is_available() is False"
dt = torch.bfloat16 if cuda else torch.float32
if quick:
    new_tokens, repeats = 8, 1
if not threads:  # oversubscribed BLAS threads on a loaded machine run many times slower than fewer threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    threads = max(1, cores - int(os.getloadavg()[0] + 0.5)) if hasattr(os, 'getloadavg') else cores
torch.set_num_threads(threads)
try:
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    transformers = None
rows, notes, tmp = [], [], tempfile.mkdtemp(prefix='nanobridge-bench-')
med = statistics.median


def log(msg):  # progress goes to stderr, so stdout is just the table
    print(f"# [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now():
    if cuda:
        torch.cuda.synchronize()  # GPU work is asynchronous: a timestamp means nothing until it has finished
    return time.perf_counter()


def race(fns, reps):
    """{name: fn()} -> {name: median seconds}. One warm-up each, then the repeats interleaved round-robin."""
    for f in fns.values():
        f()
    t = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = now()
            f()
            t[k].append(now() - t0)
    return {k: med(v) for k, v in t.items()}


def add(bench, model, width, a, b=None, bound=None, note='', speedup=True):
    """One table row: a = nanobridge, b = the reference; speedup = how many times faster a is than b (True: a / b,
    right for rates; pass the number for times, or None)."""
    rows.append((bench, model, width, a, b, (a / b if b else None) if speedup is True else speedup, bound,
                 100 * a / bound if bound else None, note))


def fmt(v, pct=False):
    if v is None:
        return '-'
    return f"{v:.0f}%" if pct else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


# -----------------------------------------------------------------------------
# the hardware limit: streaming bandwidth (a matrix >> the last-level cache) and dense matmul peak

def hardware():
    n = (1 << 30 if cuda else 1 << 27)  # 4 GiB on the GPU, 512 MiB on the CPU (the L3 is tens of MiB)
    A = torch.randn(n // 4096, 4096, device=dev, dtype=torch.float32)
    v, B = torch.randn(4096, device=dev), torch.empty_like(A)
    g = torch.randn(4096 if cuda else 1024, 4096 if cuda else 1024, device=dev, dtype=dt)
    t = race({'mv': lambda: torch.mv(A, v), 'copy': lambda: B.copy_(A), 'mm': lambda: g @ g}, 3)
    mv, copy, mm = 4 * n / t['mv'] / 1e9, 2 * 4 * n / t['copy'] / 1e9, 2 * g.size(0) ** 3 / t['mm'] / 1e9
    add('memory bandwidth GB/s: fp32 mat-vec (ours column) | copy, read+write (ref column)', 'machine', '-', mv, copy,
        speedup=None)
    add(f'matmul peak GFLOP/s ({str(dt)[6:]}, {g.size(0)}^3)', 'machine', '-', mm)
    return max(mv, copy) * 1e9, mm * 1e9  # the bound uses the better of the two: the machine can do at least that


# -----------------------------------------------------------------------------
# models: ours, the same weights in transformers, and ours + fresh (zero-output) Bridge blocks

TINY = dict(hidden_size=128, intermediate_size=336, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0)
SHAPES = {'0.5B': {}, '1.5B': dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2)}  # ModelConfig() is 0.5B


def build(name, cfg):
    """(ours, hf, ours+Bridge, path). Random weights are saved once in HF layout and every side loads that file."""
    path = real if name == 'real' else os.path.join(tmp, name)
    if name != 'real':
        torch.manual_seed(seed)
        Transformer(cfg).save_pretrained(path)
    ours = Transformer.from_pretrained(path, device=dev, dtype=dt, verbose=False)
    hidden = ours.config.hidden_size
    # BridgeConfig() (d_B 512, 4 heads) at the 0.5B scale and up; the tiny model gets train.py's 64 (~ 512/896 d)
    bcfg = BridgeConfig() if hidden >= 896 else BridgeConfig(dim=64)
    bri = Transformer.from_pretrained(path, device=dev, dtype=dt, bridge=bcfg, verbose=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev).eval() if transformers else None
    return ours, hf, bri, path


def weight_bytes(m):
    """Bytes a decode step must stream: every weight once (a tied embedding is read as lm_head; an untied one
    only for the few rows looked up, ~0)."""
    seen, n = set(), 0
    for name, p in m.named_parameters():
        if id(p) not in seen and not (name.endswith('embed_tokens.weight') and not m.config.tie_word_embeddings):
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def step_clock(m, times):
    """Timestamps every forward call: call 0 is the prefill, every later gap is one decode step (forward + sampling
    + bookkeeping), so one generate() call yields prefill-free decode step times for ours and transformers alike."""
    return m.register_forward_pre_hook(lambda *_: times.append(now()))


def bench_model(name, cfg, ws, bw, reps):
    ours, hf, bri, path = build(name, cfg)
    c = ours.config
    label = f"{name} ({c.num_hidden_layers}L d{c.hidden_size} V{c.vocab_size})"
    n = new_tokens if name == 'tiny' else max(4, new_tokens // 2)
    log(f"{label}: decode, {n} new tokens, widths {ws}")
    prompt = torch.randint(0, c.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    x = torch.tensor([prompt], device=dev)
    for w in ws:
        # each side is fn(k): generate k new tokens (k = 2 warms up prefill and decode kernels cheaply)
        sides = {'ours': (ours, lambda k: generate(ours, [prompt], w, k, 1.0, None, 1.0, (), seed=seed))}
        if hf is not None:  # same prompt, same count of new tokens (min = max, no eos), pure sampling, KV cache on
            sides['hf'] = (hf, lambda k: hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0,
                                                     top_p=1.0, temperature=1.0, num_return_sequences=w,
                                                     max_new_tokens=k, min_new_tokens=k, pad_token_id=0, use_cache=True))
        if str(w) in bridge_widths.split(','):
            sides['bridge'] = (bri, lambda k: generate(bri, [prompt], w, k, 1.0, None, 1.0, (), seed=seed))
        steps, e2e = {k: [] for k in sides}, {k: [] for k in sides}
        for m, f in sides.values():
            f(2)  # warm-up
        for _ in range(reps):
            for k, (m, f) in sides.items():
                ts = []
                h = step_clock(m, ts)
                t0 = now()
                f(n)
                e2e[k].append(now() - t0)
                h.remove()
                steps[k] += [b - a for a, b in zip(ts[1:], ts[2:])]  # ts[0] -> ts[1] holds the prefill
        rate = {k: w / med(v) for k, v in steps.items()}
        # bound: a step must at least stream all weights + the KV cache it attends over (mean length of the run)
        kv = 2 * c.num_hidden_layers * w * c.num_key_value_heads * c.head_dim * (prompt_len + n / 2) * dt.itemsize
        bound = lambda m: w * bw / (weight_bytes(m) + kv)
        add('decode tok/s (prefill-free): ours vs HF generate', label, w, rate['ours'], rate.get('hf'),
            bound(ours), f"HF at {100 * rate['hf'] / bound(ours):.0f}% of bound" if 'hf' in rate else '')
        add(f'generate tok/s incl. prefill ({n} new tok)', label, w, w * n / med(e2e['ours']),
            w * n / med(e2e['hf']) if 'hf' in e2e else None)
        if 'bridge' in rate:
            add('decode tok/s: with Bridge vs without', label, w, rate['bridge'], rate['ours'], bound(bri),
                f"overhead +{100 * (rate['ours'] / rate['bridge'] - 1):.1f}% (Bridge = "
                f"{100 * (weight_bytes(bri) / weight_bytes(ours) - 1):.1f}% more bytes)")
    # prefill: P prompts at once (ours fills a cache and keeps only the last logits; HF likewise with logits_to_keep)
    P = 1 if name != 'tiny' and not cuda else 8
    xs = torch.randint(0, c.vocab_size, (P, prompt_len), device=dev)
    last = torch.full((P,), prompt_len - 1, device=dev)
    fns = {'ours': lambda: ours(xs, cache=ours.make_cache(P, prompt_len), last=last)}
    if hf is not None:
        fns['hf'] = lambda: hf(input_ids=xs, use_cache=True, logits_to_keep=1)
    with torch.no_grad():
        t = race(fns, reps)
    add(f'prefill tok/s ({P} x {prompt_len} prompt tokens)', label, '-', P * prompt_len / t['ours'],
        P * prompt_len / t['hf'] if 'hf' in t else None)
    # log-prob pass: teacher-forced forward over prompts x width x length, as grpo.token_logprobs does
    W = 4 if name != 'tiny' and not cuda else 16
    toks = torch.randint(0, c.vocab_size, (W, prompt_len + n), device=dev)
    alive = torch.ones_like(toks, dtype=torch.bool)
    fns = {'ours': lambda: grpo.token_logprobs(ours, toks, W, alive)}
    if hf is not None:  # what TRL does: logits -> log_softmax -> gather (ours also computes the entropy)
        fns['hf'] = lambda: torch.log_softmax(hf(toks[:, :-1]).logits.float(), -1).gather(-1, toks[:, 1:, None])
    with torch.no_grad():
        t = race(fns, reps)
    ntok = W * (prompt_len + n - 1)
    add(f'log-prob pass tok/s ({W} rows x {prompt_len + n - 1})', label, W, ntok / t['ours'],
        ntok / t['hf'] if 'hf' in t else None)
    del ours, hf, bri
    gc.collect()


# -----------------------------------------------------------------------------
# GRPO: one step = generate -> rewards -> Rollout -> policy_update (log-probs, backward, AdamW), timed by part

def grpo_step_parts(model, prompts, width, n, reward_fn, steps, stop_ids=()):
    """Median seconds of each part of a GRPO step, over `steps` steps after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.0)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()  # as train.py does
    parts, lp_fn = {}, grpo.token_logprobs

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = now()
            out = fn(*a, **k)
            parts[key] = parts.get(key, 0.0) + now() - t0
            return out
        return wrapper

    def update():  # train.py's run_stage.update: clip, step, zero
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    grpo.token_logprobs = timed('log-probs (forward)', lp_fn)  # policy_update looks it up in grpo: time it there
    hist = []
    try:
        for s in range(steps + 1):
            parts.clear()
            t0 = now()
            with torch.no_grad(), autocast:
                gen = timed('sampling (generate)', generate)(model, prompts, width, n, 1.0, None, 1.0, stop_ids,
                                                             seed=seed + s)
            t1 = now()
            ro = grpo.Rollout.from_generation(gen, reward_fn(gen), width)
            parts['rewards + rollout'] = now() - t1
            t2 = now()
            grpo.policy_update(model, ro, timed('optimizer (clip + AdamW)', update), lambda *v: [float(u) for u in v],
                               max_tokens=n, autocast=autocast)
            parts['backward'] = now() - t2 - parts['log-probs (forward)'] - parts['optimizer (clip + AdamW)']
            parts['step'] = now() - t0
            hist.append(dict(parts))
    finally:
        grpo.token_logprobs = lp_fn
    return {k: med(h[k] for h in hist[1:]) for k in hist[0]}


def bench_grpo_default(reps):
    """train.py's embedded default: tiny model from scratch (byte vocab 258), Bridge d_B 64, 32 prompts x 4, 16 tok."""
    cfg = ModelConfig(vocab_size=258, max_position_embeddings=256, eos_token_id=256, **TINY)
    torch.manual_seed(seed)
    model = Transformer(cfg, BridgeConfig(dim=64, n_head=4)).to(dev).train()
    probs = random.Random(seed).sample(grpo.addition_problems('train'), 32)
    prompts = [list(p['prompt'].encode()) for p in probs]  # the byte tokenizer: byte b is token b

    def rewards(gen):
        texts = [bytes(i for i in c if i < 256).decode('utf-8', 'replace') for c in gen.completions()]
        return torch.tensor([grpo.add_reward(t, probs[i // 4]['answer']) for i, t in enumerate(texts)])
    log("GRPO step of train.py's default")
    p = grpo_step_parts(model, prompts, 4, 16, rewards, reps, stop_ids=[256])
    for k in ('sampling (generate)', 'log-probs (forward)', 'backward', 'optimizer (clip + AdamW)', 'rewards + rollout'):
        add(f'GRPO step, train.py default (32 x 4, 16 tok): {k}, ms', 'tiny (4L d128 V258) + Bridge 64', 4,
            1000 * p[k], note=f"{100 * p[k] / p['step']:.0f}% of the {1000 * p['step']:.0f} ms step")


def bench_trl(reps):
    """One GRPO step, ours vs TRL's GRPOTrainer: tiny random Qwen2 (4L d128 V151936), 8 prompts x 4 x 32 tokens,
    sampling, no KL, CPU, fp32, no gradient checkpointing, plain AdamW, random rewards on both sides."""
    cfg = ModelConfig(vocab_size=151936, **TINY)
    torch.manual_seed(seed)
    path = os.path.join(tmp, 'trl-tiny')
    Transformer(cfg).save_pretrained(path)
    ours = Transformer.from_pretrained(path, device=dev, dtype=torch.float32, verbose=False).train()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, cfg.vocab_size, (grpo_prompt_len,), generator=g).tolist() for _ in range(8)]
    n = 8 if quick else 32
    log(f"GRPO step: ours vs TRL ({n} new tokens)")
    p = grpo_step_parts(ours, prompts, 4, n, lambda gen: torch.rand(gen.tokens.size(0)), reps)
    trl_s, why = None, ''
    if not trl or cuda:
        why = 'TRL race off (--trl=False or GPU)'
    else:
        try:
            trl_s = trl_step_seconds(path, prompts, n, reps)
        except ImportError as e:
            why = f"trl not importable ({e}); pip install trl to race it"
        except Exception as e:  # TRL is optional: its failure is a note, not a crash
            why = f"TRL failed: {type(e).__name__}: {str(e)[:150]}"
    add(f'GRPO step s: ours vs TRL (8 x 4, {n} tok, prompt {grpo_prompt_len})', 'tiny (4L d128 V151936)', 4,
        p['step'], trl_s, note=why or f"speedup {trl_s / p['step']:.2f}x; ours: sampling "
        f"{100 * p['sampling (generate)'] / p['step']:.0f}%, log-probs {100 * p['log-probs (forward)'] / p['step']:.0f}%",
        speedup=trl_s / p['step'] if trl_s else None)


def trl_step_seconds(path, prompts, n, reps):
    import datasets
    import trl as trl_lib  # the config global `trl` is a bool
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    V = ModelConfig.from_dict(__import__('json').load(open(os.path.join(path, 'config.json')))).vocab_size
    # TRL needs a tokenizer: a word-level one whose word "t{i}" is token i round-trips our id prompts exactly
    tk = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token='t0'))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='t0', eos_token='t1')
    ds = datasets.Dataset.from_dict({'prompt': [' '.join(f"t{i}" for i in p) for p in prompts]})
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = now()

        def on_step_end(self, *a, **k):
            times.append(now() - self.t0)
    args = trl_lib.GRPOConfig(
        output_dir=os.path.join(tmp, 'trl-out'), per_device_train_batch_size=4 * len(prompts), num_generations=4,
        max_completion_length=n, generation_kwargs={'min_new_tokens': n}, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, loss_type='dapo', learning_rate=3e-4, max_grad_norm=1.0, optim='adamw_torch',
        gradient_checkpointing=False, max_steps=reps + 1, use_cpu=True, bf16=False, report_to='none',
        save_strategy='no', logging_steps=10 ** 6, disable_tqdm=True, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = trl_lib.GRPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()],
                                  reward_funcs=lambda completions, **kw: [random.random() for _ in completions])
    trainer.train()
    torch.set_num_threads(threads)  # in case the Trainer changed it
    return med(times[1:])


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    t_start = time.time()
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?') \
        if os.path.exists('/proc/cpuinfo') else '?'
    machine = (f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, load avg {os.getloadavg()[0]:.1f}, "
               f"torch {torch.__version__}, transformers {transformers.__version__ if transformers else 'absent'}, "
               f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({str(dt)[6:]})")
    log(machine)
    bw, flops = hardware()
    reps_big = max(1, repeats - 1)
    bench_model('tiny', ModelConfig(vocab_size=tiny_vocab, **TINY), [int(w) for w in widths.split(',')], bw, repeats)
    big = dict(SHAPES['0.5B'], num_hidden_layers=2) if quick else SHAPES['0.5B']
    bench_model('real' if real else '0.5B', ModelConfig(**big), [int(w) for w in widths.split(',')], bw, reps_big)
    if cuda:
        bench_model('1.5B', ModelConfig(**SHAPES['1.5B']), [1, 16, 64], bw, reps_big)
    bench_grpo_default(repeats)
    bench_trl(2 if quick else repeats)
    if transformers is None:
        notes.append('transformers is not importable: its column is empty')
    print(f"machine: {machine}\n")
    print("| benchmark | model | width | nanobridge | reference | speedup | bound | % of bound | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, m, w, a, r, s, bd, pct, note in rows:
        print(f"| {b} | {m} | {w} | {fmt(a)} | {fmt(r)} | {fmt(s) + 'x' if s else '-'} | {fmt(bd)} | "
              f"{fmt(pct, True)} | {note} |")
    print(f"\nbound = width x bandwidth / (weight bytes + KV bytes) per decode step, bandwidth = the better of the two "
          f"measured above; {repeats} repeats (median), {reps_big} for models past tiny; wall {time.time() - t_start:.0f} s")
    for n in notes:
        print(f"note: {n}")
