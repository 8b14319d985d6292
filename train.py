"""
Bridge training: SFT, the paper's Bridge warm-up, GRPO with verifiable rewards, and evaluation at
every width. With no arguments it runs the embedded default on a laptop CPU in a few minutes: SFT a
tiny Qwen-shaped model from scratch on a procedural "draft;final" addition task, add
zero-initialised Bridge blocks (still exactly the SFT model), warm up the Bridge weights on groups
of the model's own correct answers (docs/paper.md §3.1), GRPO the full model + Bridge with each
group sampled and scored jointly, and evaluate at widths 1-16 (out_dir/eval_grpo.json).
  python train.py                                     # the embedded default
  python train.py --init_from=resume --mode=eval      # evaluate out/ckpt as it stands
  python train.py --init_from=resume --grpo_steps=600 # continue out/ckpt's GRPO to 600 steps
  torchrun --nproc_per_node=8 train.py config/r1_distill_qwen15b.py config/r1_distill_qwen7b.py
"""
import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext

import torch

import engine
import grpo
import plan
import preflight
import results
import settings
from bridge import BridgeConfig, bridge_report
from checkpoint import (atomic_write, check_overwrite, kl_reference, load_model, load_train_state,
                        resume_plan, resume_settings, save_run)
from distributed import (Ranks, free_cores, full_state, full_tensors, gathered, shard,
                         unfreeze_for_fsdp)
from fastpath import attach, fuse
from memory import sampling_slots
from model import ModelConfig, Transformer
from probe import BridgeProbe
from tasks import EMBEDDED, TASKS, group_batch, make_task, read_groups, write_groups
from tokenizer import Tokenizer, no_tokenizer, write_byte_tokenizer

# -----------------------------------------------------------------------------
# default config: the embedded CPU run. Every global is overridden by --key=value or a config file.
# I/O
out_dir = 'out'
init_from = 'scratch'   # 'scratch' (the tiny model) | 'resume' (out_dir/ckpt) | an HF checkpoint
mode = 'sft,eval,warmup,grpo,eval'  # stages to run, in order: any of sft, warmup, grpo, eval
overwrite = False       # True: replace out_dir/ckpt even if another run (or init_from) is in it
save_every = 100        # checkpoint every this many steps (and at the end of each stage)
log_interval = 10       # print every this many steps (and each stage's last; SFT's checks always)
seed = 1337
# data
task = 'add'            # embedded: 'add' | 'sum3' | 'mul' | 'maxdigit' (positive control) | 'math'
digits = 2              # difficulty of the embedded task: operand digits
data_train = ''         # JSONL training problems (task 'math', or 'gsm8k'/'jsonl': layout per line)
data_test = ''          # test sets, 'name=PATH,name=PATH' (or one PATH), each evaluated
test_keys = ''          # 'prompt_key,answer_key' for test files of another layout (tasks.LAYOUTS)
chat_template = 'auto'  # 'auto' = the checkpoint's own template | 'plain'
instruction = ' Please reason step by step, and put your final answer within \\boxed{}.'
answer_fallback = True  # math: no \boxed{}, no '#### n': grade the last number (R1 configs: False)
# model built from scratch (init_from='scratch')
n_layer = 4             # transformer blocks
n_embd = 128            # hidden size
n_head = 4              # attention heads
n_kv_head = 2           # key/value heads (grouped-query attention)
ffn = 336               # MLP inner size
# Bridge
use_bridge = True       # add Bridge blocks before warm-up/GRPO (False = the RLVR-only baseline)
bridge_dim = 64         # d_B, Bridge's inner width (512 at paper scale; tiny models need less)
bridge_heads = 4        # d_B is split into this many heads
bridge_mode = 'bridge'  # 'bridge' | 'self' (same params, each row sees only itself) | 'pmatch'
# SFT (from scratch): stop on a held-out accuracy target, checked every sft_eval_every steps and
# sampled at the rollout temperature: what GRPO starts from is what it samples (on fresh seeds a
# greedy 0.55 left T=1 anywhere from 0.35 to 0.89)
sft_lr = 1.5e-3         # SFT's peak LR (at 3e-3 some seeds trained unstably for 1,000+ steps
                        # into a model that GRPO broke at once: RESULTS.md)
