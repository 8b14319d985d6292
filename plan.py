"""
How long a run takes, before it runs.
    python train.py CONFIG --dry_run=True --plan_gpu=h100    # or h200, or cpu (this machine)
prints, for every stage the run runs, its completions, its decode steps (an upper bound and the
expected count), the engine's slots, its memory peak and its time, compiled and eager; then the
README's whole protocol (the base model evaluated once; Bridge, P-Match and RLVR, each trained
and evaluated) at max_new_tokens and at 16k. The cost model (RESULTS.md: its constants, their
sources, and its check against measured runs):
  decode step     the bytes it reads (the weights, the KV cache up to the length attention reads,
                  the logits) over bandwidth x BANDWIDTH_SHARE, or its FLOPs over peak x MFU when
                  that is longer. Beside it, the host's launches: every kernel of the step (eager)
                  or the engine's own (compiled: the model is one CUDA graph, whose kernels cost
                  `replay` each). A GPU overlaps the two (the longer counts); a CPU adds them up.
  prefill, update FLOPs over peak x MFU: per parameter and token, 2 forward, 4 backward (2 when
                  the base is frozen), 2 more to recompute a checkpointed block, 2 for the KL
                  reference's forward.
  answer lengths  each row's length is exponential with its set's mean before the cap
                  (MEAN_ANSWER, or --plan_answer_tokens): a group of w rows decodes for
                  E[min(longest of w, cap)] steps.
"""
import math
import os
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from bridge import BridgeConfig, bridge_params
from checkpoint import meta_model
from fastpath import Linear
from memory import device_bytes, sampling_estimate, sampling_slots
from model import ModelConfig, Transformer

@dataclass
class Device:
    name: str
    memory: float      # bytes one rank may fill
    bandwidth: float   # bytes/s, peak
    flops: float       # FLOP/s, peak (GPUs: bf16 dense)
    launch: float      # seconds of host time per kernel, eager
    replay: float      # seconds per eager kernel once captured in a CUDA graph (0: no graphs)
    overlap: bool      # the host queues kernels while the device runs (GPU), or runs them (CPU)

# bandwidth and dense bf16 FLOP/s: NVIDIA's H100 SXM and H200 SXM datasheets; memory: what
# torch reports usable. launch: PyTorch's eager host time per kernel, ~10 us (assumed); replay:
# a CUDA graph's ~1 us between kernels over the ~2.5 eager kernels inductor fuses into one
# (assumed). gpu_check.sh's decode part measures a step both ways (bench_decode.py).
GPUS = {'h100': Device('NVIDIA H100 SXM 80 GB', 79 * 2**30, 3.35e12, 989e12, 10e-6, 0.4e-6, True),
        'h200': Device('NVIDIA H200 SXM 141 GB', 139 * 2**30, 4.8e12, 989e12, 10e-6, 0.4e-6, True)}
# gpt-fast's README: Llama-2-7B in bf16 decodes at 1,397 GB/s on an A100, whose peak is 2,039
BANDWIDTH_SHARE = 0.69
MFU = 0.4  # assumed for prefill and update (checkpointed bf16 training at 1-8B)
# mean answer length in tokens before any cap, R1-Distill models: assumed, as orders of
# magnitude (the base model's evaluation measures them). A set not listed runs to the cap.
MEAN_ANSWER = {'gsm8k': 1200, 'the warm-up data': 1200, 'the training set': 3500,
               'math500': 3500, 'amc23': 7000, 'aime24': 12000, 'aime25': 12000,
               'brumo25': 10000, 'cmimc25': 12000, 'hmmt_feb25': 13000,
               'gpqa': 6000, 'zebralogic': 8000, 'countdown': 3000, 'xsum': 1000, 'cnn_dm': 1000}
# the five transfer sets of config/r1_transfer.py: (problems, prompt tokens), the prompt lengths
# estimated from the datasets (a plan reads no data file): every arm is evaluated on them
TRANSFER = {'gpqa': (198, 300), 'zebralogic': (1000, 900), 'countdown': (1024, 150),
            'xsum': (500, 600), 'cnn_dm': (500, 1000)}

def best(fn, reps=5):  # the fastest of a few timed calls, after one untimed
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)

