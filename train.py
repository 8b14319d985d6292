"""
Bridge training: SFT, the paper's Bridge warm-up, GRPO with verifiable rewards, and evaluation at every width.
With no arguments it runs the embedded default on a laptop CPU in a few minutes: SFT a tiny Qwen-shaped model from
scratch on a procedural "draft;final" addition task, add zero-initialised Bridge blocks (still exactly the SFT model),
warm up the Bridge weights on groups of the model's own correct answers (paper sec. 2.2), GRPO the full model + Bridge
with each group sampled and scored jointly, and evaluate at widths 1-16 (out_dir/eval_grpo.json).
  python train.py                                     # the embedded default
  python train.py config/rlvr.py                      # same budget, no Bridge (the RLVR-only baseline)
  python train.py --init_from=resume --mode=eval      # evaluate out/ckpt as it stands
  python train.py --init_from=resume --grpo_steps=600 # continue out/ckpt's GRPO to 600 steps
  torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_qwen7b.py   # FSDP2: a 7B on 8 GPUs
"""
import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from bridge import BridgeConfig, BridgeProbe, bridge_params, bridge_report
from model import (ModelConfig, Transformer, atomic_dir, atomic_write, check_memory, fsdp_units, full_state, gathered,
                   memory_estimate, recover_dir, shard)
from sample import Tokenizer, free_cores, generate, write_byte_tokenizer
import grpo

# -----------------------------------------------------------------------------
# default config: the embedded CPU run. Every global can be overridden with --key=value or a config file.
# I/O
out_dir = 'out'
init_from = 'scratch'   # 'scratch' (tiny embedded model) | 'resume' (out_dir/ckpt) | an HF checkpoint directory
mode = 'sft,eval,warmup,grpo,eval'  # stages to run, in order: any of sft, warmup, grpo, eval
overwrite = False       # True: replace out_dir/ckpt even if another run (or init_from itself) is in it
save_every = 100        # checkpoint every this many steps (and at the end of each stage)
log_interval = 10       # print every this many steps' log line (and each stage's last; SFT's evals always)
seed = 1337
# data
task = 'add'            # 'add' | 'maxdigit' (embedded; maxdigit = the positive control) | 'gsm8k' | 'math' | 'jsonl'
digits = 2              # difficulty of the embedded task: operand digits
data_train, data_test = '', ''  # JSONL files for gsm8k/math/jsonl tasks
test_keys = ''          # 'prompt_key,answer_key' of data_test, e.g. 'problem,answer' for AIME/AMC/MATH-500 JSONL
chat_template = 'auto'  # 'auto' = the checkpoint's own template | 'plain'
instruction = ' Please reason step by step, and put your final answer within \\boxed{}.'
# model built from scratch (init_from='scratch')
n_layer, n_embd, n_head, n_kv_head, ffn = 4, 128, 4, 2, 336
# Bridge
use_bridge = True       # add Bridge blocks before warm-up/GRPO (False = the RLVR-only baseline)
bridge_dim, bridge_heads = 64, 4  # d_B in heads (the paper-scale default is 512 in 4; tiny models need less)
bridge_mode = 'bridge'  # 'bridge' | 'self' (same params, each row sees only itself) | 'pmatch'
# SFT (from scratch): stop on a held-out greedy accuracy target, checked every sft_eval_every steps
sft_lr, sft_batch = 3e-3, 256
sft_steps = 1000        # step cap (the embedded task's seeds reach the target in ~250-600 steps)
sft_target = 0.55       # stop once greedy held-out accuracy reaches this
sft_eval_every = 50
sft_max_seconds = 0     # also stop after this long (0 = never: a clock makes the run depend on the machine's load)
# Bridge warm-up (paper): the base model's own correct answers, >= 2 per problem, train Bridge weights only
warmup_steps, warmup_lr = 100, 1e-3
warmup_problems = 32    # problems sampled per warm-up step
# GRPO
grpo_steps = 300        # length of the LR schedule
max_iters = 0           # stop after this many GRPO steps (0 = grpo_steps); resume continues from here
batch_prompts = 32      # prompts per step (all ranks together); rows = batch_prompts * width
width = 4               # generation width = GRPO group = Bridge group
lr, min_lr, warmup_iters = 3e-4, 3e-5, 10  # AdamW: linear warm-up for warmup_iters, then cosine down to min_lr
weight_decay = 0.0
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
temperature, top_k, top_p = 1.0, 0, 1.0  # rollout sampling (top_k=0, top_p=1: no truncation)
max_new_tokens = 16
loss_type = 'dapo'      # 'dapo' (token-level, the paper's) | 'grpo' | 'dr_grpo'
eps_low, eps_high = 0.2, 0.2
beta = 0.0              # KL weight; a frozen reference model is kept only when > 0
num_iterations = 1      # policy updates per batch of rollouts (> 1 uses the clipped ratio against old log-probs)
scale_rewards = 'group' # 'group' = (r - mean) / (std + eps) | 'none' = Dr. GRPO
mask_truncated = False  # drop completions that hit max_new_tokens from the loss
micro_groups = 0        # groups per micro-batch for the gradient pass (0 = all); a group is never split
logprob_chunk = 1024    # tokens per chunk of the vocabulary head in the log-prob/CE pass (0 = all at once)
grad_checkpoint = None  # recompute blocks in backward; None = on for models of >= 100M params (see memory_estimate)
bridge_only = False     # GRPO trains only Bridge weights
# evaluation
eval_widths = '1,2,4,8,16'
eval_problems = 256
eval_samples = 16       # rows per problem at every width: eval_samples // w groups of w
eval_temperature = 1.0
# system
device = 'auto'         # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'          # 'auto' = bf16 autocast on CUDA, fp32 on CPU | 'bfloat16' (autocast on any device) | 'float32'
compile = False         # torch.compile the training forward and the sampler's decode step (CUDA graphs on a GPU)
threads = 0             # CPU threads; 0 = pick from the free cores
fsdp = False            # under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2); False = DDP
dry_run = False         # print the memory estimate, then stop
wandb_log, wandb_project = False, 'nanobridge'
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
# -----------------------------------------------------------------------------