sft_batch = 256         # sequences per SFT step
sft_horizon = 1000      # SFT's LR schedule: its warm-up, a cosine over this many steps, then flat
sft_steps = 3000        # SFT's safety cap, past the horizon: a seed that learns slowly trains on
sft_target = 0.6        # stop once the held-out accuracy reaches this
sft_temperature = 1.0   # ... sampled at this temperature (0: greedy)
sft_eval_every = 50     # steps between held-out checks
sft_max_seconds = 0     # also stop after this long (0: never: a clock makes runs machine-bound)
# Bridge warm-up (docs/paper.md §3.1): once, before Bridge exists, the base model answers
# warmup_problems problems warmup_samples times; the correct answers of problems with >= 2 of them
# form one group each (2-8 rows), on which only the Bridge weights train, with cross-entropy
warmup_steps = 100      # Bridge warm-up steps
warmup_lr = 1e-3        # its peak LR
warmup_groups = 16      # groups (problems) per warm-up step
warmup_data = ''        # JSONL problems to build the set from (the paper: GSM8K's train split)
warmup_problems = 512   # problems the base model answers (a seeded sample of warmup_data)
warmup_samples = 8      # answers per problem (the paper's 8)
warmup_temperature = 1.0  # sampled at this temperature
warmup_set = ''         # train from this set (an earlier run's out_dir/warmup_set.jsonl) instead
# GRPO
grpo_steps = 300        # length of the LR schedule
max_iters = 0           # stop after this many GRPO steps (0 = grpo_steps); resume goes on from here
batch_prompts = 64      # prompts per step (all ranks together); rows = batch_prompts * width
                        # (at 32, the gradient's noise broke a fragile SFT model on some seeds:
                        # RESULTS.md)
width = 4               # generation width = GRPO group = Bridge group
lr = 3e-4               # GRPO's peak LR (AdamW)
min_lr_ratio = 0.1      # each stage's cosine ends at this fraction of its peak LR
lr_warmup_iters = 10    # each stage's LR rises linearly over its first lr_warmup_iters steps
weight_decay = 0.0      # AdamW's, every stage
beta1 = 0.9             # AdamW's
beta2 = 0.99            # AdamW's
grad_clip = 1.0         # the gradient norm clip (0: none)
temperature = 1.0       # rollout sampling temperature
top_k = 0               # rollout top-k (0: none)
top_p = 1.0             # rollout nucleus (1: none)
max_new_tokens = 16     # answer length cap of a rollout
loss_type = 'dapo'      # 'dapo' (token-level, the paper's) | 'grpo' | 'dr_grpo'
eps_low = 0.2           # the ratio's clip range below 1
eps_high = 0.2          # ... and above 1 (DAPO's clip-higher: > eps_low)
beta = 0.0              # KL weight; a frozen reference model is kept only when > 0
num_iterations = 1      # updates per rollout (> 1: the clipped ratio against frozen log-probs)
scale_rewards = 'group' # 'group' = (r - mean) / (std + eps) | 'none' = Dr. GRPO
mask_truncated = False  # drop completions that hit max_new_tokens from the loss
micro_groups = 0        # groups per micro-batch of the gradient pass (0 = all); never split
logprob_chunk = 1024    # tokens per chunk of the head in the log-prob pass (0: full logits)
grad_checkpoint = None  # recompute blocks in backward; None = on from 100M params (memory.py)
bridge_only = False     # GRPO trains only Bridge weights
# evaluation
eval_widths = '1,2,4,8,16'
eval_problems = 0       # 0 = every problem of every test set (embedded: 256); N = the first N
eval_samples = 16       # rows per problem at every width, in eval_samples / w groups of w
eval_temperature = 1.0
eval_max_new_tokens = 0 # the evaluation's answer length (0 = max_new_tokens, the rollout's)
eval_top_p = 0.0        # the evaluation's nucleus (0 = top_p, the rollout's)
probe = True            # read what Bridge does during evaluation (probe.BridgeProbe); no compile
probe_problems = 0      # probe off: this many problems per set probed at width 4 (Fig. 7), eager
sample_slots = 0        # groups a sampling call decodes at once (0: as many as memory left holds)
# system
device = 'auto'         # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'          # 'auto' = bf16 autocast on CUDA, fp32 on CPU | 'bfloat16' | 'float32'
compile = False         # torch.compile the training forward and the engine's decode step
threads = 0             # CPU threads; 0 = pick from the free cores
fsdp = False            # under torchrun: shard weights, gradients, AdamW state (FSDP2); else DDP
dry_run = False         # print the memory estimate, then stop
plan_gpu = ''           # with dry_run: each stage's time on 'h100', 'h200' or this 'cpu' (plan.py)
plan_answer_tokens = 0  # the plan's mean answer length before the cap (0: plan.MEAN_ANSWER's)
wandb_log = False       # also log to Weights & Biases (needs wandb installed)
wandb_project = 'nanobridge'
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
# -----------------------------------------------------------------------------
# the run's state, built by main(): declared here so that every name has one visible origin
model = raw_model = None  # the model the stages train (compiled if asked) and the module itself
tok = None                # its tokenizer
the_task = None           # the `task` setting's tasks.Task: problems, prompts, reward, environment
dev = None                # the device
use_bf16 = False          # bf16 autocast (fp32 master weights)
autocast = nullcontext()  # ... as a context, or nothing
ranks = None              # distributed.Ranks: rank, world, sums over ranks
log = None                # results.Log: stdout, log.jsonl, wandb
config = {}               # the settings as run (saved in every checkpoint)
model_dir = None          # the checkpoint loaded, if any
longest_prompt = 0        # of every data set, in tokens: the engine's cache holds it + the answer
rooms = {}                # the bytes a sampling call may fill beside the weights (memory.py)
# what every sampled group is keyed on beside the seed (engine.key): the draw it serves
SFT_CHECK = 1
WARMUP_SET = 2
ROLLOUT = 3
EVAL = 4
# each stage's batches: random.Random(seed * 1000 + its stream + step * world + rank)
SFT_STREAM = 0
WARMUP_STREAM = 200
GRPO_STREAM = 300