@torch.no_grad()
def measure_cpu():
    """This machine's constants, measured in about a second on the run's threads, the way a
    decode step computes (fastpath's packed matmuls): the weight bytes a matmul of 8 rows streams
    per second, the FLOP rate of one of 64 rows, and the host time of a small op."""
    lin = Linear(4096, 8192, bias=False)  # 128 MB of weights: far beyond the caches
    bandwidth = lin.weight.nbytes / best(lambda: lin(torch.randn(8, 4096)))
    flops = 2 * 64 * lin.weight.numel() / best(lambda: lin(torch.randn(64, 4096)))
    x = torch.zeros(64, 64)
    launch = best(lambda: [x.add(1) for _ in range(1000)]) / 1000
    name = 'CPU'
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            name = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), name)
    return Device(f"{name}, {torch.get_num_threads()} threads (measured)",
                  device_bytes(torch.device('cpu')), bandwidth, flops, launch, 0.0, False)

def device(kind):
    return measure_cpu() if kind == 'cpu' else GPUS[kind]

class Count(TorchDispatchMode):
    """Counts the ops dispatched inside it that launch a kernel (a view launches none)."""
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))

@torch.no_grad()
def ops_per_step(cfg: ModelConfig, bridge: BridgeConfig | None):
    """(the model's kernels, the engine's own) in one decode step, counted on small models of the
    same kind at 1 and 2 layers: the model's grow with its layers, the engine's (sampling,
    bookkeeping) do not."""
    gqa = cfg.num_key_value_heads < cfg.num_attention_heads

    def counts(layers):
        small = ModelConfig(model_type=cfg.model_type, vocab_size=64, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                            attention_bias=cfg.attention_bias,
                            tie_word_embeddings=cfg.tie_word_embeddings,
                            max_position_embeddings=64)
        block = BridgeConfig(dim=32, n_head=2, mode=bridge.mode) if bridge else None
        m = Transformer(small, block)
        cache, pos = m.make_cache(2, 16), torch.zeros(2, dtype=torch.long)
        with Count() as c:
            m(torch.zeros(2, 1, dtype=torch.long), width=2, cache=cache, pos=pos)
        total = []
        for n in (4, 8):  # two lengths, so that the prefill cancels
            with Count() as e:
                engine.sample(m, [[1, 2]], [0, 1], 2, n)
            total.append(e.n)
        return c.n, (total[1] - total[0]) / 4 - c.n
    (m1, e1), (m2, _) = counts(1), counts(2)
    return m1 + (cfg.num_hidden_layers - 1) * (m2 - m1), e1

def mean_steps(mean, cap, rows):
    """E[min(longest of `rows` i.i.d. Exp(mean) lengths, cap)]: the integral over [0, cap] of
    P(longest > x) = 1 - (1 - e^(-x / mean))^rows, by the midpoint rule on 1,000 pieces."""
    if mean <= 0:
        return cap
    xs = [(i + 0.5) * cap / 1000 for i in range(1000)]
    longer = lambda x: -math.expm1(rows * math.log1p(-math.exp(-x / mean)))
    return sum(longer(x) for x in xs) * cap / 1000

@dataclass
class Model:
    cfg: ModelConfig
    params: int        # every parameter, Bridge included
    trained: int       # those the update trains
    blocks: bool       # Bridge-shaped blocks (Bridge, self-only, P-Match): a warm-up trains them
    reads: bool        # its rows read each other (Bridge): evaluation samples every width

    def decode(self, dev, rows, context, ops, eager, bf16):
        """Seconds of one decode step of `rows` rows whose attention reads `context` cached tokens;
        ops: the model's kernels and the engine's per step (ops_per_step)."""
        c, width = self.cfg, 2 if bf16 else 4
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * width
        weights = self.matmul_weights()  # each read once (of the embedding, only its rows)
        # the logits: written, read as floats, softmaxed, summed and raced, ~6 passes
        read = weights * width + rows * context * kv + 6 * 4 * rows * c.vocab_size
        attention = 4 * rows * context * c.num_hidden_layers * c.hidden_size
        flops = 2 * weights * rows + attention
        work = max(read / (dev.bandwidth * share(dev)), flops / (dev.flops * mfu(dev)))
        model_ops, engine_ops = ops
        host = (engine_ops + model_ops * eager) * dev.launch
        work += 0 if eager else model_ops * dev.replay  # a graph's kernels, back to back
        return max(work, host) if dev.overlap else work + host

    def matmul_weights(self):  # every weight but the embedding's (tied, it is the head's too)
        c = self.cfg
        return self.params - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)

    def flops(self, dev, tokens, per_param):
        return tokens * per_param * self.matmul_weights() / (dev.flops * mfu(dev))

def share(dev):  # a CPU's constants are measured: what it reaches already
    return BANDWIDTH_SHARE if dev.overlap else 1.0

def mfu(dev):
    return MFU if dev.overlap else 1.0