def check_config():
    bad = [msg for wrong, msg in [
        (not set(mode.split(',')) <= {'sft', 'warmup', 'grpo', 'eval'}, f"mode={mode!r}: stages must be among sft, "
         "warmup, grpo, eval"),
        ('grpo' in mode and width < 2, f"width={width}: GRPO needs at least 2 rows per group to compare rewards"),
        (batch_prompts % ddp_world, f"batch_prompts={batch_prompts} is not divisible by the {ddp_world} DDP ranks"),
        (loss_type not in grpo.LOSS_TYPES, f"loss_type={loss_type!r}: expected one of {grpo.LOSS_TYPES}"),
        (task not in ('add', 'maxdigit', 'gsm8k', 'math', 'jsonl'), f"task={task!r}: expected add, maxdigit, gsm8k, "
         "math or jsonl"),
        *[(task not in EMBEDDED and not os.path.isfile(f), f"data file {f!r} does not exist (set --data_train/"
           "--data_test)") for f in (data_train, data_test)],
        (dtype not in ('auto', 'bfloat16', 'float32'), f"dtype={dtype!r}: expected auto, bfloat16 or float32 (float16 "
         "would need loss scaling)"),
        (test_keys and len(test_keys.split(',')) != 2, f"test_keys={test_keys!r}: expected 'prompt_key,answer_key'"),
        (device.split(':')[0] not in ('auto', 'cpu', 'cuda'), f"device={device!r}: expected auto, cpu, cuda or cuda:N"),
        (device.startswith('cuda') and not torch.cuda.is_available(), f"device={device!r} but "
         "torch.cuda.is_available() is False"),
        (fsdp and 'RANK' not in os.environ, "fsdp=True runs under torchrun (one GPU too: torchrun --standalone "
         "--nproc_per_node=1 train.py)"),
        (fsdp and compile, "fsdp=True with compile=True is not wired up (torchtitan compiles each block, then shards)"),
    ] if wrong]
    if bad:
        raise ValueError("config: " + "; ".join(bad))

def check_overwrite(model_dir, stages, ckpt):
    """Never destroy a model unasked: a run that saves may not write into the checkpoint it loads, nor replace the
    checkpoint of another run. --init_from=resume writes where it reads on purpose; --overwrite=True allows it."""
    if init_from == 'resume' or overwrite or dry_run or not {'sft', 'warmup', 'grpo'} & set(stages):
        return
    same = model_dir and os.path.realpath(model_dir) == os.path.realpath(ckpt)
    if same or any(os.path.exists(ckpt + s) for s in ('', '.new', '.old')):
        raise ValueError((f"--init_from={init_from} is the checkpoint this run would overwrite (it saves to {ckpt})" if
                          same else f"{ckpt} holds another run's checkpoint, which this run (--init_from={init_from}) "
                          "would replace") + ": continue that run with --init_from=resume, write to another --out_dir, "
                         "or pass --overwrite=True to replace it")

