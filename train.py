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
import tempfile
import time
from contextlib import nullcontext

import torch

import grpo
import settings
from bridge import BridgeConfig, BridgeProbe, bridge_params, bridge_report
from checkpoint import (atomic_dir, atomic_write, check_overwrite, load_model, load_train_state, recover_dir,
                        resume_plan, save_model, save_run)
from distributed import Ranks, free_cores, full_state, full_tensors, gathered, shard, unfreeze_for_fsdp
from fastpath import fuse
from memory import check_memory, memory_estimate
from model import ModelConfig, Transformer
from sample import generate
from tasks import EMBEDDED, TASKS, make_task
from tokenizer import Tokenizer, write_byte_tokenizer

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
grad_checkpoint = None  # recompute blocks in backward; None = on for models of >= 100M params (see memory.py)
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
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
# -----------------------------------------------------------------------------
# the run's state, built by main(): declared here so that every name has one visible origin
model = raw_model = None  # the model the stages train (compiled if asked) and the module itself
tok = None                # its tokenizer; main() also turns the `task` setting into its tasks.Task object
dev, use_bf16, autocast = None, False, nullcontext()  # the device; bf16 autocast (fp32 master weights) or nothing
ranks = None              # distributed.Ranks: rank, world size, sums over ranks
config, model_dir = {}, None  # the settings as run (saved in every checkpoint); the checkpoint loaded, if any

def check_config():
    """Every setting and every relation between settings, before anything is loaded (settings.py)."""
    world = int(os.environ.get('WORLD_SIZE', 1))  # torchrun's; the process group is joined only after the checks
    settings.check(config, world, torch.cuda.is_available(), TASKS, grpo.LOSS_TYPES, config['task'] in EMBEDDED)

# -----------------------------------------------------------------------------
# the shared training loop: LR schedule, clipping, logging, checkpoints, resume
def get_lr(it, base, total):
    if it < warmup_iters:  # linear warm-up, then cosine down to min_lr (nanoGPT)
        return base * (it + 1) / warmup_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, total - warmup_iters))
    return min_lr * base / lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (base - min_lr * base / lr)

def save_checkpoint(stage, step, opt, extra=None):
    """out_dir/ckpt, whole: the model as HF safetensors, its tokenizer, and the training state (checkpoint.save_run)."""
    sd, optim = full_state(raw_model, None, fsdp), full_state(raw_model, opt, fsdp)  # every rank takes part
    if ranks.master:
        save_run(os.path.join(out_dir, 'ckpt'), raw_model, sd, {'stage': stage, 'step': step, 'optimizer': optim,
                                                                 'config': config, 'extra': extra or {}}, model_dir)

def run_stage(stage, params, base_lr, total, step_fn, start=0, opt_state=None, should_stop=None):
    """Runs step_fn(step, update) -> metrics for steps start..total-1 with AdamW. step_fn does its own backward
    passes (a step may hold several micro-batches and, for GRPO, several inner updates via `update`)."""
    # train exactly `params`: the rest is frozen (no weight gradients computed or held for it), and every stage
    # starts with no gradients, so nothing from an earlier stage (e.g. the Bridge-only warm-up) leaks into this one
    raw_model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    raw_model.zero_grad(set_to_none=True)
    unfreeze_for_fsdp(raw_model)
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(beta1, beta2), weight_decay=weight_decay,
                            **({'fused': True} if dev.type == 'cuda' else {}))
    if opt_state is not None:
        full_state(raw_model, opt, fsdp, load=opt_state)

    def update():  # one optimizer step: sync, clip, step, zero
        ranks.sync_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    t_start = time.time()
    stop_at = min(total, max_iters) if stage == 'grpo' and max_iters else total
    for step in range(start, stop_at):
        for g in opt.param_groups:
            g['lr'] = get_lr(step, base_lr, total)
        t0 = time.time()
        m = step_fn(step, update)
        eta = (time.time() - t_start) / (step + 1 - start) * (stop_at - step - 1)
        if ranks.master and ((step + 1) % log_interval == 0 or step + 1 == stop_at or 'acc' in m and stage == 'sft'):
            print(f"{stage} {step + 1}/{total}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in m.items())
                  + f", lr {g['lr']:.2e}, {1000 * (time.time() - t0):.0f}ms, eta {eta:.0f}s")
            if wandb_log:
                wandb.log({f"{stage}/{k}": v for k, v in m.items()}, step=step)
        done = bool(should_stop and should_stop(step, m))  # e.g. SFT reached its accuracy target or its time limit
        if should_stop and ranks.world > 1:  # ranks' clocks differ: all leave together, or their collectives mismatch
            done = ranks.all_sum(done)[0] > 0
        if done or (step + 1) % save_every == 0 or step + 1 == stop_at:
            save_checkpoint(stage, step + 1, opt, {'done': True} if done else None)
        if done:
            break

