"""
Benchmarks nanobridge against Hugging Face transformers (and TRL) on the SAME weights and against
this machine's measured memory bandwidth. Every figure is measured in this run, side by side:
repeats are interleaved, so load on a shared machine hits every side alike. Prints one markdown
table (progress goes to stderr).
    python bench.py                  # CPU, fp32, ~4 minutes (--repeats=5: ~6)
    python bench.py --quick=True     # smoke test, ~1.5 minutes
    python bench.py --real=DIR       # a real HF checkpoint instead of the random
                                       Qwen2.5-0.5B-shaped model
    python bench.py --device=cuda    # bf16, adds a Qwen2.5-1.5B-shaped model at widths 1, 16, 64
"""
import atexit, contextlib, json, os, random, shutil, statistics, sys, tempfile, time, warnings

import torch

import engine
import grpo
import train as T  # train.py's default config (its globals); its main part only runs as a script
from bridge import BridgeConfig
from checkpoint import load_model, save_model
from distributed import free_cores
# train.py's embedded model, a timer, the memory rows
from bench_memory import TINY, clock, memory_rows
from fastpath import Linear, fuse
from model import ModelConfig, Transformer
from settings import UserError
from tasks import Arithmetic
from tokenizer import write_byte_tokenizer

# -----------------------------------------------------------------------------
device = 'cpu'
real = ''               # an HF checkpoint directory to use instead of the random 0.5B-shaped model
widths = '1,8,16'       # decode widths (rows per prompt)
bridge_widths = '8,16'  # widths at which decode with Bridge is raced against decode without
new_tokens = 32         # decode length for the tiny model;
                        # bigger ones get half (their steps are slow on CPU)
prompt_len = 64
tiny_vocab = 151936     # the tiny model keeps Qwen's vocab, so
                        # its lm_head is as wide as a real model's
repeats = 3             # timed repeats per figure (median) after one warm-up;
                        # models past tiny get one fewer
threads = 0             # CPU threads, the same for every side;
                        # 0 = the free cores, as train.py picks them
trl = True              # race one GRPO step against TRL's GRPOTrainer
                        # (CPU only, if trl is importable)
grpo_prompt_len = 16    # prompt length in that race
quick = False           # smoke test: 8 tokens, one repeat, a 2-layer 0.5B shape
compile = False         # also race the compiled engine against eager,
                        # and compile the GRPO rows' decode step
seed = 1337
mem_tokens = '256,1024,4096'  # completion lengths of the GRPO-update memory rows ('' = skip them)
only = ''               # 'memory': just the memory rows
                        # | 'linear': just fastpath.Linear against F.linear (CPU)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
if only not in ('', 'memory', 'linear'):
    raise UserError(f"only={only!r}: expected '', 'memory' or 'linear'")
dev = torch.device(device)
cuda = dev.type == 'cuda'  # bf16 and a 1.5B shape on a GPU
now = lambda: clock(cuda)  # seconds, once the device has finished
if cuda and not torch.cuda.is_available():
    raise UserError(f"device={device!r} but torch.cuda.is_available() is False")