# -----------------------------------------------------------------------------
# data: a problem is a dict with prompt text, gold answer, and the reference response used for SFT
EMBEDDED = ('add', 'maxdigit')  # procedural tasks in the 'draft;final' format, for the byte-level tiny model

def load_problems(split):
    """The embedded tasks, or GSM8K / MATH / generic JSONL with line-numbered errors."""
    if task in EMBEDDED:
        return grpo.addition_problems(split, digits) if task == 'add' else grpo.maxdigit_problems(split)
    if split == 'test' and test_keys:
        return grpo.read_jsonl(data_test, 'jsonl', tuple(test_keys.split(',')))
    return grpo.read_jsonl(data_train if split == 'train' else data_test, task)

def encode_prompt(tok, text):
    if task in EMBEDDED:  # the embedded model has no chat format: the prompt is the raw 'ab+cd='
        return tok.encode(text)
    return tok.encode_chat(text + instruction, template='plain' if chat_template == 'plain' else None)

def reward(text, problem):
    return (grpo.add_reward if task in EMBEDDED else grpo.math_reward)(text, problem['answer'])

# -----------------------------------------------------------------------------
# the shared training loop: LR schedule, grad sync across ranks, clipping, logging, checkpoints, resume
def get_lr(it, base, total):
    if it < warmup_iters:  # linear warm-up, then cosine down to min_lr (nanoGPT)
        return base * (it + 1) / warmup_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, total - warmup_iters))
    return min_lr * base / lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (base - min_lr * base / lr)

def sync_grads(params):
    """DDP by hand: every rank owns whole groups, so summing the already globally-normalised gradients is exact."""
    if ddp_world > 1 and not fsdp:  # FSDP's reduce-scatter sums them instead
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)

def all_sum(*xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=dev)
    if ddp_world > 1:
        dist.all_reduce(t)
    return t.tolist()

def save_checkpoint(stage, step, opt, extra=None):
    """Model (+ Bridge) as HF safetensors, its tokenizer, and the rest (optimizer, RNG, step, config), written
    into a fresh directory that then replaces out_dir/ckpt whole: a crash never leaves two steps mixed."""
    sd, optim = full_state(raw_model, None, fsdp), full_state(raw_model, opt, fsdp)
    if not master:
        return
    state = {'stage': stage, 'step': step, 'optimizer': optim, 'config': config, 'extra': extra or {},
             'rng': {'torch': torch.get_rng_state(), 'python': random.getstate()}}
    def write(path):  # every checkpoint carries its tokenizer files
        raw_model.save_pretrained(path, state_dict=sd)
        if model_dir is None:
            write_byte_tokenizer(path)
        for f in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'qwen.tiktoken'):
            if model_dir and os.path.exists(os.path.join(model_dir, f)):
                shutil.copy(os.path.join(model_dir, f), path)
        torch.save(state, os.path.join(path, 'train_state.pt'))  # last: its presence marks a checkpoint to resume
    atomic_dir(os.path.join(out_dir, 'ckpt'), write)

def resume_plan(stages, state, path):
    """(stages left, first step, optimizer state) for --init_from=resume: the checkpoint's stage goes on from its step,
    or is skipped once finished (unless its step count was raised), and the stages listed before it are skipped; a
    --mode without that stage runs all its stages from step 0 on the checkpoint's weights."""
    s, step = state['stage'], state['step']
    if s not in stages:
        return stages, 0, None
    i, total = stages.index(s), globals()[f'{s}_steps']
    if state['extra'].get('done') or step >= total:
        if master:
            print(f"resume: {path} finished {s} at step {step}/{total}" + ("" if state['extra'].get('done') else
                  f"; raise --{s}_steps to train it further"))
        return stages[i + 1:], 0, None
    if state['config'].get('fsdp', False) != fsdp:  # DDP's AdamW state is by index, FSDP's by name
        raise ValueError(f"{path} was written with fsdp={not fsdp}; resume it with --fsdp={not fsdp}")
    return stages[i:], step, state['optimizer']

