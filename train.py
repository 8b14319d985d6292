"""
Bridge training: SFT, the paper's Bridge warm-up, GRPO with verifiable rewards, and evaluation at every
width. With no arguments it runs the embedded default on a laptop CPU in a few minutes:
  1. build a tiny Qwen-shaped model and SFT it from scratch on a procedural "draft;final" addition task,
  2. add zero-initialised Bridge blocks (the model is still exactly the SFT model),
  3. warm up the Bridge weights only on groups of the model's own correct answers (paper sec. 2.2),
  4. GRPO the full model + Bridge, each group's rows sampled and scored jointly,
  5. print the evaluation table at widths 1/2/4/8/16 and write it to out_dir/eval.json.
Examples:
  python train.py                                     # the embedded default
  python train.py config/rlvr.py                      # same budget, no Bridge (the RLVR-only baseline)
  python train.py config/positive_control.py          # a task only sibling reading solves (task='maxdigit')
  python train.py config/qwen05b_gsm.py               # a real checkpoint on GSM8K-format JSONL
  torchrun --standalone --nproc_per_node=2 train.py   # DDP (gloo on CPU, NCCL on CUDA)
  torchrun --standalone --nproc_per_node=8 train.py config/r1_distill_qwen7b.py   # FSDP2: a 7B on 8 GPUs
"""
import base64
import json
import math
import os
import random
import sys
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from bridge import BridgeConfig, BridgeNormProbe, bridge_report
from model import Block, Linear, ModelConfig, Transformer, atomic_dir, atomic_write, recover_dir
from sample import Tokenizer, generate
import grpo

# -----------------------------------------------------------------------------
# default config: the embedded CPU run. Every global can be overridden with --key=value or a config file.
# I/O
out_dir = 'out'
init_from = 'scratch'   # 'scratch' (tiny embedded model) | 'resume' (out_dir/ckpt) | an HF checkpoint directory
mode = 'sft,eval,warmup,grpo,eval'  # stages to run, in order: any of sft, warmup, grpo, eval
save_every = 100        # checkpoint every this many steps (and at the end of each stage)
log_interval = 10       # print every this many steps' log line (and each stage's last; SFT's evals always)
seed = 1337
# data
task = 'add'            # 'add' | 'maxdigit' (embedded; maxdigit = the positive control) | 'gsm8k' | 'math' | 'jsonl'
digits = 2              # difficulty of the embedded task: operand digits
data_train = ''         # JSONL files for gsm8k/math/jsonl tasks
data_test = ''
test_keys = ''          # 'prompt_key,answer_key' of data_test, e.g. 'problem,answer' for AIME/AMC/MATH-500 JSONL
chat_template = 'auto'  # 'auto' = the checkpoint's own template | 'plain'
instruction = ' Please reason step by step, and put your final answer within \\boxed{}.'
# model built from scratch (init_from='scratch')
n_layer, n_embd, n_head, n_kv_head, ffn = 4, 128, 4, 2, 336
# Bridge
use_bridge = True       # add Bridge blocks before warm-up/GRPO (False = the RLVR-only baseline)
bridge_dim = 64         # d_B (the paper-scale default is 512; tiny models need less)
bridge_heads = 4
bridge_mode = 'bridge'  # 'bridge' | 'self' (same params, each row sees only itself) | 'pmatch'
# SFT (from scratch): stop on a held-out greedy accuracy target, checked every sft_eval_every steps
sft_lr = 3e-3
sft_batch = 256
sft_steps = 1000        # step cap (the embedded task's seeds reach the target in ~250-600 steps)
sft_target = 0.55       # stop once greedy held-out accuracy reaches this
sft_eval_every = 50
sft_max_seconds = 0     # also stop after this long (0 = never: a clock makes the run depend on the machine's load)
# Bridge warm-up (paper): `width` samples per problem from the base model, keep the correct ones, drop problems
# with <= 1 correct, train Bridge weights only, one problem's correct answers = one Bridge group
warmup_steps = 100
warmup_lr = 1e-3
warmup_problems = 32    # problems sampled per warm-up step
# GRPO
grpo_steps = 300        # length of the LR schedule
max_iters = 0           # stop after this many GRPO steps (0 = grpo_steps); resume continues from here
batch_prompts = 32      # prompts per step (all ranks together); rows = batch_prompts * width
width = 4               # generation width = GRPO group = Bridge group
lr = 3e-4
min_lr = 3e-5
warmup_iters = 10
weight_decay = 0.0
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
temperature = 1.0
top_k = 0
top_p = 1.0
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
wandb_log = False
wandb_project = 'nanobridge'
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
# -----------------------------------------------------------------------------