def check_config(relate=True):  # every setting and every relation between settings (settings.py)
    settings.check(config, torch.cuda.is_available(), TASKS, EMBEDDED, grpo.LOSS_TYPES, relate)

# -----------------------------------------------------------------------------
# the shared training loop: LR schedule, clipping, logging, checkpoints, resume
def place(model, sharded, train=True):
    """The model as it runs: FSDP2-sharded over the ranks, or on one device with every fast path
    (fastpath.py: the same function, computed faster)."""
    if sharded:
        return attach(shard(model, ranks.world, use_bf16, train=train), logprob_chunk)
    return fuse(model, logprob_chunk)

def get_lr(it, base, total):
    if it < lr_warmup_iters:  # linear warm-up, then cosine down to min_lr_ratio x base (nanoGPT)
        return base * (it + 1) / lr_warmup_iters
    ratio = min(1.0, (it - lr_warmup_iters) / max(1, total - lr_warmup_iters))
    floor = min_lr_ratio * base
    return floor + 0.5 * (1 + math.cos(math.pi * ratio)) * (base - floor)

def start_stage(params, base_lr, opt_state=None):
    """AdamW over exactly `params`: the rest is frozen (no weight gradients computed or held for
    it), and every stage starts with no gradients, so nothing from an earlier stage (e.g. the
    Bridge-only warm-up) leaks into it."""
    raw_model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    raw_model.zero_grad(set_to_none=True)
    unfreeze_for_fsdp(raw_model)
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(beta1, beta2), weight_decay=weight_decay,
                            **({'fused': True} if dev.type == 'cuda' else {}))
    if opt_state is not None:
        full_state(raw_model, opt, fsdp, load=opt_state)
    return opt