@dataclass
class Stage:
    completions: int = 0
    bound: float = 0     # decode steps at most: every group to the cap
    steps: float = 0     # decode steps expected
    slots: int = 0
    seconds: dict = None  # {'compiled': s, 'eager': s}

def sampling(model, dev, run, groups, w, mean, new, prompt, own, room, ops, bf16):
    """One engine call of `groups` groups of w rows, as a Stage (prompt: the longest of every set,
    which sizes the cache; own: this set's longest, at which every prompt is prefilled, an upper
    bound). Refilled slots keep the cache's far end in use, so attention reads all of it; a single
    wave (every group in its own slot) reads, eager, only up to its step: half its length on
    average."""
    cap = prompt + new
    slots = sampling_slots(model.cfg, run, cap, w, prompt, groups, room, bf16)
    group = mean_steps(mean, new, w)
    if groups <= slots:
        steps, bound = mean_steps(mean, new, groups * w), new
    else:  # every slot busy, then the last groups drain
        steps, bound = groups * group / slots + group, -(-groups // slots) * new
    context = {'compiled': cap, 'eager': cap if groups > slots else prompt + steps / 2}
    prefill = model.flops(dev, groups * own, 2)
    step = lambda mode: model.decode(dev, slots * w, context[mode], ops, mode == 'eager', bf16)
    seconds = {mode: steps * step(mode) + prefill for mode in ('compiled', 'eager')}
    return Stage(groups * w, bound, steps, slots, seconds)

def trained(seconds):  # a training stage: no decoding
    return Stage(seconds={'compiled': seconds, 'eager': seconds})

def add(a, b):
    return Stage(a.completions + b.completions, a.bound + b.bound, a.steps + b.steps,
                 max(a.slots, b.slots), {k: a.seconds[k] + b.seconds[k] for k in b.seconds})

def stages_of(model, dev, run, world, lens, sizes, stages, ops, bf16, room):
    """{stage: Stage} of one train.py run, on one rank."""
    new, prompt = run['max_new_tokens'], max(lens.values())
    per_rank = lambda n: -(-n // world)
    mean = lambda name: run['plan_answer_tokens'] or MEAN_ANSWER.get(name, 0)
    call = lambda groups, w, name, n: sampling(model, dev, run, groups, w, mean(name), n, prompt,
                                               lens.get(name, prompt), room, ops, bf16)
    checkpointing = run['grad_checkpoint']
    if checkpointing is None:  # memory.check_run's rule
        checkpointing = model.params >= 1e8
    ckpt = 2 if checkpointing else 0  # a checkpointed block runs forward twice
    out = {}
    if 'warmup' in stages and model.blocks and not run['warmup_set']:  # the base samples it
        rows = per_rank(sizes['the warm-up set']) * run['warmup_samples']  # groups of one
        out['warm-up set sampling'] = call(rows, 1, 'the warm-up data', new)
    if 'sft' in stages:  # over its LR schedule (it stops at its target, or goes on to its cap)
        rows = min(run['sft_steps'], run['sft_horizon']) * run['sft_batch'] // world
        out['sft'] = trained(model.flops(dev, rows * (lens['the training set'] + new), 6 + ckpt))
    if 'warmup' in stages and model.blocks:
        rows = run['warmup_steps'] * run['warmup_groups'] // world * run['warmup_samples']
        tokens = lens.get('the warm-up data', prompt) + mean_steps(mean('the warm-up data'), new, 1)
        out['warmup'] = trained(model.flops(dev, rows * tokens, 4 + ckpt))
    if 'grpo' in stages:
        steps = run['grpo_steps']
        rollout = call(run['batch_prompts'] // world, run['width'], 'the training set', new)
        answer = mean_steps(mean('the training set'), new, 1)
        tokens = rollout.completions * (lens['the training set'] + answer)
        full = model.trained == model.params  # the base's weights get gradients too
        passes = (4 + 2 * full + ckpt) * run['num_iterations'] + 2 * (run['beta'] > 0)
        passes += 2 * (run['num_iterations'] > 1)  # the frozen sampling policy's log-probs
        update = model.flops(dev, tokens, passes)
        out['grpo'] = Stage(rollout.completions * steps, rollout.bound * steps,
                            rollout.steps * steps, rollout.slots,
                            {k: steps * (v + update) for k, v in rollout.seconds.items()})
    if 'eval' in stages:
        widths = [int(v) for v in run['eval_widths'].split(',')] if model.reads else [1]
        total = trained(0.0)
        for name, size in sizes.items():
            if name == 'the warm-up set':
                continue
            problems = per_rank(min(size, run['eval_problems'] or size))
            for w in widths:
                groups = problems * run['eval_samples'] // w
                total = add(total, call(groups, w, name, run['eval_max_new_tokens'] or new))
        out['eval'] = total
    return out

def hours(s):
    return f"{s / 3600:.1f} h" if s >= 360 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"

def report(cfg, bridge, run, world, lens, sizes, stages, kind, peaks):
    """Print the plan of this run on `kind` ('h100', 'h200', 'cpu'), stage by stage (peaks:
    {stage: bytes}, memory.py's), and the protocol's at max_new_tokens and at 16,384 tokens."""
    dev = device(kind)
    bf16 = dev.overlap or run['dtype'] == 'bfloat16'

    def times(t):  # a CPU's compiled step is not modelled: it loses to eager (bench_decode.py)
        eager = f"{hours(t['eager'])} eager"
        return f"{hours(t['compiled'])} compiled, {eager}" if dev.overlap else eager
    extra, base = bridge_params(meta_model(cfg, bridge))
    ops = ops_per_step(cfg, bridge)
    fsdp = world if run['fsdp'] else 0
    weights = sampling_estimate(cfg, n_params=extra + base, slots=0, w=1, tokens=0, prompt=0,
                                bf16=bf16, fsdp=fsdp)['peak']
    room = 0.9 * dev.memory - weights

    # blocks: Bridge-shaped; reads: rows read rows
    def arm(r, blocks, reads, arm_stages, sets=None):
        params = extra + base if blocks else base
        m = Model(cfg, params, extra if blocks and r['bridge_only'] else params, blocks, reads)
        ls, ss = lens, sizes
        if sets:  # other test sets: {name: (problems, prompt tokens)}
            ls = {n: p for n, (_, p) in sets.items()}
            ss = {n: k for n, (k, _) in sets.items()}
        return stages_of(m, dev, r, world, ls, ss, arm_stages, ops, bf16, room)
    lengths = '--plan_answer_tokens' if run['plan_answer_tokens'] else 'plan.MEAN_ANSWER'
    print(f"plan on {dev.name}: {world} rank(s); {ops[0]:.0f} model kernels and {ops[1]:.0f} "
          f"engine kernels per decode step; answer lengths from {lengths}")
    reads = bridge is not None and bridge.mode == 'bridge'
    this = arm(run, bridge is not None, reads, stages)
    for stage, s in this.items():
        what = f"{s.completions:,} completions, <= {s.bound:,.0f} decode steps (expected " \
               f"{s.steps:,.0f}), {s.slots} slots, " if s.completions else ''
        peak = f"peak {peaks[stage] / 2**30:.1f} GiB, " if stage in peaks else ''
        print(f"plan {stage}: {what}{peak}{times(s.seconds)}")
    total = lambda out: {k: sum(s.seconds[k] for s in out.values()) for k in ('compiled', 'eager')}
    print(f"plan: this run {times(total(this))}")
    for new in (run['max_new_tokens'], 16384):
        if max(lens.values()) + new > cfg.max_position_embeddings:
            print(f"plan: the protocol at max_new_tokens={new:,} exceeds the model's context")
            continue
        r = {**run, 'max_new_tokens': new, 'eval_max_new_tokens': new, 'warmup_set': ''}
        paper = ['warmup', 'grpo', 'eval']
        arms = {'base eval': arm(r, False, False, ['eval']),      # once, for every arm
                'Bridge': arm(r, True, True, paper),              # which builds the warm-up set
                'P-Match': arm({**r, 'warmup_set': 'given'}, True, False, paper),  # from it
                'RLVR': arm(r, False, False, ['grpo', 'eval'])}
        t = {name: total(a) for name, a in arms.items()}
        # config/r1_transfer.py on each checkpoint (its widths and samples): Bridge at each
        # width, the others once
        tr = {**r, 'eval_widths': '1,4', 'eval_samples': 4}
        bridge_t = total(arm(tr, True, True, ['eval'], TRANSFER))
        once = total(arm(tr, False, False, ['eval'], TRANSFER))
        t['transfer evals'] = {k: bridge_t[k] + 3 * once[k] for k in bridge_t}
        mode = 'compiled' if dev.overlap else 'eager'
        each = ', '.join(f"{name} {hours(x[mode])}" for name, x in t.items())
        whole = {k: sum(x[k] for x in t.values()) for k in ('compiled', 'eager')}
        print(f"plan: the protocol at max_new_tokens={new:,}: {times(whole)} ({each})")