def check_config():
    errors = []
    if not set(mode.split(',')) <= {'sft', 'warmup', 'grpo', 'eval'}:
        errors.append(f"mode={mode!r}: stages must be among sft, warmup, grpo, eval")
    if 'grpo' in mode and width < 2:
        errors.append(f"width={width}: GRPO needs at least 2 rows per group to compare rewards")
    if batch_prompts % ddp_world:
        errors.append(f"batch_prompts={batch_prompts} is not divisible by the {ddp_world} DDP ranks")
    if loss_type not in grpo.LOSS_TYPES:
        errors.append(f"loss_type={loss_type!r}: expected one of {grpo.LOSS_TYPES}")
    if task not in ('add', 'maxdigit', 'gsm8k', 'math', 'jsonl'):
        errors.append(f"task={task!r}: expected add, maxdigit, gsm8k, math or jsonl")
    for f in (data_train, data_test):
        if task not in EMBEDDED and not os.path.isfile(f):
            errors.append(f"data file {f!r} does not exist (set --data_train/--data_test)")
    if dtype not in ('auto', 'bfloat16', 'float32'):
        errors.append(f"dtype={dtype!r}: expected auto, bfloat16 or float32 (float16 would need loss scaling)")
    if test_keys and len(test_keys.split(',')) != 2:
        errors.append(f"test_keys={test_keys!r}: expected 'prompt_key,answer_key'")
    if device.split(':')[0] not in ('auto', 'cpu', 'cuda'):
        errors.append(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    elif device.startswith('cuda') and not torch.cuda.is_available():
        errors.append(f"device={device!r} but torch.cuda.is_available() is False")
    if fsdp and 'RANK' not in os.environ:
        errors.append("fsdp=True runs under torchrun (one GPU too: torchrun --standalone --nproc_per_node=1 train.py)")
    if fsdp and compile:
        errors.append("fsdp=True with compile=True is not wired up (torchtitan compiles each block, then shards)")
    if errors:
        raise ValueError("config: " + "; ".join(errors))


def free_cores(seconds=0.3):
    """Cores idle right now, from two reads of /proc/stat. Oversubscribed BLAS threads run many times slower on a
    busy machine; the load average would lag by a minute (right after `pip install` it still counts pip)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()

    def total_idle():
        with open('/proc/stat') as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all jiffies, idle + iowait ones
    try:
        (t0, i0), _, (t1, i1) = total_idle(), time.sleep(seconds), total_idle()
    except OSError:  # no /proc (macOS): assume the machine is ours
        return cores
    return max(1, min(cores, round(os.cpu_count() * (i1 - i0) / max(t1 - t0, 1))))


def pick_threads():
    return threads or max(1, free_cores() // ddp_world)


def write_byte_tokenizer(path):
    """The embedded model's tokenizer: the 256 bytes plus two specials, saved like a Qwen rank file."""
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, 'qwen.tiktoken'),
                 ''.join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    cfg = {'added_tokens_decoder': {'256': {'content': '<|endoftext|>'}, '257': {'content': '<|im_end|>'}},
           'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}
    atomic_write(os.path.join(path, 'tokenizer_config.json'), json.dumps(cfg))
    return Tokenizer.from_pretrained(path)


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
# memory: what the run will need, item by item, before it starts

def saved_bytes_per_token(mcfg, bcfg):
    """Bytes autograd keeps per token in one block (its Bridge included). Measured, not modelled: one block runs
    on CPU on uninitialised weights under the run's autocast, and saved_tensors_hooks add up the storages it
    saves. Two sequence lengths, so that what does not grow with tokens (autocast's weight copies) cancels."""
    from model import rope, rope_inv_freq
    from bridge import bridge_mask
    with torch.device('meta'):
        block = Block(mcfg, 0, bcfg)
    block.to_empty(device='cpu')
    params, sizes = {p.untyped_storage().data_ptr() for p in block.parameters()}, []
    for T in (8, 16):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.zeros(width, T, mcfg.hidden_size, requires_grad=True)
        cos, sin = rope(torch.arange(T).expand(width, T), rope_inv_freq(mcfg), x.dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast('cpu', torch.bfloat16, enabled=use_bf16):
            block(x, cos, sin, width, bridge_mask(torch.ones(width, T, dtype=torch.bool), width), None, None, None)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / (8 * width)


def memory_estimate(mcfg, bcfg, n_params, n_train, prompt_len, checkpointing):
    """{item: bytes} at the run's peak on one rank: a long-trace run should stop before it starts, not after an
    hour of rollouts. The update item is one micro-batch of whole groups (a group is never split). Under FSDP a
    rank keeps 1/world of the weights and their state, and gathers (in the compute dtype) all weights for a
    rollout, or two blocks (one prefetched) and the head for the update, where a block's gradients meet too."""
    L, V, cdt, S = mcfg.num_hidden_layers, mcfg.vocab_size, 2 if use_bf16 else 4, ddp_world if fsdp else 1
    rows, T = batch_prompts // ddp_world * width, prompt_len + max_new_tokens
    mb_rows = (micro_groups or batch_prompts // ddp_world) * width
    kv_token = 2 * L * mcfg.num_key_value_heads * mcfg.head_dim * cdt  # K and V of every layer, per cached token
    act = saved_bytes_per_token(mcfg, bcfg)
    head_tokens = min(logprob_chunk or mb_rows * max_new_tokens, mb_rows * max_new_tokens)
    # checkpointing keeps each block's fp32 input and recomputes one block at a time; the gradients flowing back
    # through that block take about as much again (measured, bench.py's memory rows)
    acts = {c: mb_rows * T * ((L * 4 * mcfg.hidden_size if c else L * act) + 2 * act) for c in (True, False)}
    head = 4 * head_tokens * V + mb_rows * T * 4 * mcfg.hidden_size  # one chunk's fp32 logits; the normed hidden
    # AdamW's foreach step makes a temporary fp32 copy of its parameters (sqrt of exp_avg_sq): measured at 0.5B
    m = {'weights (fp32)': 4 * n_params / S, 'gradients': 4 * n_train / S, 'AdamW state': 8 * n_train / S,
         'AdamW step temporaries': 4 * n_train / S,
         'reference model (beta > 0)': 4 * n_params / S if beta > 0 else 0,
         'bf16 weight copies (autocast)': 2 * n_params if use_bf16 and not fsdp else 0,
         f'rollout KV cache ({kv_token:,} B/token)': kv_token * rows * T + 4 * 4 * rows * V,
         'update activations, grad_checkpoint on': acts[True] + head,
         'update activations, grad_checkpoint off': acts[False] + head}
    if fsdp:
        with torch.device('meta'):
            block = sum(p.numel() for p in Block(mcfg, 0, bcfg).parameters())
        m['rollout: weights gathered (FSDP)'] = cdt * n_params
        m['update: 2 blocks + head gathered (FSDP)'] = cdt * (2 * block + V * mcfg.hidden_size) + 4 * block
    fixed = sum(v for k, v in m.items() if not k.startswith(('rollout', 'update')))
    update = m.get('update: 2 blocks + head gathered (FSDP)', 0) + m[f'update activations, grad_checkpoint '
                                                                      f'{"on" if checkpointing else "off"}']
    m['peak'] = fixed + max(sum(v for k, v in m.items() if k.startswith('rollout')), update)
    return m


def check_memory(m):
    """Print the estimate; on CUDA stop if it cannot fit, on CPU warn."""
    if master:
        print('memory estimate per rank:\n' + '\n'.join(f"  {k:<48} {v / 2**30:8.2f} GiB" if v >= 2**30 else
                                                        f"  {k:<48} {v / 2**20:8.1f} MiB" for k, v in m.items()))
    if dev.type == 'cuda':
        free, total = torch.cuda.mem_get_info(dev)
        have = free + torch.cuda.memory_allocated(dev)  # the weights may already be on the device
    else:
        with open('/proc/meminfo') as f:
            have = int(next(l for l in f if l.startswith('MemAvailable')).split()[1]) * 1024
    if m['peak'] > 0.95 * have:
        msg = (f"the run needs ~{m['peak'] / 2**30:.1f} GiB per rank but {dev} has {have / 2**30:.1f} GiB: lower "
               f"width, max_new_tokens, batch_prompts or micro_groups, logprob_chunk, or set grad_checkpoint=True")
        if dev.type == 'cuda':
            raise ValueError(msg)
        if master:
            print(f"WARNING: {msg}")


# -----------------------------------------------------------------------------
# FSDP2 (torchtitan's layout); DDP needs nothing here but sync_grads

def shard(model, train=True):
    """Each Block (its Bridge inside) is one FSDP unit, gathered for its forward and again for its backward; the
    embedding and [norm, lm_head] are units too (tied, all three are one: a weight lives in one unit), and the
    root holds the rest. Every rank still owns whole Bridge groups: only weights are split, never a batch."""
    Linear.prepack = False  # FSDP refills gathered weights in place without a version bump: a packed copy goes stale
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
    kw = dict(mesh=init_device_mesh(dev.type, (ddp_world,)), mp_policy=mp)
    for block in model.model.layers:
        fully_shard(block, **kw)
    head = [model.model.norm, model.lm_head]
    if model.config.tie_word_embeddings:
        head.insert(0, model.model.embed_tokens)
    else:
        fully_shard(model.model.embed_tokens, **kw)
    fully_shard(head, reshard_after_forward=not train, **kw)  # backward needs the head first: keep it (torchtitan)
    fully_shard(model, **kw)
    for m in units(model):  # every loss here is normalised over all ranks' batch, so ranks' gradients are SUMMED
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if fsdp else []


@contextmanager
def gathered(model):
    """One all-gather of every unit per rollout, not one per layer per decoded token; sharded again after. Ranks
    may then decode different numbers of steps: nothing is gathered inside the loop."""
    if not fsdp:
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:  # back to shard()'s layout, and sharded
        model.set_reshard_after_forward(True)
        model.lm_head.set_reshard_after_forward(False, recurse=False)
        for m in units(model):
            m.reshard()


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


def full_state(opt=None):
    """The model's state_dict, or with opt the optimizer's. Under FSDP every rank takes part, and rank 0 receives
    the whole tensors (on CPU, one at a time) keyed by parameter name."""
    if not fsdp:
        return raw_model.state_dict() if opt is None else opt.state_dict()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(raw_model, options=full) if opt is None else \
        get_optimizer_state_dict(raw_model, opt, options=full)


def save_checkpoint(stage, step, opt, extra=None):
    """Model (+ Bridge) as HF safetensors, its tokenizer, and the rest (optimizer, RNG, step, config), written
    into a fresh directory that then replaces out_dir/ckpt whole: a crash never leaves two steps mixed."""
    sd, optim = full_state(), full_state(opt)
    if not master:
        return
    state = {'stage': stage, 'step': step, 'optimizer': optim, 'config': config, 'extra': extra or {},
             'rng': {'torch': torch.get_rng_state(), 'python': random.getstate()}}

    def write(path):
        raw_model.save_pretrained(path, state_dict=sd)
        if tok_dir is None:
            write_byte_tokenizer(path)
        for f in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'qwen.tiktoken'):
            if tok_dir is not None and os.path.exists(os.path.join(tok_dir, f)):
                shutil.copy(os.path.join(tok_dir, f), path)
        torch.save(state, os.path.join(path, 'train_state.pt'))  # last: its presence marks a checkpoint to resume
    atomic_dir(os.path.join(out_dir, 'ckpt'), write)


def load_train_state(path):
    """train_state.pt holds only tensors and plain Python values, so it is read with weights_only=True: a tampered
    checkpoint cannot run code. map_location='cpu': each rank's optimizer state then goes to its own device."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_from=resume but {path} does not exist (no checkpoint in out_dir={out_dir!r})")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable training state, refusing to load it "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def run_stage(stage, params, base_lr, total, step_fn, start=0, opt_state=None, should_stop=None):
    """Runs step_fn(step) -> metrics for steps start..total-1 with AdamW. step_fn does its own backward passes
    (a step may hold several micro-batches and, for GRPO, several inner updates via `update`)."""
    # train exactly `params`: the rest is frozen (no weight gradients computed or held for it), and every stage
    # starts with no gradients, so nothing from an earlier stage (e.g. the Bridge-only warm-up) leaks into this one
    raw_model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    raw_model.zero_grad(set_to_none=True)
    for m in units(raw_model):  # FSDP fixes a unit's gradient dtypes from requires_grad when it gathers: do it now
        m.unshard()
        m.reshard()
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(beta1, beta2), weight_decay=weight_decay,
                            **({'fused': True} if dev.type == 'cuda' else {}))
    if opt_state is not None and fsdp:  # full tensors by parameter name; each rank keeps its shard
        set_optimizer_state_dict(raw_model, opt, opt_state, options=StateDictOptions(full_state_dict=True))
    elif opt_state is not None:
        opt.load_state_dict(opt_state)
    t_start = time.time()

    def update():  # one optimizer step: sync, clip, step, zero
        sync_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

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
    train, test = load_problems('train'), load_problems('test')
    t_begin = time.time()

    def step_fn(step, update):
        rng = random.Random(seed * 1000 + step * ddp_world + ddp_rank)  # salt 0 of rollout()'s scheme
        batch = [rng.choice(train) for _ in range(sft_batch // ddp_world)]
        x, y = sft_batch_tensors(batch)
        with autocast:
            _, loss = model(x, y)
        (loss / ddp_world).backward()  # ranks' gradients are summed by sync_grads
        gn = update()
        m = {'loss': all_sum(loss.item())[0] / ddp_world, 'gnorm': gn}
        if (step + 1) % sft_eval_every == 0:
            m['acc'] = evaluate_acc(test[:eval_problems])
        return m

    def should_stop(step, m):
        return m.get('acc', 0) >= sft_target or 0 < sft_max_seconds < time.time() - t_begin
    run_stage('sft', list(model.parameters()), sft_lr, sft_steps, step_fn, start, opt_state, should_stop)


def sft_batch_tensors(batch, rows=None):
    """Right-padded (x, y) for teacher forcing; y = -1 where no loss is taken (prompt and padding)."""
    seqs = [(encode_prompt(tok, p['prompt']), tok.encode(p['response']) + [tok.eos_id]) for p in batch]
    if rows is not None:
        seqs = [seqs[i] for i in rows]
    T = max(len(a) + len(b) for a, b in seqs)
    x = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        s = torch.tensor(a + b)
        x[i, :len(s)] = s
        y[i, len(a) - 1:len(s) - 1] = s[len(a):]
    return x.to(dev), y.to(dev)


def sample_and_score(problems, w, temp, gen_seed, entropy=False):
    """The one place that samples: `w` rows per problem, decoded and scored -> (Generation, texts, rewards, the
    problem of every row)."""
    env = None
    if task == 'maxdigit':  # the environment writes 'd;' and the stop token, the policy only F: 'd;F'
        g = torch.Generator().manual_seed(gen_seed + 7919 * (ddp_rank + 1))  # not the sampler's random stream
        digit, fixed = torch.tensor(tok.encode('0123456789'), device=dev), {1: tok.encode(';')[0], 3: tok.eos_id}

        def env(s, tokens, pos):
            if s == 0:  # a digit the policy cannot choose
                return digit[grpo.skewed_digits(len(pos), g).to(dev)]
            return torch.full_like(pos, fixed[s]) if s in fixed else None
    with torch.no_grad(), autocast, gathered(raw_model):
        gen = generate(raw_model, [encode_prompt(tok, p['prompt']) for p in problems], w, max_new_tokens, temp,
                       top_k or None, top_p, tok.stop_ids, seed=gen_seed, entropy=entropy, compile=compile, env=env)
    texts = [tok.decode(c) for c in gen.completions()]
    rows = [problems[i // w] for i in range(len(texts))]
    if task == 'maxdigit':  # the gold answer is the largest digit the environment wrote in the group
        d = tok.decode(gen.tokens[torch.arange(len(texts)), gen.prompt_lens].tolist())
        rows = [{**p, 'answer': max(d[i - i % w:i - i % w + w])} for i, p in enumerate(rows)]
    return gen, texts, torch.tensor([reward(t, p) for t, p in zip(texts, rows)]), rows


def rollout(train, n_prompts, step, salt):
    """`width` sampled answers to each of this rank's share of n_prompts training problems, and their rewards.
    Everything random is derived from (seed, stage, step, rank), which is what makes resume exact."""
    rng = random.Random(seed * 1000 + salt * 100 + step * ddp_world + ddp_rank)
    probs = [rng.choice(train) for _ in range(n_prompts // ddp_world)]
    gen, _, r, _ = sample_and_score(probs, width, temperature, rng.randrange(2**31), entropy=True)
    return gen, r


def warmup(start=0, opt_state=None):
    """Paper sec. 2.2: groups of the base model's own correct answers, Bridge weights only. A problem with k
    correct answers (2 <= k <= width) becomes one group of `width` rows whose unused rows are fully dead
    (alive=False everywhere): they are masked out of Bridge and the loss, so groups need no equal size."""
    train = load_problems('train')
    params = [p for b in raw_model.bridge_modules() for p in b.parameters()]

    def step_fn(step, update):
        gen, r = rollout(train, warmup_problems, step, salt=2)
        ok = r.view(-1, width) > 0
        keep = ok.sum(1) >= 2
        loss = torch.zeros(())
        if keep.any() or fsdp:  # FSDP: every rank's backward takes part in the reduce-scatter (here with 0 rows)
            rows = (ok & keep[:, None]).flatten()
            mask = gen.completion_mask & ~gen.from_env & rows[:, None].to(dev)
            x, y = gen.tokens[:, :-1], torch.where(mask[:, 1:], gen.tokens[:, 1:], -1)
            alive = gen.alive[:, :-1] & rows[:, None].to(dev)
            with autocast:
                _, loss = model(x, y, width=width, alive=alive)
            (loss / ddp_world).backward()
        gn = update()
        n_keep, acc = all_sum(keep.sum(), ok.float().mean())
        return {'loss': loss.item(), 'kept_groups': int(n_keep), 'acc': acc / ddp_world, 'gnorm': gn}
    run_stage('warmup', params, warmup_lr, warmup_steps, step_fn, start, opt_state)


def grpo_stage(start=0, opt_state=None):
    train = load_problems('train')
    params = [p for b in raw_model.bridge_modules() for p in b.parameters()] if bridge_only else \
        list(raw_model.parameters())
    ref = None
    if beta > 0:  # the KL reference: the model as GRPO starts, kept on disk so that a resumed run has it too
        path = os.path.join(out_dir, 'ref')
        if not start:
            sd = full_state()
            if master:
                atomic_dir(path, lambda p: raw_model.save_pretrained(p, state_dict=sd))
        if dist.is_initialized():
            dist.barrier()
        ref = Transformer.from_pretrained(path, device=dev, dtype=torch.float32, verbose=False).requires_grad_(False)
        ref = shard(ref, train=False) if fsdp else ref

    def step_fn(step, update):
        t0 = time.time()
        gen, r = rollout(train, batch_prompts, step, salt=3)
        t_sample = time.time() - t0
        ro = grpo.Rollout.from_generation(gen, r, width, scale_rewards, mask_truncated)
        stats = grpo.policy_update(model, ro, update, all_sum, micro_groups=micro_groups, ref=ref,
                                   temperature=temperature or 1.0, loss_type=loss_type, eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, num_iterations=num_iterations,
                                   max_tokens=max_new_tokens, autocast=autocast)
        n_tok = all_sum(gen.lengths.sum())[0]
        zero_std, trunc, mean_r = all_sum((r.view(-1, width).std(1) == 0).float().mean() / ddp_world,
                                          (~gen.finished).float().mean() / ddp_world, r.mean() / ddp_world)
        if master and ((zero_std == 1.0 and mean_r < 1) or trunc == 1.0):  # every reward 1 is solved, not stuck
            print(f"WARNING: {'every group has zero reward std' if zero_std == 1 else 'every completion is truncated'}"
                  " - there is no learning signal; check max_new_tokens, the reward and the prompt format")
        dt = time.time() - t0
        return {'reward': mean_r, 'acc': all_sum((r > 0).float().mean())[0] / ddp_world,
                'zero_std': zero_std, **stats, 'len': float(gen.lengths.float().mean()), 'trunc': trunc,
                'tok/s': n_tok / dt, 'sample': f"{100 * t_sample / dt:.0f}%",
                **({'mem': f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f}G"} if dev.type == 'cuda' else {})}
    run_stage('grpo', params, lr, grpo_steps, step_fn, start, opt_state)


@torch.no_grad()
def evaluate_acc(problems):
    """Greedy held-out accuracy (SFT's stopping rule)."""
    s, n = all_sum(sample_and_score(problems, 1, 0.0, seed)[2].sum(), len(problems))
    return s / n


def evaluate(after='init'):
    """The paper's metrics at every width, plus whether Bridge reads its siblings at all (grpo.eval_metrics).
    Written to out_dir/eval_{after}.json, `after` being the stage that preceded it (sft, warmup, grpo)."""
    test = load_problems('test')[:eval_problems]
    test = test[ddp_rank::ddp_world]
    results = {}
    norms = BridgeNormProbe(raw_model)
    for w in [int(v) for v in eval_widths.split(',')]:
        groups = max(1, eval_samples // w)
        probs = [p for p in test for _ in range(groups)]  # `groups` independent groups of w rows per problem
        gen, texts, _, rows = sample_and_score(probs, w, eval_temperature, seed + w)
        m = grpo.eval_metrics(texts, rows, w, reward, grpo.final_answer if task in EMBEDDED else None, gen.lengths)
        v = all_sum(*[x for pair in m.values() for x in pair])  # (sum, count) pairs, added over ranks
        results[w] = {k: v[2 * i] / v[2 * i + 1] for i, k in enumerate(m) if v[2 * i + 1]}  # none counted: '-'
        if task == 'maxdigit':  # what a row that cannot read its siblings could reach at best
            results[w]['chance'] = grpo.max_chance(w)
    results['bridge_norm_ratio'] = norms.ratios()
    norms.remove()
    base = results[min(k for k in results if isinstance(k, int))]['acc']
    for w in [k for k in results if isinstance(k, int)]:
        results[w]['width_gain'] = results[w]['acc'] - base
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
    if fsdp:  # imported only when used: DTensor and these add ~0.6 s to every start
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    if ddp_world > 1 or fsdp:
        local = int(os.environ.get('LOCAL_RANK', 0))
        if dev.type == 'cuda':
            dev = torch.device(f'cuda:{local}')
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    torch.set_num_threads(pick_threads())
    if master:
        print(f"device {dev}, {torch.get_num_threads()} CPU threads per rank, {ddp_world} rank(s)")
    torch.manual_seed(seed)
    use_bf16 = dtype == 'bfloat16' or (dtype == 'auto' and dev.type == 'cuda')  # fp32 master weights, bf16 compute
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    os.makedirs(out_dir, exist_ok=True)
    stages, start, opt_state = mode.split(','), 0, None
    ckpt = os.path.join(out_dir, 'ckpt')
    if init_from == 'resume':
        if master:
            recover_dir(ckpt)  # a save killed between its two renames: complete it before any rank reads ckpt
        if dist.is_initialized():
            dist.barrier()
        state = load_train_state(os.path.join(ckpt, 'train_state.pt'))
        i = stages.index(state['stage'])
        done = state['extra'].get('done') or state['step'] >= {'sft': sft_steps, 'warmup': warmup_steps,
                                                                 'grpo': grpo_steps}.get(state['stage'], 0)
        stages = stages[i + 1:] if done else stages[i:]
        if not done and state['config'].get('fsdp', False) != fsdp:  # DDP's AdamW state is by index, FSDP's by name
            raise ValueError(f"{ckpt} was written with fsdp={not fsdp}; resume it with --fsdp={not fsdp}")
        start, opt_state = (0, None) if done else (state['step'], state['optimizer'])
        torch.set_rng_state(state['rng']['torch'])
        random.setstate(state['rng']['python'])
        del state  # the optimizer state lives on in opt_state only until its stage has loaded it
        model_dir = ckpt
    else:
        model_dir = None if init_from == 'scratch' else init_from
    tok_dir = model_dir  # every checkpoint carries a copy of its tokenizer files (save_checkpoint)
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
    bcfg = raw_model.bridge_config or (BridgeConfig(dim=bridge_dim, n_head=bridge_heads, mode=bridge_mode)
                                       if use_bridge and {'warmup', 'grpo'} & set(stages) else None)
    with torch.device('meta'):
        shape = Transformer(raw_model.config, bcfg)
    n_params = sum(p.numel() for p in shape.parameters())
    n_train = sum(p.numel() for b in shape.bridge_modules() for p in b.parameters()) if bridge_only else n_params
    # why 100M: below it (the embedded model) activations are small and recomputing is a second forward pass;
    # above it (any real checkpoint) activations are ~4 MB per token at 1.5B without it
    raw_model.grad_checkpoint = n_params >= 1e8 if grad_checkpoint is None else bool(grad_checkpoint)
    raw_model.head_chunk = logprob_chunk
    prompt_len = max(len(encode_prompt(tok, p['prompt'])) for p in load_problems('train'))
    check_memory(memory_estimate(raw_model.config, bcfg, n_params, n_train, prompt_len, raw_model.grad_checkpoint))
    if dry_run:
        stages = []
    elif fsdp:
        shard(raw_model)
    if wandb_log and master:
        import wandb  # imported only when enabled
        wandb.init(project=wandb_project, config=config)
    for k, stage in enumerate(stages):
        if stage in ('warmup', 'grpo') and use_bridge and raw_model.bridge_config is None:
            # adding Bridge to a trained model: zero W_O keeps it exactly the same model
            bcfg = BridgeConfig(dim=bridge_dim, n_head=bridge_heads, mode=bridge_mode)
            sd = {k: v.full_tensor() if fsdp else v for k, v in raw_model.state_dict().items()}  # on every rank
            old, raw_model = raw_model, Transformer(raw_model.config, bcfg)
            raw_model.load_state_dict(sd, strict=False)
            raw_model.grad_checkpoint, raw_model.head_chunk = old.grad_checkpoint, old.head_chunk
            raw_model = shard(raw_model) if fsdp else raw_model.to(dev)
            del old, sd
            if master:
                print(bridge_report(raw_model))
        if stage == 'warmup' and raw_model.bridge_config is None:
            continue  # nothing to warm up in the RLVR-only baseline
        model = torch.compile(raw_model) if compile else raw_model
        model.train()
        {'sft': sft, 'warmup': warmup, 'grpo': grpo_stage, 'eval': evaluate}[stage](
            **({'after': stages[k - 1] if k else 'init'} if stage == 'eval' else {'start': start, 'opt_state': opt_state}))
        start, opt_state = 0, None
    if dist.is_initialized():
        dist.barrier()  # let every rank finish before gloo tears down (else a late rank can abort)
        dist.destroy_process_group()
        # gloo's worker threads may still hold tensors while Python finalises, which can abort a rank at exit
        # (pytorch#179291, seen here under FSDP): everything is written, so leave without finalising
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