# -----------------------------------------------------------------------------
# stages
def sft(steps, start=0, opt_state=None):
    """Cross-entropy on prompt -> response pairs (prompt tokens are not predicted)."""
    train, test = task.train_set, next(iter(task.test_sets.values()))[:eval_problems][ranks.rank::ranks.world]
    t_begin = time.time()

    def step_fn(step, update):
        rng = random.Random(seed * 1000 + step * ranks.world + ranks.rank)  # salt 0 of rollout()'s scheme
        seqs = [(task.encode(tok, p['prompt']), tok.encode(p['response']) + [tok.eos_id])
                for p in (rng.choice(train) for _ in range(sft_batch // ranks.world))]
        T = max(len(a) + len(b) for a, b in seqs)  # right-padded; y = -1 where no loss is taken (prompt, padding)
        x, y = torch.full((len(seqs), T), tok.pad_id), torch.full((len(seqs), T), -1)
        for i, (a, b) in enumerate(seqs):
            x[i, :len(a) + len(b)] = torch.tensor(a + b)
            y[i, len(a) - 1:len(a) + len(b) - 1] = torch.tensor(b)
        with autocast:
            _, loss = model(x.to(dev), y.to(dev))
        (loss / ranks.world).backward()  # ranks' gradients are summed by sync_grads
        gn = update()
        m = {'loss': ranks.all_sum(loss.item())[0] / ranks.world, 'gnorm': gn}
        if (step + 1) % sft_eval_every == 0:  # greedy held-out accuracy: the stopping rule
            s, n = ranks.all_sum(sample_and_score(test, 1, 0.0, seed)[2].sum(), len(test))
            m['acc'] = s / n
        return m

    def should_stop(step, m):
        return m.get('acc', 0) >= sft_target or 0 < sft_max_seconds < time.time() - t_begin
    run_stage('sft', list(model.parameters()), sft_lr, steps, step_fn, start, opt_state, should_stop)

def sample_and_score(problems, w, temp, gen_seed, entropy=False):
    """The one place that samples: `w` rows per problem -> (Generation, texts, rewards, every row's problem)."""
    env = task.env(tok, gen_seed + 7919 * (ranks.rank + 1))
    with torch.no_grad(), autocast, gathered(raw_model, fsdp):
        gen = generate(raw_model, [task.encode(tok, p['prompt']) for p in problems], w, max_new_tokens, temp,
                       top_k or None, top_p, tok.stop_ids, seed=gen_seed, entropy=entropy, compile=compile, env=env)
    texts = [tok.decode(c) for c in gen.completions()]
    rows = task.rows([problems[i // w] for i in range(len(texts))], texts, w)
    return gen, texts, torch.tensor([task.reward(t, p) for t, p in zip(texts, rows)]), rows

def rollout(train, n_prompts, step, salt):
    """`width` answers to each of this rank's share of n_prompts training problems, and their rewards. Everything
    random comes from (seed, stage, step, rank): that is what makes resume exact."""
    rng = random.Random(seed * 1000 + salt * 100 + step * ranks.world + ranks.rank)
    probs = [rng.choice(train) for _ in range(n_prompts // ranks.world)]
    gen, _, r, _ = sample_and_score(probs, width, temperature, rng.randrange(2**31), entropy=True)
    return gen, r

def bridge_weights():
    return [p for b in raw_model.bridge_modules() for p in b.parameters()]

def warmup(steps, start=0, opt_state=None):
    """Paper sec. 2.2: groups of the base model's own correct answers, Bridge weights only. A problem with k
    correct answers (2 <= k <= width) becomes one group of `width` rows whose unused rows are fully dead
    (alive=False everywhere): they are masked out of Bridge and the loss, so groups need no equal size."""
    train = task.train_set

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
            (loss / ranks.world).backward()
        gn = update()
        n_keep, acc = ranks.all_sum(keep.sum(), ok.float().mean())
        return {'loss': loss.item(), 'kept_groups': int(n_keep), 'acc': acc / ranks.world, 'gnorm': gn}
    run_stage('warmup', bridge_weights(), warmup_lr, steps, step_fn, start, opt_state)

def grpo_stage(steps, start=0, opt_state=None):
    train = task.train_set
    params = bridge_weights() if bridge_only else list(raw_model.parameters())
    ref = None
    if beta > 0:  # the KL reference: the model as GRPO starts, kept on disk so that a resumed run has it too
        path = os.path.join(out_dir, 'ref')
        if not start:
            sd = full_state(raw_model, None, fsdp)
            if ranks.master:
                atomic_dir(path, lambda p: save_model(raw_model, p, state_dict=sd))
        ranks.barrier()
        ref = load_model(path, device=dev, dtype=torch.float32, verbose=False).requires_grad_(False)
        ref = shard(ref, ranks.world, use_bf16, train=False) if fsdp else fuse(ref)
    health = grpo.Health()

    def step_fn(step, update):
        t0 = time.time()
        gen, r = rollout(train, batch_prompts, step, salt=3)
        t_sample = time.time() - t0
        ro = grpo.Rollout.from_generation(gen, r, width, scale_rewards, mask_truncated)
        stats = grpo.policy_update(model, ro, update, ranks.all_sum, micro_groups=micro_groups, ref=ref,
                                   temperature=temperature or 1.0, loss_type=loss_type, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, num_iterations=num_iterations,
                                   max_tokens=max_new_tokens, autocast=autocast)
        zero_std, trunc, mean_r, acc, n_tok = ranks.all_sum(  # one all-reduce for the step's statistics
            (r.view(-1, width).std(1) == 0).float().mean() / ranks.world,
            (~gen.finished).float().mean() / ranks.world, r.mean() / ranks.world,
            (r > 0).float().mean() / ranks.world, gen.lengths.sum())
        for msg in health(step + 1, mean_r, zero_std, trunc, max_new_tokens) if ranks.master else []:
            print(f"WARNING: {msg}")
        dt = time.time() - t0
        return {'reward': mean_r, 'acc': acc,
                'zero_std': zero_std, **stats, 'len': float(gen.lengths.float().mean()), 'trunc': trunc,
                'tok/s': n_tok / dt, 'sample': f"{100 * t_sample / dt:.0f}%",
                **({'mem': f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f}G"} if dev.type == 'cuda' else {})}
    run_stage('grpo', params, lr, steps, step_fn, start, opt_state)

def evaluate(after='init'):
    """The paper's metrics at every width, plus whether Bridge reads its siblings at all: grpo.eval_metrics, the
    width gain, and the probe's norm ratio and sibling share per layer (at width 4, the paper's training width).
    Written to out_dir/eval_{after}.json, `after` being the stage that preceded it (sft, warmup, grpo)."""
    test = next(iter(task.test_sets.values()))[:eval_problems][ranks.rank::ranks.world]
    widths, results, probe = sorted(int(v) for v in eval_widths.split(',')), {}, BridgeProbe(raw_model)
    for w in widths:
        groups = max(1, eval_samples // w)
        probs = [p for p in test for _ in range(groups)]  # `groups` independent groups of w rows per problem
        probe.reset()
        gen, texts, _, rows = sample_and_score(probs, w, eval_temperature, seed + w)
        m = grpo.eval_metrics(texts, rows, w, task, gen.lengths)
        v = ranks.all_sum(*[x for pair in m.values() for x in pair])  # (sum, count) pairs, added over ranks
        results[w] = {k: v[2 * i] / v[2 * i + 1] for i, k in enumerate(m) if v[2 * i + 1]}  # none counted: '-'
        results[w]['width_gain'] = results[w]['acc'] - results[widths[0]]['acc']
        if task.chance(w) is not None:  # what a row that cannot read its siblings could reach at best
            results[w]['chance'] = task.chance(w)
        shares = probe.sibling_shares()  # {} without Bridge blocks
        results[w] |= {'sibling': sum(shares.values()) / len(shares)} if shares else {}
        if shares and w == (4 if 4 in widths else max(widths)):  # per layer at the paper's training width
            results |= {'bridge_norm_ratio': probe.norm_ratios(), 'bridge_sibling_share': shares, 'probe_width': w}
    probe.remove()
    if ranks.master:
        print(grpo.format_table(results))
        atomic_write(os.path.join(out_dir, f'eval_{after}.json'),
                     json.dumps({str(k): v for k, v in results.items()}, indent=1))
    return results

# -----------------------------------------------------------------------------
def main():
    global model, raw_model, tok, task, dev, use_bf16, autocast, ranks, config, model_dir, wandb
    config = {k: globals()[k] for k in config_keys}
    check_config()
    stages, start, opt_state, after = mode.split(','), 0, None, 'init'
    ckpt = os.path.join(out_dir, 'ckpt')
    model_dir = ckpt if init_from == 'resume' else None if init_from == 'scratch' else init_from
    check_overwrite(init_from, model_dir, ckpt, {'sft', 'warmup', 'grpo'} & set(stages) and not dry_run, overwrite)
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    ranks = Ranks(dev, fsdp)
    dev = ranks.connect() if not dry_run else dev  # a dry run never communicates: it joins no process group
    torch.set_num_threads(threads or max(1, free_cores() // ranks.world))
    if ranks.master:
        print(f"device {dev}, {torch.get_num_threads()} CPU threads per rank, {ranks.world} rank(s)")
    torch.manual_seed(seed)
    if init_from == 'resume':
        if ranks.master:
            recover_dir(ckpt)  # a save killed between its two renames: complete it before any rank reads ckpt
        ranks.barrier()
        state = load_train_state(ckpt)
        # resume goes on with the run as it was configured: only what this command sets, and what concerns this
        # invocation alone, is not read from the checkpoint
        globals().update({k: v for k, v in state['config'].items() if k in config and k not in _overrides | {
            'init_from', 'mode', 'out_dir', 'overwrite', 'dry_run', 'device', 'threads', 'compile', 'max_iters',
            'log_interval', 'wandb_log', 'wandb_project'}})
        config = {k: globals()[k] for k in config_keys}
        check_config()
        steps = {'sft': sft_steps, 'warmup': warmup_steps, 'grpo': grpo_steps}
        stages, start, opt_state = resume_plan(stages, state, steps, fsdp, ckpt, print if ranks.master else id)
        after = state['stage']
        torch.set_rng_state(state['rng']['torch'])
        random.setstate(state['rng']['python'])
        del state  # the optimizer state lives on in opt_state only until its stage has loaded it
    use_bf16 = dtype == 'bfloat16' or (dtype == 'auto' and dev.type == 'cuda')  # fp32 master weights, bf16 compute
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    task = make_task(task, digits, data_train, data_test, test_keys, chat_template, instruction)
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
        raw_model = load_model(model_dir, device='meta' if dry_run else dev, dtype=torch.float32, verbose=ranks.master)
    new_bridge = BridgeConfig(dim=bridge_dim, n_head=bridge_heads, mode=bridge_mode)
    bcfg = raw_model.bridge_config or (new_bridge if use_bridge and {'warmup', 'grpo'} & set(stages) else None)
    with torch.device('meta'):
        extra, base = bridge_params(Transformer(raw_model.config, bcfg))
    n_params, n_train = extra + base, extra if bridge_only else extra + base
    # why 100M: below it (the embedded model) activations are small and recomputing is a second forward pass;
    # above it (any real checkpoint) activations are ~4 MB per token at 1.5B without it
    raw_model.grad_checkpoint = n_params >= 1e8 if grad_checkpoint is None else bool(grad_checkpoint)
    raw_model.head_chunk = logprob_chunk
    # every data line is read and every prompt rendered now, before the first step: a bad line or a prompt that
    # does not fit stops the run here, not after hours of training
    lens = {name: max(len(task.encode(tok, p['prompt'])) for p in probs)
            for name, probs in {'the training set': task.train_set, **task.test_sets}.items()}
    settings.check_data(config, raw_model.config.max_position_embeddings, lens)
    prompt_len = lens['the training set']
    per_rank = batch_prompts // ranks.world
    check_memory(memory_estimate(
        raw_model.config, bcfg, n_params=n_params, n_train=n_train, rows=per_rank * width,
        mb_rows=(micro_groups or per_rank) * width, tokens=prompt_len + max_new_tokens, new_tokens=max_new_tokens,
        chunk=logprob_chunk, width=width, bf16=use_bf16, fsdp=ranks.world if fsdp else 0, beta=beta,
        checkpointing=raw_model.grad_checkpoint), dev, ranks.master)
    stages = [] if dry_run else stages
    raw_model = shard(raw_model, ranks.world, use_bf16) if fsdp and stages else fuse(raw_model)
    if wandb_log and ranks.master:
        import wandb  # imported only when enabled (a global: run_stage logs to it)
        wandb.init(project=wandb_project, config=config)
    steps = {'sft': sft_steps, 'warmup': warmup_steps, 'grpo': grpo_steps}
    for stage in stages:
        if stage in ('warmup', 'grpo') and use_bridge and raw_model.bridge_config is None:
            raw_model = raw_model.with_bridge(new_bridge, full_tensors(raw_model) if fsdp else None)  # zero W_O
            raw_model = shard(raw_model, ranks.world, use_bf16) if fsdp else fuse(raw_model)
            if ranks.master:
                print(bridge_report(raw_model))
        if stage == 'warmup' and raw_model.bridge_config is None:
            continue  # nothing to warm up in the RLVR-only baseline
        model = torch.compile(raw_model) if compile else raw_model
        model.train()
        if stage == 'eval':
            evaluate(after)
        else:
            {'sft': sft, 'warmup': warmup, 'grpo': grpo_stage}[stage](steps[stage], start, opt_state)
            start, opt_state, after = 0, None, stage
    ranks.close()

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