dt = torch.bfloat16 if cuda else torch.float32
new_tokens, repeats = (8, 1) if quick else (new_tokens, repeats)
# oversubscribed BLAS threads on a busy machine run many times slower
threads = threads or free_cores()
torch.set_num_threads(threads)
warnings.filterwarnings('ignore')
try:
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    transformers = None
QWEN15 = dict(hidden_size=1536, intermediate_size=8960,  # Qwen2.5-1.5B's shape (tied, like 0.5B)
              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
rows, tmp, med = [], tempfile.mkdtemp(prefix='nanobridge-bench-'), statistics.median
# the saved models (GBs at 1.5B) go when the bench does
atexit.register(shutil.rmtree, tmp, ignore_errors=True)
OPT = 'optimizer (clip + AdamW)'

def log(msg):  # progress goes to stderr, the table to stdout
    print(f"# [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

def race(fns, reps):
    """{name: fn()} -> {name: median seconds}: one warm-up each, then the repeats interleaved
    round-robin."""
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
    """A table row: a = nanobridge, b = the reference. speedup: True = a / b (rates), or a number,
    or None."""
    rows.append((bench, model, width, a, b, (a / b if b else None) if speedup is True else speedup,
                 bound, 100 * a / bound if bound else None, note))

def fmt(v, suffix=''):
    return '-' if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10
                                  else f"{v:.2f}") + suffix

def hardware():
    """Streaming bandwidth over 4n bytes >> the last-level cache, and the dense matmul rate: the
    machine's limits."""
    n = 1 << 30 if cuda else 1 << 27  # 4 GiB on the GPU, 512 MiB on the CPU (its L3 is tens of MiB)
    A, v = torch.randn(n // 4096, 4096, device=dev), torch.randn(4096, device=dev)
    B, g = torch.empty_like(A), torch.randn(4096 if cuda else 1024, 4096 if cuda else 1024,
                                            device=dev, dtype=dt)
    t = race({'mat-vec': lambda: torch.mv(A, v), 'sum': A.sum,
              'copy (read+write)': lambda: B.copy_(A)}, 3)
    gbs = {k: (8 if k.startswith('copy') else 4) * n / s / 1e9 for k, s in t.items()}
    add('memory bandwidth GB/s, fp32 (best of)', 'machine', '-', max(gbs.values()), speedup=None,
        note=', '.join(f"{k} {v:.1f}" for k, v in gbs.items()))
    flops = 2 * g.size(0) ** 3 / race({'mm': lambda: g @ g}, 3)['mm']
    add(f'matmul GFLOP/s ({str(dt)[6:]}, {g.size(0)}^3)', 'machine', '-', flops / 1e9)
    # decode's matmul: 8 rows against a 0.5B-sized vocabulary head, fastpath.Linear
    # (oneDNN-packed on the CPU)
    lin, x = Linear(896, 151936, bias=False).to(dev, dt), torch.randn(8, 896, device=dev, dtype=dt)
    with torch.no_grad():
        t = race({'ours': lambda: lin(x),
                  'F.linear': lambda: torch.nn.functional.linear(x, lin.weight)}, 3)
    gb = lin.weight.numel() * dt.itemsize / 1e9
    add('8-row matmul, weight GB/s: fastpath.Linear vs F.linear', 'V151936 x d896 head', 8,
        gb / t['ours'], gb / t['F.linear'])
    # the bound takes the best: the machine streams at least that fast
    return max(gbs.values()) * 1e9, flops

def bench_linear():
    """fastpath.Linear's packed oneDNN path against plain F.linear, at decode's row counts, on the
    matmuls of the 0.5B shape (CPU, fp32): where Linear.min_rows comes from. Each row times the real
    path (packed from the first use)."""
    # matmuls per timed repeat: one small matmul is a few microseconds
    inner = 4 * (10 if quick else 50)
    for name, (o, i) in {'q+k+v 896->1152': (1152, 896), 'gate+up 896->9728': (9728, 896),
                         'down 4864->896': (896, 4864), 'head 896->151936': (151936, 896)}.items():
        lin, n = Linear(i, o, bias=False), max(2, inner * 1152 * 896 // (o * i))
        for r in (1, 2, 3, 4, 8, 16):
            x = torch.randn(r, i)
            with torch.no_grad(), patched(Linear, min_rows=0, pack_after=0, min_size=0):
                t = race({'packed': lambda: [lin(x) for _ in range(n)],
                          'F.linear': lambda: [torch.nn.functional.linear(x, lin.weight)
                                               for _ in range(n)]}, repeats)
            add('Linear: packed vs F.linear, matmuls/s', name, r,
                n / t['packed'], n / t['F.linear'],
                note='fastpath.Linear packs from here' if r == Linear.min_rows else '')

@contextlib.contextmanager
def patched(obj, **kw):
    old = {k: getattr(obj, k) for k in kw}
    for k, v in kw.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)

# every weight once per decode step; an untied embedding only for the rows looked up (~0)
def weight_bytes(m):
    ps = {id(p): p for k, p in m.named_parameters()
          if m.config.tie_word_embeddings or 'embed_tokens' not in k}
    return sum(p.numel() * p.element_size() for p in ps.values())

def bench_model(name, cfg, ws, bw, flops, reps):
    """Decode (+ Bridge), prefill and the log-prob pass: ours vs transformers on weights saved once
    in HF layout."""
    path = real if name == 'real' else os.path.join(tmp, name)
    if name != 'real':
        torch.manual_seed(seed)
        # random init where it runs: a 1.5B model's init on the CPU alone would take
        # ~15 s of the GPU check
        with dev:
            # in the bench dtype: half the bytes to write on the GPU run
            save_model(Transformer(cfg).to(dt), path)
    # the fast path train.py and sample.py use
    ours = fuse(load_model(path, device=dev, dtype=dt, verbose=False))
    # BridgeConfig() (d_B 512, 4 heads) at 0.5B scale and up; tiny gets train.py's d_B (~512/896 d)
    c = ours.config
    bcfg = (BridgeConfig() if c.hidden_size >= 896
            else BridgeConfig(dim=T.bridge_dim, n_head=T.bridge_heads))
    bri = fuse(load_model(path, device=dev, dtype=dt, bridge=bcfg, verbose=False))
    # the Bridge model reuses the base model's modules (the same tensors at the same addresses; only
    # the Bridge blocks are its own), so the race measures the blocks, not where two copies of the
    # weights happen to sit
    bri.model.embed_tokens, bri.model.norm, bri.lm_head = \
        ours.model.embed_tokens, ours.model.norm, ours.lm_head
    for a, b in zip(ours.model.layers, bri.model.layers):
        b.input_layernorm, b.self_attn, b.post_attention_layernorm, b.mlp = \
            a.input_layernorm, a.self_attn, a.post_attention_layernorm, a.mlp
    hf = (AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev).eval() if transformers
          else None)
    label = f"{name} ({c.num_hidden_layers}L d{c.hidden_size} V{c.vocab_size})"
    n = new_tokens if name == 'tiny' else max(4, new_tokens // 2)
    log(f"{label}: decode {n} new tokens at widths {ws}")
    prompt = torch.randint(0, c.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    x = torch.tensor([prompt], device=dev)
    for w in ws:
        # fn(k) generates k new tokens: pure sampling, no stop token, KV cache,
        # the same prompt on every side
        # the engine: what train.py and sample.py run
        keys = [engine.key(seed, r) for r in range(w)]
        sides = {
            'ours': (ours, lambda k: engine.sample(ours, [prompt], keys, w, k, 1.0, None, 1.0, ()))}
        if hf is not None:
            sides['hf'] = (hf, lambda k: hf.generate(
                x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0, top_p=1.0,
                temperature=1.0, num_return_sequences=w, max_new_tokens=k, min_new_tokens=k,
                pad_token_id=0))  # no eos
        # end to end only: the per-step timing hooks would break the compiled graph
        # (and CUDA graphs)
        if compile:
            t = race({'c': lambda: engine.sample(ours, [prompt], keys, w, n, compile=True),
                      'e': lambda: engine.sample(ours, [prompt], keys, w, n)}, reps)
            add(f'generate tok/s incl. prefill ({n} new tok): compiled decode vs eager', label, w,
                w * n / t['c'], w * n / t['e'])
        if str(w) in bridge_widths.split(','):
            sides['bridge'] = (
                bri, lambda k: engine.sample(bri, [prompt], keys, w, k, 1.0, None, 1.0, ()))
        steps, e2e = {k: [] for k in sides}, {k: [] for k in sides}
        for m, f in sides.values():
            f(2)  # warm-up: prefill and decode kernels, allocator
        for _ in range(reps):
            for k, (m, f) in sides.items():
                # timestamp every forward call: call 0 is the prefill, each later gap one decode
                # step (forward + sampling + bookkeeping), so one generate() gives prefill-free
                # step times on both sides
                ts, t0 = [], now()
                h = m.register_forward_pre_hook(lambda *_: ts.append(now()))
                f(n)
                e2e[k].append(now() - t0)
                h.remove()
                assert len(ts) == n, f"{k}: {len(ts)} forward calls for {n} tokens"
                steps[k] += [b - a for a, b in zip(ts[1:], ts[2:])]
        # all rows counted; the median shrugs off load spikes
        rate = {k: w / med(v) for k, v in steps.items()}
        # a step must at least stream every weight and the KV cache it attends over
        # (mean length of the run)
        kv = (2 * c.num_hidden_layers * w * c.num_key_value_heads * c.head_dim
              * (prompt_len + n / 2) * dt.itemsize)
        bound = {k: w * bw / (weight_bytes(m) + kv) for k, (m, f) in sides.items()}
        add('decode tok/s (prefill-free): ours vs HF generate', label, w,
            rate['ours'], rate.get('hf'), bound['ours'],
            (f"HF at {100 * rate['hf'] / bound['hf']:.0f}% of bound; " if hf else '')
            + "compute bound (matmul peak) "
              f"{flops * dt.itemsize / 2 / weight_bytes(ours):,.0f} tok/s")
        add(f'generate tok/s incl. prefill ({n} new tok): ours vs HF', label, w,
            w * n / med(e2e['ours']), w * n / med(e2e['hf']) if hf else None)
        if 'bridge' in rate:
            add('decode tok/s: with Bridge vs without', label, w,
                rate['bridge'], rate['ours'], bound['bridge'],
                f"overhead {100 * (rate['ours'] / rate['bridge'] - 1):+.1f}%; Bridge adds "
                f"{100 * (weight_bytes(bri) / weight_bytes(ours) - 1):.1f}% bytes and matmul "
                "FLOPs per token")
    def versus(bench, width, ntok, f_ours, f_hf):  # a forward pass of ntok tokens, ours vs HF
        with torch.no_grad():
            t = race({'ours': f_ours, **({'hf': f_hf} if hf else {})}, reps)
        add(bench, label, width, ntok / t['ours'], ntok / t['hf'] if hf else None)
    P, W, L = ((8, 16, prompt_len + n) if cuda or name == 'tiny'
               else (1, 4, prompt_len + n))  # big on CPU: seconds
    xs, toks = (torch.randint(0, c.vocab_size, s, device=dev) for s in ((P, prompt_len), (W, L)))
    # prefill keeps only each prompt's last logits, on both sides
    # (HF: logits_to_keep=1, as its generate does)
    versus(f'prefill tok/s ({P} x {prompt_len} tokens)', '-', P * prompt_len,
           lambda: ours(xs, cache=ours.make_cache(P, prompt_len),
                        last=torch.full((P,), prompt_len - 1, device=dev)),
           lambda: hf(input_ids=xs, use_cache=True, logits_to_keep=1))
    # the log-prob pass: grpo.token_logprobs vs HF logits -> log_softmax -> gather, as TRL does
    versus(f'log-prob pass tok/s ({W} rows x {L - 1})', W, W * (L - 1),
           lambda: grpo.token_logprobs(ours, toks, W, torch.ones_like(toks, dtype=torch.bool)),
           lambda: torch.log_softmax(hf(toks[:, :-1]).logits.float(), -1)
                   .gather(-1, toks[:, 1:, None]))

def grpo_step(model, prompts, width, n, reward_fn, steps, stop_ids=()):
    """One GRPO step as train.py's grpo_stage does it (generate, rewards, Rollout, the update with
    AdamW), timed by part: median seconds per part over `steps` steps after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=T.lr, betas=(T.beta1, T.beta2),
                            weight_decay=T.weight_decay)
    # as train.py
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    parts, lp_fn = {}, grpo.token_logprobs

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = now()
            out = fn(*a, **k)
            parts[key] = parts.get(key, 0.0) + now() - t0
            return out
        return wrapper

    def update():  # train.py's run_stage.update: clip, step, zero
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), T.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    # grpo.backward looks it up in grpo: time it there
    grpo.token_logprobs = timed('log-probs (forward)', lp_fn)
    hist = []
    try:
        for s in range(steps + 1):
            parts.clear()
            t0 = now()
            with torch.no_grad(), autocast:
                keys = [engine.key(seed + s, i) for i in range(len(prompts) * width)]
                gen = timed('sampling (engine)', engine.sample)(
                    model, prompts, keys, width, n, T.temperature, None, 1.0, stop_ids,
                    entropy=True, compile=compile)
            ro = timed('rewards + rollout',
                       lambda: grpo.Rollout.from_generation(gen, reward_fn(gen), width))()
            def step():  # train.py's grpo_stage steps 2-3: the gradients, then the optimizer
                grpo.gradients(model, ro, max_tokens=n, loss_type=T.loss_type, autocast=autocast)
                timed(OPT, update)()
            timed('update', step)()
            parts['backward'] = (parts['update'] - parts['log-probs (forward)']
                                 - parts[OPT])  # + the loss
            parts['step'] = now() - t0
            hist.append(dict(parts))
    finally:
        grpo.token_logprobs = lp_fn
    return {k: med(h[k] for h in hist[1:]) for k in hist[0]}

def bench_grpo_default(reps):
    """train.py's embedded default: its tiny model and byte tokenizer, Bridge, batch_prompts x width
    rows."""
    tok, task = write_byte_tokenizer(os.path.join(tmp, 'bytes')), Arithmetic('add', T.digits)
    cfg = ModelConfig(vocab_size=tok.n_vocab, max_position_embeddings=256, eos_token_id=tok.eos_id,
                      **TINY)
    torch.manual_seed(seed)
    model = fuse(Transformer(cfg, BridgeConfig(dim=T.bridge_dim, n_head=T.bridge_heads))
                 .to(dev).train())
    probs = random.Random(seed).sample(task.train_set, T.batch_prompts)
    prompts, w, n = [task.encode(tok, p) for p in probs], T.width, T.max_new_tokens
    rewards = lambda g: torch.tensor([task.reward(tok.decode(c), probs[i // w])
                                      for i, c in enumerate(g.completions())])
    log("GRPO step of train.py's default")
    p = grpo_step(model, prompts, w, n, rewards, reps, tok.stop_ids)
    for k in ('sampling (engine)', 'log-probs (forward)', 'backward', OPT, 'rewards + rollout'):
        add(f'GRPO step, train.py default ({len(prompts)} x {w}, {n} tok): {k}, ms',
            f'tiny ({cfg.num_hidden_layers}L d{cfg.hidden_size} V{cfg.vocab_size}) + Bridge', w,
            1000 * p[k],
            note=f"{100 * p[k] / p['step']:.0f}% of the {1000 * p['step']:.0f} ms step")

def bench_trl(reps):
    """A GRPO step, ours vs TRL's GRPOTrainer on the same tiny random Qwen2 (Qwen vocab), sampling,
    no KL, random rewards on both sides: TRL set up like ours (fp32, no gradient checkpointing,
    plain AdamW), and TRL as a user gets it (its defaults: bf16 autocast, gradient checkpointing,
    fused AdamW)."""
    cfg, path, n, w = (ModelConfig(vocab_size=151936, **TINY), os.path.join(tmp, 'trl-tiny'),
                       8 if quick else 32, 4)
    torch.manual_seed(seed)
    save_model(Transformer(cfg), path)
    ours = fuse(load_model(path, device=dev, dtype=torch.float32, verbose=False)).train()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, cfg.vocab_size, (grpo_prompt_len,), generator=g).tolist()
               for _ in range(8)]
    log(f"GRPO step: ours vs TRL ({len(prompts)} x {w}, {n} new tokens)")
    p = grpo_step(ours, prompts, w, n, lambda gen: torch.rand(gen.tokens.size(0)), reps)
    why = ('TRL race off (--trl=False, or a GPU run)' if not trl or cuda
           else '' if transformers else 'no transformers')
    trl_s = {}
    for fair in ((True, False) if not why else ()):
        try:
            trl_s[fair] = trl_step(path, prompts, w, n, reps, fair)
        except Exception as e:
            # TRL is optional (pip install trl): its absence or failure is a note, not a crash
            why = f"no TRL figure: {type(e).__name__}: {str(e)[:150]}"
    split = ', '.join(f"{k} {100 * p[k] / p['step']:.0f}%"
                      for k in ('sampling (engine)', 'log-probs (forward)', 'backward'))
    for fair, label in ((True, 'TRL like ours (fp32, no grad checkpointing)'),
                        (False, "TRL with its defaults (bf16 autocast, gradient checkpointing)")):
        t = trl_s.get(fair)
        add(f'GRPO step s: ours vs {label} ({len(prompts)} x {w}, {n} tok, '
            f'prompt {grpo_prompt_len})',
            f'tiny ({cfg.num_hidden_layers}L d{cfg.hidden_size} V{cfg.vocab_size})', w,
            p['step'], t, speedup=t / p['step'] if t else None, note=why or (split if fair else ''))

def trl_step(path, prompts, w, n, reps, fair=True):
    import datasets
    import trl as trl_lib  # (the config global `trl` is a bool)
    from tokenizers import Tokenizer, models, pre_tokenizers
    V = json.load(open(os.path.join(path, 'config.json')))['vocab_size']
    # TRL wants a tokenizer: a word-level one where the word "t{i}" is token i
    # round-trips our id prompts exactly
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token='t0'))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='t0', eos_token='t1')
    ds = datasets.Dataset.from_dict({'prompt': [' '.join(f"t{i}" for i in p) for p in prompts]})
    # a Trainer step = generate, rewards, forward, backward, optimizer; timed by a callback
    times = []
    Clock = type('Clock', (transformers.TrainerCallback,),
                 {'on_step_begin': lambda *a, **k: times.append(-now()),
                  'on_step_end': lambda *a, **k: times.append(now())})
    args = trl_lib.GRPOConfig(
        output_dir=os.path.join(tmp, 'trl-out'), per_device_train_batch_size=w * len(prompts),
        num_generations=w, max_completion_length=n, generation_kwargs={'min_new_tokens': n},
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type=T.loss_type, learning_rate=T.lr,
        max_grad_norm=T.grad_clip, max_steps=reps + 1, use_cpu=True, report_to='none',
        save_strategy='no', logging_steps=10 ** 6, disable_tqdm=True, seed=seed,
        # fair: fp32 and no recomputation, as ours;
        # else TRL 1.16's defaults (bf16=True, gradient_checkpointing=True)
        **(dict(optim='adamw_torch', gradient_checkpointing=False, bf16=False) if fair else {}))
    trainer = trl_lib.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args=args,
        train_dataset=ds, processing_class=tok, callbacks=[Clock()],
        reward_funcs=lambda completions, **kw: [random.random() for _ in completions])
    # the Trainer prints its metrics: keep stdout for the table
    with contextlib.redirect_stdout(sys.stderr):
        # reps + 1 steps on the same 8 prompts (per_device_train_batch_size counts completions)
        trainer.train()
    torch.set_num_threads(threads)  # in case the Trainer touched it
    return med(b + a for a, b in zip(times[2::2], times[3::2]))  # steps after the first (a warm-up)

HF_JOB = '''import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(path)
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                               tokenize=False)
m.generate(tok(text, return_tensors="pt").input_ids, do_sample=True, temperature=0.8, top_k=0,
           num_return_sequences=4, max_new_tokens=64)'''

def bench_oneshot(path, reps=3):
    """What most users run once: a whole `python sample.py` process (imports, load, tokenizer, chat
    template, 4 answers of up to 64 tokens) against the same job in transformers, interleaved, wall
    time per process."""
    import subprocess
    prompt, env = ('What is 12 times 7? Explain briefly.',
                   {**os.environ, 'OMP_NUM_THREADS': str(threads)})
    cmds = {'ours': [sys.executable,
                     os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sample.py'),
                     f'--init_from={path}', f'--prompt={prompt}', '--width=4',
                     '--max_new_tokens=64'],
            'hf': [sys.executable, '-c', HF_JOB, path, prompt]}
    t = {k: [] for k in cmds}
    log(f"one-shot sample.py vs transformers, {reps} interleaved runs each")
    for _ in range(reps):
        for k, c in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(c, env=env, capture_output=True, check=True)
            t[k].append(time.perf_counter() - t0)
    ratios = sorted(h / o for o, h in zip(t['ours'], t['hf']))
    add('one-shot `python sample.py` process s (width 4, <= 64 tok): ours vs transformers',
        'real checkpoint', 4, med(t['ours']), med(t['hf']), speedup=med(t['hf']) / med(t['ours']),
        note=f"per-run speedups {', '.join(f'{r:.2f}x' for r in ratios)}; seconds ours "
             f"{', '.join(f'{v:.1f}' for v in t['ours'])}, "
             f"transformers {', '.join(f'{v:.1f}' for v in t['hf'])}")

if __name__ == '__main__':
    t_start = time.time()
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
                if l.startswith('model name')), '?')
    machine = (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (every side), "
        f"load average {os.getloadavg()[0]:.1f} at start, torch {torch.__version__}, transformers "
        f"{transformers.__version__ if transformers else 'not installed: its column is empty'}, "
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({str(dt)[6:]})")
    log(machine)
    if only in ('memory', 'linear'):
        memory_rows(mem_tokens or '256,1024,4096', device, threads, cuda, log, add) \
            if only == 'memory' else bench_linear()
        print(f"{machine}\n" + '\n'.join(
            f"| {b} | {m} | {w} | {fmt(a)} | {fmt(r)} | {fmt(s, 'x')} | {note} |"
            for b, m, w, a, r, s, bd, pct, note in rows))
        sys.exit(0)
    bw, flops = hardware()
    if not cuda:
        bench_linear()
    # one forward of a big model = seconds
    ws, reps_big = [int(v) for v in widths.split(',')], max(1, repeats - 1)
    bench_model('tiny', ModelConfig(vocab_size=tiny_vocab, **TINY), ws, bw, flops, repeats)
    bench_model('real' if real else '0.5B', ModelConfig(num_hidden_layers=2 if quick else 24),
                ws, bw, flops, reps_big)
    if cuda:
        bench_model('1.5B', ModelConfig(**QWEN15), [1, 16, 64], bw, flops, reps_big)
    if real and transformers:
        bench_oneshot(real)
    bench_grpo_default(repeats)
    if mem_tokens:  # peak memory of one GRPO update: chunked head + checkpointing vs full logits
        memory_rows(mem_tokens, device, threads, cuda, log, add)
    bench_trl(reps_big)
    print(f"machine: {machine}\n\n| benchmark | model | width | nanobridge | reference | speedup "
          "| bound | % of bound | note |\n|---|---|---|---|---|---|---|---|---|")
    for b, m, w, a, r, s, bd, pct, note in rows:
        print(f"| {b} | {m} | {w} | {fmt(a)} | {fmt(r)} | {fmt(s, 'x')} | {fmt(bd)} "
              f"| {fmt(pct, '%')} | {note} |")
    print(f"\nbound = width x bandwidth / (weight + KV-cache bytes per decode step), bandwidth = "
          f"the best measured; median of {repeats} repeats ({reps_big} past tiny); "
          f"wall time {time.time() - t_start:.0f} s")