def optimizer_step(opt):  # sync over ranks, clip, step, zero -> the gradient norm before clipping
    params = [p for g in opt.param_groups for p in g['params']]
    ranks.sync_grads(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else torch.tensor(0.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)

def end_step(stage, step, total, stop_at, m, opt, t0, t_start, start, done=False):
    """The step's log line and, every save_every steps, at the end or when the stage stops, its
    checkpoint (the model, its tokenizer and the training state)."""
    lr_now = opt.param_groups[0]['lr']
    last = step + 1 == stop_at
    if ranks.master and ((step + 1) % log_interval == 0 or last or 'acc' in m and stage == 'sft'):
        eta = (time.time() - t_start) / (step + 1 - start) * (stop_at - step - 1)
        log(stage, step + 1, total, {**m, 'lr': lr_now}, 1000 * (time.time() - t0), eta)
    if done or (step + 1) % save_every == 0 or last:
        state = {'stage': stage, 'step': step + 1, 'config': config,
                 'extra': {'done': True} if done else {}}
        save_run(os.path.join(out_dir, 'ckpt'), raw_model, opt, fsdp, ranks, state, model_dir)

def run_stage(stage, params, base_lr, total, step_fn, start=0, opt_state=None, should_stop=None,
              horizon=None):
    """SFT's and the warm-up's loop: step_fn(step, update) -> metrics for steps start..total-1, with
    AdamW; step_fn does its own backward passes and calls update() for the optimizer step. The LR
    schedule spans `horizon` steps (default: total), and stays at its floor after them."""
    opt = start_stage(params, base_lr, opt_state)
    t_start = time.time()
    for step in range(start, total):
        for g in opt.param_groups:
            g['lr'] = get_lr(step, base_lr, horizon or total)
        t0 = time.time()
        m = step_fn(step, lambda: optimizer_step(opt))
        # e.g. SFT reached its accuracy target or its time limit
        done = bool(should_stop and should_stop(step, m))
        if should_stop and ranks.world > 1:  # clocks differ: leave together, or collectives hang
            done = ranks.all_sum(done)[0] > 0
        end_step(stage, step, total, total, m, opt, t0, t_start, start, done)
        if done:
            break

def sample_and_score(problems, w, temp, keys, entropy=False, probed=False, new_tokens=0,
                     nucleus=0.0, slots=0, room=None):
    """The one place that samples: `w` rows per problem -> (Generation, texts, rewards, every row's
    problem), through the sampling engine (engine.py: group slots refilled as groups finish; row k's
    draws keyed on keys[k], so they do not depend on how many groups run at once).
    - A row cut at new_tokens (default max_new_tokens) before its stop token scores 0, whatever its
      text holds: its last scratch number is no answer.
    - slots: groups at once (0: as many as `room` bytes hold, default the sampling room: MATH-500 x
      16 rows x 4,096 tokens would be ~1 TB of KV cache at 1.5B).
    - Under bf16 autocast it decodes from a bf16 inference copy of the weights, refreshed at every
      call; probed (a BridgeProbe reads the model's own blocks): from the model itself, eager.
    - Under FSDP the caller holds the weights gathered (distributed.gathered): sampling does no
      collective, so ranks may hold different numbers of problems."""
    if not problems:
        return None, [], torch.zeros(0), []
    new_tokens = new_tokens or max_new_tokens
    ids = [the_task.encode(tok, p) for p in problems]
    # one cache length for every call of the run (a compiled step is captured once);
    # settings.check_data made each set's prompts + answers fit the context
    cap = min(longest_prompt + new_tokens, raw_model.config.max_position_embeddings)
    room = rooms.get('sampling', math.inf) if room is None else room  # no estimate: all at once
    slots = slots or sampling_slots(raw_model.config, config, cap, w, longest_prompt, len(ids),
                                    room, use_bf16)
    m = engine.inference_copy(raw_model) if use_bf16 and not fsdp and not probed else raw_model
    with torch.no_grad(), autocast:
        gen = engine.sample(m, ids, keys, w, new_tokens, temp, top_k or None, nucleus or top_p,
                            tok.stop_ids, slots, entropy=entropy, env=the_task.env(tok), cap=cap,
                            compile=compile and not probed)
    texts = [tok.decode(c) for c in gen.completions()]
    rows = the_task.rows([problems[i // w] for i in range(len(texts))], texts, w)
    rewards = torch.tensor([the_task.reward(t, p) for t, p in zip(texts, rows)])
    return gen, texts, rewards * gen.finished.cpu(), rows

def rows_of(gen, field):  # one Generation field of every row, on the CPU (none if nothing sampled)
    return getattr(gen, field).cpu() if gen is not None else torch.zeros(0, dtype=torch.long)

def teacher_forced(groups, update, micro=0):
    """One cross-entropy step on groups of answers to one prompt each (SFT: groups of one; the
    warm-up: a problem's correct answers, each group at its own width, tasks.group_batch) -> the
    loss averaged over ranks. micro: groups per micro-batch (0 = all at once); a group is never
    split, and each micro-batch's mean is weighted by its share of the step's targets, so the
    gradient is the same however the step is split."""
    pieces = [groups[i:i + micro] for i in range(0, len(groups), micro)] if micro else [groups]
    parts = [group_batch(piece, tok, the_task) for piece in pieces]
    n, total = max(1, sum(int((y >= 0).sum()) for _, y, _, _ in parts)), 0.0
    for x, y, alive, W in parts:
        share = int((y >= 0).sum()) / n  # 1.0 for a step in one piece
        with autocast:
            _, loss = model(x.to(dev), y.to(dev), width=W, alive=alive.to(dev))
        (loss * share / ranks.world).backward()  # ranks' gradients are summed by sync_grads
        total += loss.item() * share
    return {'loss': ranks.all_sum(total)[0] / ranks.world, 'gnorm': update()}

# -----------------------------------------------------------------------------
# stages
def sft(steps, start=0, opt_state=None):
    """Cross-entropy on prompt -> response pairs (prompt tokens are not predicted), until the
    held-out accuracy at sft_temperature reaches sft_target (checked every sft_eval_every steps) or
    the step cap, which is said."""
    held = next(iter(the_task.test_sets.values()))[:eval_problems or None]
    t_begin = time.time()
    mine = range(ranks.rank, len(held), ranks.world)  # this rank's problems, by their index
    test = [held[i] for i in mine]

    def step_fn(step, update):
        rng = random.Random(seed * 1000 + SFT_STREAM + step * ranks.world + ranks.rank)
        batch = [rng.choice(the_task.train_set) for _ in range(sft_batch // ranks.world)]
        m = teacher_forced([{'prompt': p['prompt'], 'responses': [p['response']]} for p in batch],
                           update)
        if (step + 1) % sft_eval_every == 0 or step + 1 == steps:  # the stopping rule's check
            with gathered(raw_model, fsdp):  # the same draws at every check: keyed on the problem
                keys = [engine.key(seed, SFT_CHECK, i) for i in mine]  # one row per problem
                r = sample_and_score(test, 1, sft_temperature, keys, room=rooms.get('sft'))[2]
            s, n = ranks.all_sum(r.sum(), len(test))
            m['acc'] = s / n
        return m

    capped = []  # the held-out accuracy, if SFT reached its cap below its target

    def should_stop(step, m):
        if step + 1 == steps and m.get('acc', 1) < sft_target <= 1:
            capped.append(m['acc'])
        return m.get('acc', 0) >= sft_target or 0 < sft_max_seconds < time.time() - t_begin
    params = list(model.parameters())
    run_stage('sft', params, sft_lr, steps, step_fn, start, opt_state, should_stop, sft_horizon)
    later = mode.split(',')[mode.split(',').index('sft') + 1:]
    if capped and {'warmup', 'grpo'} & set(later):  # GRPO from a model still learning can collapse
        raise settings.UserError(
            f"SFT reached its step cap ({steps}) below sft_target={sft_target} (held-out accuracy "
            f"{capped[0]:.3f}), so the run stops before {', '.join(later)}: continue SFT with "
            f"python train.py --init_from=resume --out_dir={out_dir} --sft_steps={2 * steps}")
    if capped and ranks.master:
        print(f"note: SFT reached its step cap ({steps}) below sft_target={sft_target} "
              f"(held-out accuracy {capped[0]:.3f})")

def bridge_weights():
    return [p for b in raw_model.bridge_modules() for p in b.parameters()]

def build_warmup_set(given):
    """docs/paper.md §3.1, once and before Bridge exists: the base model answers warmup_problems
    problems warmup_samples times; each problem with >= 2 correct (and finished) answers becomes one
    group of them. Ranks split the problems; rank 0 writes out_dir/warmup_set.jsonl, which a later
    run can train from (--warmup_set), as text: a later run re-encodes it. given: the --warmup_set's
    groups, or the problems of warmup_data, read at start."""
    path = os.path.join(out_dir, 'warmup_set.jsonl')
    if warmup_set or (init_from == 'resume' and os.path.exists(path)):
        return given if warmup_set else read_groups(path)
    source = given or the_task.train_set
    chosen = random.Random(seed).sample(source, min(warmup_problems, len(source)))
    mine = range(ranks.rank, len(chosen), ranks.world)  # this rank's problems, by their index
    probs, S = [chosen[i] for i in mine], warmup_samples
    # answers drawn one at a time: each its own group of one, none waits for its problem's longest
    keys = [engine.key(seed, WARMUP_SET, i, j) for i in mine for j in range(S)]  # answer j of i
    t0 = time.time()
    with gathered(raw_model, fsdp):  # once for the whole set: ranks may hold different numbers
        rows = [p for p in probs for _ in range(S)]
        gen, texts, r, _ = sample_and_score(rows, 1, warmup_temperature, keys)
    if ranks.master and gen is not None:
        print(f"warm-up set {gen.stats.line(1)}\n"
              f"done warm-up set sampling in {time.time() - t0:.1f} s")
    ok = r > 0  # right and finished: a right answer cut at max_new_tokens scored 0
    right = lambda i: [t for t, good in zip(texts[i * S:i * S + S], ok[i * S:i * S + S]) if good]
    groups = [{'prompt': p['prompt'], 'answer': p['answer'], 'responses': right(i)}
              for i, p in enumerate(probs)]
    groups = ranks.gather(g for g in groups if len(g['responses']) >= 2)  # <= 1 correct: dropped
    if ranks.master:
        n = min(warmup_problems, len(source))
        write_groups(path, groups, f"{n} problems, {S} answers each")
    return groups

def warmup(steps, groups, start=0, opt_state=None):
    """docs/paper.md §3.1: cross-entropy of the Bridge weights only, on groups of one problem's
    correct answers (build_warmup_set), each group at its own width."""
    def step_fn(step, update):
        rng = random.Random(seed * 1000 + WARMUP_STREAM + step * ranks.world + ranks.rank)
        batch = [rng.choice(groups) for _ in range(warmup_groups // ranks.world)]
        return {**teacher_forced(batch, update, micro_groups), 'groups': len(batch)}
    if groups:
        run_stage('warmup', bridge_weights(), warmup_lr, steps, step_fn, start, opt_state)
    elif ranks.master:
        print("WARNING: the warm-up set is empty (no problem had 2 or more correct answers): "
              "no warm-up step runs")

def grpo_stage(steps, start=0, opt_state=None):
    """GRPO of the full model + Bridge (bridge_only: Bridge alone), each group sampled, scored and
    computed jointly: sample -> reward -> advantages -> micro-batches -> backward -> clip and step
    -> log."""
    ref = None
    if beta > 0:  # the KL reference: the model as GRPO starts, kept on disk for a resumed run
        sd = None if start else full_state(raw_model, None, fsdp)  # a resumed run reads it back
        ref = kl_reference(os.path.join(out_dir, 'ref'), raw_model, sd, ranks, dev)
        ref = place(ref, fsdp, train=False)
    params = bridge_weights() if bridge_only else list(raw_model.parameters())
    opt = start_stage(params, lr, opt_state)
    health, t_start = results.Health(), time.time()
    loss_kw = dict(temperature=temperature or 1.0, loss_type=loss_type, eps_low=eps_low,
                   eps_high=eps_high, beta=beta, max_tokens=max_new_tokens, autocast=autocast)
    stop_at = min(steps, max_iters) if max_iters else steps
    for step in range(start, stop_at):
        for g in opt.param_groups:
            g['lr'] = get_lr(step, lr, steps)
        t0 = time.time()
        # 1) sample: everything random comes from (seed, stage, step, rank): resume is exact
        rng = random.Random(seed * 1000 + GRPO_STREAM + step * ranks.world + ranks.rank)
        probs = [rng.choice(the_task.train_set) for _ in range(batch_prompts // ranks.world)]
        draw = rng.randrange(2**31)  # the step's groups are keyed on it
        keys = [engine.key(draw, ROLLOUT, i, j) for i in range(len(probs)) for j in range(width)]
        with gathered(raw_model, fsdp):
            gen, _, r, _ = sample_and_score(probs, width, temperature, keys, entropy=True,
                                            slots=len(probs))
        t_sample = time.time() - t0
        # 2) rewards -> group-relative advantages; micro-batches of whole groups
        ro = grpo.Rollout.from_generation(gen, r, width, scale_rewards, mask_truncated)
        mbs = ro.micro_batches(micro_groups)
        n_tok, n_rows = ranks.all_sum(ro.mask.sum(), ro.mask.size(0))
        old, refs = grpo.frozen_logprobs(model, ro, mbs, temperature or 1.0, ref, beta,
                                         num_iterations, autocast)
        # 3) backward over the micro-batches, then clip and step; num_iterations times
        sums = {}
        for _ in range(num_iterations):
            st = grpo.accumulate(model, ro, mbs, old, refs, n_tok, n_rows, **loss_kw)
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v / num_iterations
            sums['gnorm'] = sums.get('gnorm', 0.0) + optimizer_step(opt) / num_iterations
        # 4) the step's statistics over ranks (one all-reduce), warnings, log line, checkpoint
        clip_frac, kl, ent, zero_std, trunc, mean_r, acc, n_gen = ranks.all_sum(
            sums['clip_frac'], sums['kl'], sums['entropy'],
            (r.view(-1, width).std(1) == 0).float().mean() / ranks.world,
            (~gen.finished).float().mean() / ranks.world, r.mean() / ranks.world,
            (r > 0).float().mean() / ranks.world, gen.lengths.sum())
        if ranks.master:
            for msg in health(step + 1, mean_r, zero_std, trunc, max_new_tokens):
                print(f"WARNING: {msg}")
        dt = time.time() - t0
        m = {'reward': mean_r, 'acc': acc, 'zero_std': zero_std, 'clip_frac': clip_frac,
             'kl': kl, 'entropy': ent, 'gnorm': sums['gnorm'],
             'len': float(gen.lengths.float().mean()), 'trunc': trunc, 'tok/s': n_gen / dt,
             'sample': f"{100 * t_sample / dt:.0f}%"}
        if dev.type == 'cuda':
            m['mem'] = f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f}G"
        end_step('grpo', step, steps, stop_at, m, opt, t0, t_start, start)

def draw_rows(i, test, n, probed):
    """Test set i's eval_samples rows per problem, in groups of n, on this rank -> (every row's
    problem, texts, lengths, finished). Row j of problem p has one key at every width: rows that
    read nothing are the same rows at every width."""
    test = test[:eval_problems or None]
    mine = range(ranks.rank, len(test), ranks.world)  # this rank's problems, by their index
    probs = [test[p] for p in mine for _ in range(eval_samples // n)]  # eval_samples / n groups
    keys = [engine.key(seed, EVAL, i, p, j) for p in mine for j in range(eval_samples)]
    gen, texts, _, _ = sample_and_score(probs, n, eval_temperature, keys, probed=probed,
                                        new_tokens=eval_max_new_tokens, nucleus=eval_top_p)
    if ranks.master and gen is not None:
        print(f"{list(the_task.test_sets)[i]}: {gen.stats.line(n)}")
    each = [probs[r // n] for r in range(len(texts))]  # every row's problem
    return each, texts, rows_of(gen, 'lengths'), rows_of(gen, 'finished')

def score(rows, w):
    """The paper's metrics at width w of drawn rows, averaged over every rank's rows."""
    each, texts, lengths, finished = rows
    problems = the_task.rows(each, texts, w)
    m = results.eval_metrics(texts, problems, w, the_task, lengths, finished)
    v = ranks.all_sum(*[x for pair in m.values() for x in pair])  # (sum, count) pairs, over ranks
    return {k: v[2 * j] / v[2 * j + 1] for j, k in enumerate(m) if v[2 * j + 1]}

def evaluate(after='init'):
    """The paper's metrics (results.eval_metrics) at every width on every test set and their
    average, the width gain, and the probe's norm ratio and sibling share per layer at width 4 (the
    paper's training width), with the protocol card in out_dir/eval_{after}.json, `after` being the
    stage before it (init, sft, warmup, grpo). A model whose rows do not read each other (no Bridge
    blocks, self-only, P-Match) draws its eval_samples rows per problem once, at width 1, and every
    width groups those rows: the same estimates for a fraction of the cost."""
    widths = sorted(int(v) for v in eval_widths.split(','))
    res, shares = {'sets': {n: {} for n in the_task.test_sets}}, {}
    once = not reads_siblings(raw_model)
    reader = BridgeProbe(raw_model) if probe and not once else None
    drawn = {}  # each set's rows, kept for every width when they are drawn once
    with gathered(raw_model, fsdp):  # gathered once: ranks may hold different numbers of problems
        for w in widths:
            if reader:
                reader.reset()
            for i, (name, test) in enumerate(the_task.test_sets.items()):
                if name not in drawn or not once:
                    drawn[name] = draw_rows(i, test, 1 if once else w, bool(reader))
                r = res['sets'][name][w] = score(drawn[name], w)
                main = 'acc' if 'acc' in r else 'score'  # ROUGE sets: a mean score
                r['width_gain'] = r[main] - res['sets'][name][widths[0]][main]
                if the_task.chance(w) is not None:  # the best a row alone can do
                    r['chance'] = the_task.chance(w)
            shares[w] = reader.sibling_shares() if reader else {}  # over all sets at width w
            if shares[w] and w == (4 if 4 in widths else max(widths)):  # the paper's training width
                res |= {'bridge_norm_ratio': reader.norm_ratios(),
                        'bridge_sibling_share': shares[w], 'probe_width': w}
    if reader:
        reader.remove()
    if not reader and probe_problems and reads_siblings(raw_model):  # Fig. 7 from a subset
        reader = BridgeProbe(raw_model)
        with gathered(raw_model, fsdp):
            for i, (name, test) in enumerate(the_task.test_sets.items()):
                draw_rows(i, test[:probe_problems], 4, True)
        res |= {'bridge_norm_ratio': reader.norm_ratios(),
                'bridge_sibling_share': reader.sibling_shares(), 'probe_width': 4}
        reader.remove()
    if the_task.transfer:  # the paper's Avg is over the math sets alone
        res['transfer'] = sorted(the_task.transfer)
    math_sets = {n: s for n, s in res['sets'].items() if n not in the_task.transfer}
    for w, m in results.average(math_sets).items():
        sibling = {'sibling': sum(shares[w].values()) / len(shares[w])} if shares[w] else {}
        res[str(w)] = m | sibling
    res['card'] = results.card(config, the_task, raw_model, model_dir, dev, use_bf16, once)
    if ranks.master:
        print(results.report(res))
        atomic_write(os.path.join(out_dir, f'eval_{after}.json'), json.dumps(res, indent=1))
    return res

def reads_siblings(m):  # only Bridge proper mixes rows; self-only and P-Match act on each row alone
    return m.bridge_config is not None and m.bridge_config.mode == 'bridge'

# -----------------------------------------------------------------------------
def main():
    global model, raw_model, tok, the_task, dev, use_bf16, autocast, ranks, log, config, model_dir
    global longest_prompt, rooms
    config = {k: globals()[k] for k in config_keys}
    # a resumed run's relations are checked once its own settings are read back
    check_config(relate=init_from != 'resume')
    stages, start, opt_state, after = mode.split(','), 0, None, 'init'
    ckpt = os.path.join(out_dir, 'ckpt')
    model_dir = ckpt if init_from == 'resume' else None if init_from == 'scratch' else init_from
    trains = {'sft', 'warmup', 'grpo'} & set(stages) and not dry_run
    check_overwrite(init_from, model_dir, ckpt, trains, overwrite)
    auto = 'cuda' if torch.cuda.is_available() else 'cpu'
    ranks = Ranks(torch.device(auto if device == 'auto' else device), fsdp)
    dev = ranks.connect() if not dry_run else ranks.dev  # a dry run joins no process group
    torch.set_num_threads(threads or max(1, free_cores() // ranks.world))
    if ranks.master:
        print(f"device {dev}, {torch.get_num_threads()} CPU threads per rank, "
              f"{ranks.world} rank(s)")
    torch.manual_seed(seed)
    state = load_train_state(ckpt, ranks) if init_from == 'resume' else None
    if state:  # the run goes on as it was configured
        globals().update(resume_settings(state, config, _overrides))
        config = {k: globals()[k] for k in config_keys}
        check_config()
        say = print if ranks.master else id
        stages, start, opt_state = resume_plan(stages, state, config, ckpt, say)
        # the optimizer state lives on in opt_state until its stage loads it
        after, state = state['stage'], None
    steps = {'sft': sft_steps, 'warmup': warmup_steps, 'grpo': grpo_steps}
    # fp32 master weights, bf16 compute (a plan for a GPU plans the GPU's default)
    on_gpu = dev.type == 'cuda' or plan_gpu in plan.GPUS
    use_bf16 = dtype == 'bfloat16' or (dtype == 'auto' and on_gpu)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    the_task = make_task(task, digits, data_train, data_test, test_keys, chat_template,
                         instruction, answer_fallback)
    os.makedirs(out_dir, exist_ok=True)
    if model_dir is None:  # the embedded tiny Qwen-shaped model, with a byte-level tokenizer
        with tempfile.TemporaryDirectory() as d:
            tok = write_byte_tokenizer(d)
        raw_model = Transformer(ModelConfig(
            vocab_size=tok.n_vocab, hidden_size=n_embd, intermediate_size=ffn,
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
            max_position_embeddings=256, rope_theta=1e4, eos_token_id=tok.eos_id)).to(dev)
    else:  # a dry run may have config.json alone: shapes, and prompts counted without a tokenizer
        bare = dry_run and no_tokenizer(model_dir)
        tok = Tokenizer.from_pretrained(model_dir) if not bare else None
        raw_model = load_model(model_dir, device='meta' if dry_run else dev, dtype=torch.float32,
                               verbose=ranks.master)
    new_bridge = BridgeConfig(dim=bridge_dim, n_head=bridge_heads, mode=bridge_mode)
    adds = use_bridge and {'warmup', 'grpo'} & set(stages)
    bcfg = raw_model.bridge_config or (new_bridge if adds else None)
    # every data set is read, every prompt measured and every stage's memory estimated now: a bad
    # line or a run that cannot fit stops here, not after hours of training (preflight.py)
    warm, longest_prompt, rooms = preflight.check(raw_model, bcfg, the_task, tok, config, stages,
                                                  ranks, dev, use_bf16)
    stages = [] if dry_run else stages
    raw_model = place(raw_model, fsdp and stages)
    project = wandb_project if wandb_log and ranks.master else None
    log = results.Log(out_dir if ranks.master else None, project, config,
                      fresh=init_from != 'resume')
    evals = []
    for stage in stages:
        if stage == 'warmup' and not (use_bridge or raw_model.bridge_config):
            continue  # nothing to warm up in the RLVR-only baseline
        groups = build_warmup_set(warm) if stage == 'warmup' else None  # no Bridge yet
        if stage in ('warmup', 'grpo') and use_bridge and raw_model.bridge_config is None:
            full = full_tensors(raw_model) if fsdp else None
            raw_model = raw_model.with_bridge(new_bridge, full)  # zero W_O: still the same model
            raw_model = place(raw_model, fsdp)
            if ranks.master:
                print(bridge_report(raw_model))
        model = torch.compile(raw_model) if compile else raw_model
        model.train()
        t_stage = time.time()
        if stage == 'eval':
            evals.append((after, evaluate(after)))
        elif stage == 'warmup':
            warmup(steps[stage], groups, start, opt_state)
        else:
            {'sft': sft, 'grpo': grpo_stage}[stage](steps[stage], start, opt_state)
        if ranks.master:  # what `--dry_run=True --plan_gpu=...` planned it at
            print(f"done {stage} in {time.time() - t_stage:.1f} s")
        if stage != 'eval':
            start, opt_state, after = 0, None, stage
    # the run's last lines say when training made the model worse
    if len(evals) > 1 and ranks.master and (msg := results.below(*evals[0], *evals[-1])):
        print(f"WARNING: {msg}")
    ranks.close()

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