def run_stage(stage, params, base_lr, step_fn, start=0, opt_state=None, should_stop=None):
    """Runs step_fn(step, update) -> metrics for steps start..total-1 with AdamW. step_fn does its own backward
    passes (a step may hold several micro-batches and, for GRPO, several inner updates via `update`)."""
    # train exactly `params`: the rest is frozen (no weight gradients computed or held for it), and every stage
    # starts with no gradients, so nothing from an earlier stage (e.g. the Bridge-only warm-up) leaks into this one
    raw_model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    raw_model.zero_grad(set_to_none=True)
    for m in fsdp_units(raw_model):  # FSDP fixes a unit's gradient dtypes from requires_grad when it gathers: do it now
        m.unshard()
        m.reshard()
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(beta1, beta2), weight_decay=weight_decay,
                            **({'fused': True} if dev.type == 'cuda' else {}))
    if opt_state is not None:
        full_state(raw_model, opt, fsdp, load=opt_state)

    def update():  # one optimizer step: sync, clip, step, zero
        sync_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    total, t_start = globals()[f'{stage}_steps'], time.time()  # sft_steps, warmup_steps, grpo_steps
    stop_at = min(total, max_iters) if stage == 'grpo' and max_iters else total
    for step in range(start, stop_at):
        for g in opt.param_groups:
            g['lr'] = get_lr(step, base_lr, total)
        t0 = time.time()
        m = step_fn(step, update)
        eta = (time.time() - t_start) / (step + 1 - start) * (stop_at - step - 1)
        if master and ((step + 1) % log_interval == 0 or step + 1 == stop_at or 'acc' in m and stage == 'sft'):
            print(f"{stage} {step + 1}/{total}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in m.items())
                  + f", lr {g['lr']:.2e}, {1000 * (time.time() - t0):.0f}ms, eta {eta:.0f}s")
            if wandb_log:
                wandb.log({f"{stage}/{k}": v for k, v in m.items()}, step=step)
        done = bool(should_stop and should_stop(step, m))  # e.g. SFT reached its accuracy target or its time limit
        if should_stop and ddp_world > 1:  # ranks' clocks differ: all leave together, or their collectives mismatch
            done = all_sum(done)[0] > 0
        if done or (step + 1) % save_every == 0 or step + 1 == stop_at:
            save_checkpoint(stage, step + 1, opt, {'done': True} if done else None)
        if done:
            break

