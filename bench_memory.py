"""
The memory probe of bench.py: one GRPO update (grpo.gradients + AdamW) of one group of 4 rows,
measured in a fresh process, since peak RSS is a process high-water mark.
`python bench.py --only=memory` runs it once per table row:
    python bench_memory.py --spec=tiny:1024:1 --threads=1
    # prints {"extra": bytes, "seconds": s, "estimate": bytes}
spec = shape:tokens:new. shape: 'tiny' (train.py's embedded model with Qwen's vocabulary) or '0.5B';
tokens: the completion tokens per row; new: 1 = the chunked head with grad_checkpoint,
0 = the full-logits head without it.
--stage=warmup measures one step of the Bridge warm-up instead: cross-entropy of the Bridge
weights alone on one group of 4 answers (train.teacher_forced's micro-batch), against train.py's
estimate of it.
"""
import contextlib, json, os, subprocess, sys, time

import torch

import grpo
import train as T  # train.py's default config (its globals); its main part only runs as a script
from bridge import BridgeConfig
from fastpath import fuse
from memory import memory_estimate
from model import ModelConfig, Transformer
from settings import UserError

# train.py's embedded model; 0.5B = ModelConfig()
TINY = dict(hidden_size=T.n_embd, intermediate_size=T.ffn, num_hidden_layers=T.n_layer,
            num_attention_heads=T.n_head, num_key_value_heads=T.n_kv_head, rope_theta=10000.0)
spec, device, threads, seed, stage = 'tiny:256:1', 'cpu', 1, 1337, 'grpo'
grpo_prompt_len = 16    # prompt tokens per row, as in bench.py's GRPO rows

def clock(cuda):
    if cuda:
        # GPU work is asynchronous: a timestamp means nothing until it has finished
        torch.cuda.synchronize()
    return time.perf_counter()

def full_logprobs(model, tokens, width, alive, temperature=1.0, start=0):
    """The log-prob pass as it was before the chunked head: every logit at once,
    log_softmax, gather."""
    logits = model(tokens[:, :-1], width=width, alive=alive[:, :-1],
                   start=start)[0].float() / temperature
    return torch.nn.functional.pad(
        torch.log_softmax(logits, -1).gather(-1, tokens[:, start + 1:, None])[..., 0], (start, 0))

def rss(field='VmRSS'):
    """This process's resident memory now (VmRSS) or at its peak (VmHWM). Not ru_maxrss: exec keeps
    the parent's."""
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith(field)).split()[1]) * 1024

def probe_update(spec, dev, stage='grpo'):
    """A GRPO update (grpo.gradients + AdamW) of one group of 4 rows in this fresh process: its
    peak extra memory (CPU: peak RSS; CUDA: max_memory_allocated), its time, and train.py's
    estimate of it. new = the chunked head with grad_checkpoint; else the full-logits head
    without it, as before."""
    shape, n, new, cuda = *spec.split(':'), dev.type == 'cuda'
    if shape not in ('tiny', '0.5B'):
        raise UserError(f"spec={spec!r}: expected shape:tokens:new with shape 'tiny' or '0.5B'")
    n, new = int(n), new == '1'
    cfg = ModelConfig(vocab_size=151936, **(TINY if shape == 'tiny' else {}))
    bcfg = (BridgeConfig(dim=T.bridge_dim, n_head=T.bridge_heads) if shape == 'tiny'
            else BridgeConfig())
    torch.manual_seed(seed)
    model = fuse(Transformer(cfg, bcfg).to(dev).train())
    model.grad_checkpoint, model.head_chunk, w, P = new, 1024, 4, grpo_prompt_len
    if not new:
        grpo.token_logprobs = full_logprobs
    tokens = torch.randint(0, cfg.vocab_size, (w, P + n), device=dev)
    mask = (torch.arange(P + n, device=dev) >= P).expand(w, -1)[:, 1:]
    ro = grpo.Rollout(tokens, torch.ones_like(tokens, dtype=torch.bool), mask,
                      torch.randn(w, device=dev), w, torch.full((w,), P, device=dev))
    n_params = sum(p.numel() for p in model.parameters())
    # the Bridge weights alone train; targets are the answers' tokens, not the prompt's
    if stage == 'warmup':
        model.requires_grad_(False)
        for b in model.bridge_modules():
            b.requires_grad_(True)
        targets = torch.where(mask, tokens[:, 1:], -1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0
    def warmup_step(*_, autocast):
        with autocast:
            loss = model(tokens[:, :-1], targets, width=w)[1]
        loss.backward()
        update()
    def grpo_step(ro, autocast):
        grpo.gradients(model, ro, autocast=autocast)
        update()
    step = warmup_step if stage == 'warmup' else grpo_step
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    before = torch.cuda.memory_allocated() if cuda else rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # the second update is the steady state: AdamW's state is resident through its backward
    for _ in range(2):
        t0 = clock(cuda)
        step(ro, autocast=autocast)
        dt = clock(cuda) - t0
    peak = torch.cuda.max_memory_allocated() if cuda else rss('VmHWM')
    est = memory_estimate(cfg, bcfg, n_params=n_params, n_train=sum(p.numel() for p in params),
                          mb_rows=w, rows=0 if stage == 'warmup' else w, tokens=P + n,
                          new_tokens=n, chunk=1024, width=w, bf16=cuda)
    est = sum(est[k] for k in ('gradients', 'AdamW state', 'AdamW step temporaries',
                               'update activations, grad_checkpoint on'))
    print(json.dumps({'extra': peak - before, 'seconds': dt, 'estimate': est}))

def memory_rows(spec_tokens, device, threads, cuda, log, add):
    """bench.py's memory rows, each given to add(): the tiny model at each of spec_tokens completion
    tokens and 0.5B at 1,024, ours against the full-logits head, each probe in a fresh process."""
    def run(spec):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), f'--spec={spec}',
                            f'--device={device}', f'--threads={threads}'],
                           capture_output=True, text=True)
        return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    for shape, n in [('tiny', int(t)) for t in spec_tokens.split(',')] + [('0.5B', 1024)]:
        log(f"memory of one GRPO update: {shape}, 4 rows x {n} completion tokens")
        # the full-logits head needs ~1.8 MB per token:
        # past 1,024 tokens x 4 rows it does not fit on this CPU
        new, old = run(f'{shape}:{n}:1'), run(f'{shape}:{n}:0') if cuda or 4 * n <= 4096 else None
        if new is None:
            continue
        add(f'GRPO update peak extra MB (4 rows x {n} tok): '
            'chunked head + grad_checkpoint vs full logits',
            'tiny (4L d128 V151936) + Bridge' if shape == 'tiny'
            else '0.5B (24L d896 V151936) + Bridge', 4,
            new['extra'] / 2**20, old['extra'] / 2**20 if old else None, speedup=None,
            note=f"KB/token {new['extra'] / 4 / n / 1024:,.0f} vs "
                 + (f"{old['extra'] / 4 / n / 1024:,.0f}" if old else 'does not fit')
                 + f"; estimate {new['estimate'] / 2**20:,.0f} MB; step {new['seconds']:.2f} s vs "
                 + (f"{old['seconds']:.2f} s" if old else '-'))

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    torch.set_num_threads(threads)
    if stage not in ('grpo', 'warmup'):
        raise UserError(f"stage={stage!r}: expected 'grpo' or 'warmup'")
    probe_update(spec, torch.device(device), stage)