# -----------------------------------------------------------------------------
# stages
def sft(start=0, opt_state=None):
    """Cross-entropy on prompt -> response pairs (prompt tokens are not predicted)."""
    train, test = load_problems('train'), load_problems('test')[:eval_problems][ddp_rank::ddp_world]
    t_begin = time.time()

    def step_fn(step, update):
        rng = random.Random(seed * 1000 + step * ddp_world + ddp_rank)  # salt 0 of rollout()'s scheme
        seqs = [(encode_prompt(tok, p['prompt']), tok.encode(p['response']) + [tok.eos_id])
                for p in (rng.choice(train) for _ in range(sft_batch // ddp_world))]
        T = max(len(a) + len(b) for a, b in seqs)  # right-padded; y = -1 where no loss is taken (prompt, padding)
        x, y = torch.full((len(seqs), T), tok.pad_id), torch.full((len(seqs), T), -1)
        for i, (a, b) in enumerate(seqs):
            x[i, :len(a) + len(b)] = torch.tensor(a + b)
            y[i, len(a) - 1:len(a) + len(b) - 1] = torch.tensor(b)
        with autocast:
            _, loss = model(x.to(dev), y.to(dev))
        (loss / ddp_world).backward()  # ranks' gradients are summed by sync_grads
        gn = update()
        m = {'loss': all_sum(loss.item())[0] / ddp_world, 'gnorm': gn}
        if (step + 1) % sft_eval_every == 0:  # greedy held-out accuracy: the stopping rule
            s, n = all_sum(sample_and_score(test, 1, 0.0, seed)[2].sum(), len(test))
            m['acc'] = s / n
        return m

    def should_stop(step, m):
        return m.get('acc', 0) >= sft_target or 0 < sft_max_seconds < time.time() - t_begin
    run_stage('sft', list(model.parameters()), sft_lr, step_fn, start, opt_state, should_stop)

def sample_and_score(problems, w, temp, gen_seed, entropy=False):
    """The one place that samples: `w` rows per problem -> (Generation, texts, rewards, every row's problem)."""
    env = grpo.maxdigit_env(tok, gen_seed + 7919 * (ddp_rank + 1)) if task == 'maxdigit' else None
    with torch.no_grad(), autocast, gathered(raw_model, fsdp):
        gen = generate(raw_model, [encode_prompt(tok, p['prompt']) for p in problems], w, max_new_tokens, temp,
                       top_k or None, top_p, tok.stop_ids, seed=gen_seed, entropy=entropy, compile=compile, env=env)
    texts = [tok.decode(c) for c in gen.completions()]
    rows = [problems[i // w] for i in range(len(texts))]
    if task == 'maxdigit':  # the gold answer is the largest digit the environment wrote in the group
        rows = [{**p, 'answer': a} for p, a in zip(rows, grpo.maxdigit_answers(texts, w))]
    return gen, texts, torch.tensor([reward(t, p) for t, p in zip(texts, rows)]), rows

def rollout(train, n_prompts, step, salt):
    """`width` answers to each of this rank's share of n_prompts training problems, and their rewards. Everything
    random comes from (seed, stage, step, rank): that is what makes resume exact."""
    rng = random.Random(seed * 1000 + salt * 100 + step * ddp_world + ddp_rank)
    probs = [rng.choice(train) for _ in range(n_prompts // ddp_world)]
    gen, _, r, _ = sample_and_score(probs, width, temperature, rng.randrange(2**31), entropy=True)
    return gen, r

def warmup(start=0, opt_state=None):
    """Paper sec. 2.2: groups of the base model's own correct answers, Bridge weights only. A problem with k
    correct answers (2 <= k <= width) becomes one group of `width` rows whose unused rows are fully dead
    (alive=False everywhere): they are masked out of Bridge and the loss, so groups need no equal size."""
    train = load_problems('train')

    def step_fn(step, update):
        gen, r = rollout(train, warmup_problems, step, salt=2)
        ok = r.view(-1, width) > 0
        keep = ok.sum(1) >= 2
        loss = torch.zeros(())
        if keep.any() or fsdp:  # FSDP: every rank's backward takes part in the reduce-scatter (here with 0 rows)
            rows = (ok & keep[:, None]).flatten().to(dev)
            mask = gen.completion_mask & ~gen.from_env & rows[:, None]
            y = torch.where(mask[:, 1:], gen.tokens[:, 1:], -1)
            with autocast:
                _, loss = model(gen.tokens[:, :-1], y, width=width, alive=gen.alive[:, :-1] & rows[:, None])
            (loss / ddp_world).backward()
        gn = update()
        n_keep, acc = all_sum(keep.sum(), ok.float().mean())
        return {'loss': loss.item(), 'kept_groups': int(n_keep), 'acc': acc / ddp_world, 'gnorm': gn}
    run_stage('warmup', [p for b in raw_model.bridge_modules() for p in b.parameters()], warmup_lr, step_fn, start,
              opt_state)

def grpo_stage(start=0, opt_state=None):
    train = load_problems('train')
    params = [p for b in raw_model.bridge_modules() for p in b.parameters()] if bridge_only else \
        list(raw_model.parameters())
    ref = None
    if beta > 0:  # the KL reference: the model as GRPO starts, kept on disk so that a resumed run has it too
        path = os.path.join(out_dir, 'ref')
        if not start:
            sd = full_state(raw_model, None, fsdp)
            if master:
                atomic_dir(path, lambda p: raw_model.save_pretrained(p, state_dict=sd))
        if dist.is_initialized():
            dist.barrier()
        ref = Transformer.from_pretrained(path, device=dev, dtype=torch.float32, verbose=False).requires_grad_(False)
        ref = shard(ref, ddp_world, use_bf16, train=False) if fsdp else ref
    health = grpo.Health()

    def step_fn(step, update):
        t0 = time.time()
        gen, r = rollout(train, batch_prompts, step, salt=3)
        t_sample = time.time() - t0
        ro = grpo.Rollout.from_generation(gen, r, width, scale_rewards, mask_truncated)
        stats = grpo.policy_update(model, ro, update, all_sum, micro_groups=micro_groups, ref=ref,
                                   temperature=temperature or 1.0, loss_type=loss_type, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, num_iterations=num_iterations,
                                   max_tokens=max_new_tokens, autocast=autocast)
        zero_std, trunc, mean_r, acc, n_tok = all_sum(  # one all-reduce for the step's statistics
            (r.view(-1, width).std(1) == 0).float().mean() / ddp_world, (~gen.finished).float().mean() / ddp_world,
            r.mean() / ddp_world, (r > 0).float().mean() / ddp_world, gen.lengths.sum())
        for msg in health(step + 1, mean_r, zero_std, trunc, max_new_tokens) if master else []:
            print(f"WARNING: {msg}")
        dt = time.time() - t0
        return {'reward': mean_r, 'acc': acc,
                'zero_std': zero_std, **stats, 'len': float(gen.lengths.float().mean()), 'trunc': trunc,
                'tok/s': n_tok / dt, 'sample': f"{100 * t_sample / dt:.0f}%",
                **({'mem': f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f}G"} if dev.type == 'cuda' else {})}
    run_stage('grpo', params, lr, step_fn, start, opt_state)

def evaluate(after='init'):
    """The paper's metrics at every width, plus whether Bridge reads its siblings at all: grpo.eval_metrics, the
    width gain, and the probe's norm ratio and sibling share per layer (at width 4, the paper's training width).
    Written to out_dir/eval_{after}.json, `after` being the stage that preceded it (sft, warmup, grpo)."""
    test = load_problems('test')[:eval_problems][ddp_rank::ddp_world]
    widths, results, probe = sorted(int(v) for v in eval_widths.split(',')), {}, BridgeProbe(raw_model)
    for w in widths:
        groups = max(1, eval_samples // w)
        probs = [p for p in test for _ in range(groups)]  # `groups` independent groups of w rows per problem
        probe.reset()
        gen, texts, _, rows = sample_and_score(probs, w, eval_temperature, seed + w)
        m = grpo.eval_metrics(texts, rows, w, reward, grpo.final_answer if task in EMBEDDED else None, gen.lengths)
        v = all_sum(*[x for pair in m.values() for x in pair])  # (sum, count) pairs, added over ranks
        results[w] = {k: v[2 * i] / v[2 * i + 1] for i, k in enumerate(m) if v[2 * i + 1]}  # none counted: '-'
        results[w]['width_gain'] = results[w]['acc'] - results[widths[0]]['acc']
        if task == 'maxdigit':  # what a row that cannot read its siblings could reach at best
            results[w]['chance'] = grpo.max_chance(w)
        shares = probe.sibling_shares()  # {} without Bridge blocks
        results[w] |= {'sibling': sum(shares.values()) / len(shares)} if shares else {}
        if shares and w == (4 if 4 in widths else max(widths)):  # per layer at the paper's training width
            results |= {'bridge_norm_ratio': probe.norm_ratios(), 'bridge_sibling_share': shares, 'probe_width': w}
    probe.remove()
    if master:
        print(grpo.format_table(results))
        atomic_write(os.path.join(out_dir, f'eval_{after}.json'),
                     json.dumps({str(k): v for k, v in results.items()}, indent=1))
    return results

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}
    ddp_rank, ddp_world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    master = ddp_rank == 0
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    check_config()
    stages, start, opt_state, after = mode.split(','), 0, None, 'init'
    ckpt = os.path.join(out_dir, 'ckpt')
    model_dir = ckpt if init_from == 'resume' else None if init_from == 'scratch' else init_from
    check_overwrite(model_dir, stages, ckpt)
    if ddp_world > 1 or fsdp:
        if dev.type == 'cuda':
            dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    torch.set_num_threads(threads or max(1, free_cores() // ddp_world))
    if master:
        print(f"device {dev}, {torch.get_num_threads()} CPU threads per rank, {ddp_world} rank(s)")
    torch.manual_seed(seed)
    if init_from == 'resume':
        if master:
            recover_dir(ckpt)  # a save killed between its two renames: complete it before any rank reads ckpt
        if dist.is_initialized():
            dist.barrier()
        path = os.path.join(ckpt, 'train_state.pt')
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--init_from=resume but {path} does not exist (no checkpoint in out_dir={out_dir!r})")
        try:  # only tensors and plain values: weights_only=True, so a tampered checkpoint cannot run code
            state = torch.load(path, map_location='cpu', weights_only=True)  # each rank moves its optimizer state
        except Exception as e:
            raise ValueError(f"{path} is not a readable training state, refusing to load it "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        # resume goes on with the run as it was configured: only what this command sets, and what concerns this
        # invocation alone, is not read from the checkpoint
        globals().update({k: v for k, v in state['config'].items() if k in config and k not in _overrides | {
            'init_from', 'mode', 'out_dir', 'overwrite', 'dry_run', 'device', 'threads', 'compile', 'max_iters',
            'log_interval', 'wandb_log', 'wandb_project'}})
        config = {k: globals()[k] for k in config_keys}
        check_config()
        stages, start, opt_state = resume_plan(stages, state, ckpt)
        after = state['stage']
        torch.set_rng_state(state['rng']['torch'])
        random.setstate(state['rng']['python'])
        del state  # the optimizer state lives on in opt_state only until its stage has loaded it
    use_bf16 = dtype == 'bfloat16' or (dtype == 'auto' and dev.type == 'cuda')  # fp32 master weights, bf16 compute
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    os.makedirs(out_dir, exist_ok=True)
    if model_dir is None:  # the embedded tiny Qwen-shaped model
        with tempfile.TemporaryDirectory() as d:
            tok = write_byte_tokenizer(d)
        mcfg = ModelConfig(vocab_size=tok.n_vocab, hidden_size=n_embd, intermediate_size=ffn, num_hidden_layers=n_layer,
                           num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=256,
                           rope_theta=10000.0, eos_token_id=tok.eos_id)
        raw_model = Transformer(mcfg).to(dev)
    else:
        tok = Tokenizer.from_pretrained(model_dir)  # our checkpoints always carry their tokenizer files
        raw_model = Transformer.from_pretrained(model_dir, device='meta' if dry_run else dev, dtype=torch.float32,
                                                verbose=master)
    new_bridge = BridgeConfig(dim=bridge_dim, n_head=bridge_heads, mode=bridge_mode)
    bcfg = raw_model.bridge_config or (new_bridge if use_bridge and {'warmup', 'grpo'} & set(stages) else None)
    with torch.device('meta'):
        extra, base = bridge_params(Transformer(raw_model.config, bcfg))
    n_params, n_train = extra + base, extra if bridge_only else extra + base
    # why 100M: below it (the embedded model) activations are small and recomputing is a second forward pass;
    # above it (any real checkpoint) activations are ~4 MB per token at 1.5B without it
    raw_model.grad_checkpoint = n_params >= 1e8 if grad_checkpoint is None else bool(grad_checkpoint)
    raw_model.head_chunk = logprob_chunk
    prompt_len = max(len(encode_prompt(tok, p['prompt'])) for p in load_problems('train'))
    per_rank = batch_prompts // ddp_world
    check_memory(memory_estimate(raw_model.config, bcfg, n_params, n_train, per_rank * width, (micro_groups or per_rank)
                                 * width, prompt_len + max_new_tokens, max_new_tokens, logprob_chunk, width, use_bf16,
                                 ddp_world if fsdp else 0, beta, raw_model.grad_checkpoint), dev, master)
    stages = [] if dry_run else stages
    raw_model = shard(raw_model, ddp_world, use_bf16) if fsdp and stages else raw_model
    if wandb_log and master:
        import wandb  # imported only when enabled
        wandb.init(project=wandb_project, config=config)
    for stage in stages:
        if stage in ('warmup', 'grpo') and use_bridge and raw_model.bridge_config is None:
            raw_model = raw_model.with_bridge(new_bridge)  # zero W_O: exactly the same model
            raw_model = shard(raw_model, ddp_world, use_bf16) if fsdp else raw_model
            if master:
                print(bridge_report(raw_model))
        if stage == 'warmup' and raw_model.bridge_config is None:
            continue  # nothing to warm up in the RLVR-only baseline
        model = torch.compile(raw_model) if compile else raw_model
        model.train()
        if stage == 'eval':
            evaluate(after)
        else:
            {'sft': sft, 'warmup': warmup, 'grpo': grpo_stage}[stage](start, opt_state)
            start, opt_state, after = 0, None, stage
    if dist.is_initialized():
        dist.barrier()  # let every rank finish before gloo tears down (else a late rank can abort)
        dist.destroy_process_group()
        # gloo's worker threads may still hold tensors while Python finalises, which can abort a rank at exit
        # (pytorch#179291, seen here under FSDP): everything is written, so leave without finalising
        print(end='', flush=True)  # (stderr is line-buffered)
        os._exit(0)
