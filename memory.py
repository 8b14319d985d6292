"""
Memory at paper scale, from outside the model: what one rank holds at the peak of each stage a run
runs. A training stage (SFT, the warm-up, GRPO) holds weights, gradients, AdamW, the KL reference,
what it samples, one micro-batch's activations and the chunked head, with the activations per token
measured on one real Block; a sampling stage (the warm-up set, evaluation) holds the weights and one
call's KV cache. train.py prints every stage at start, and stops on CUDA if one cannot fit.
"""
import torch

from bridge import BridgeConfig, bridge_mask, bridge_params
from checkpoint import meta_model, no_init
from engine import STAGE_TOKENS
from model import Block, ModelConfig, rope, rope_inv_freq
from settings import UserError

def saved_bytes_per_token(cfg: ModelConfig, bridge: BridgeConfig | None, width, bf16):
    """Bytes autograd keeps per token in one Block (its Bridge included), measured: one Block runs
    on CPU on uninitialised weights under the run's autocast, and saved_tensors_hooks add up the
    storages it saves. Two lengths, so that what does not grow with tokens (autocast's weight
    copies) cancels."""
    with torch.device('meta'), no_init():
        block = Block(cfg, 0, bridge)
    block.to_empty(device='cpu')
    params, sizes = {p.untyped_storage().data_ptr() for p in block.parameters()}, []
    for T in (8, 16):
        seen = {}
        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.zeros(width, T, cfg.hidden_size, requires_grad=True)
        cos, sin = rope(torch.arange(T).expand(width, T), rope_inv_freq(cfg), x.dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            block(x, cos, sin, width, bridge_mask(torch.ones(width, T, dtype=torch.bool), width),
                  None, None, None)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / (8 * width)

def memory_estimate(cfg: ModelConfig, bridge: BridgeConfig | None, *, n_params, n_train, rows,
                    mb_rows, tokens, new_tokens, chunk, width, bf16, fsdp=0, beta=0.0,
                    checkpointing=True):
    """{item: bytes} at a GRPO run's peak on one rank, which train.py prints at start. rows: rollout
    rows per rank; mb_rows: rows of one gradient micro-batch (whole groups); tokens: prompt +
    new_tokens; fsdp: the FSDP ranks (0: none), of which each keeps 1/fsdp of the weights and their
    state, and gathers in the compute dtype all weights for a rollout, or two blocks (one
    prefetched) and the head for the update, where a block's gradients meet too."""
    L, V, cdt, S = cfg.num_hidden_layers, cfg.vocab_size, 2 if bf16 else 4, fsdp or 1
    kv_token = kv_bytes(cfg, bf16)
    act = saved_bytes_per_token(cfg, bridge, width, bf16)
    head_tokens = min(chunk or mb_rows * new_tokens, mb_rows * new_tokens)
    # checkpointing keeps each block's fp32 input and recomputes one block at a time; the gradients
    # flowing back through that block take about as much again (measured, bench.py's memory rows)
    acts = {c: mb_rows * tokens * ((L * 4 * cfg.hidden_size if c else L * act) + 2 * act)
            for c in (True, False)}
    # one chunk's fp32 logits (under bf16 also the bf16 product they are cast from: measured);
    # the normed hidden
    head = (6 if bf16 else 4) * head_tokens * V + mb_rows * tokens * 4 * cfg.hidden_size
    # AdamW's foreach step makes a temporary fp32 copy of its parameters (sqrt of exp_avg_sq):
    # measured at 0.5B
    m = {'weights (fp32)': 4 * n_params / S, 'gradients': 4 * n_train / S,
         'AdamW state': 8 * n_train / S, 'AdamW step temporaries': 4 * n_train / S,
         'reference model (beta > 0)': 4 * n_params / S if beta > 0 else 0,
         'bf16 weight copies (autocast)': 2 * n_params if bf16 and not fsdp else 0,
         'bf16 inference copy (sampling)': 2 * n_params if bf16 and not fsdp and rows else 0,
         f'rollout KV cache ({kv_token:,} B/token)': kv_token * rows * tokens + 4 * 4 * rows * V,
         'update activations, grad_checkpoint on': acts[True] + head,
         'update activations, grad_checkpoint off': acts[False] + head}
    if fsdp:
        with torch.device('meta'), no_init():
            block = sum(p.numel() for p in Block(cfg, 0, bridge).parameters())
        m['rollout: weights gathered (FSDP)'] = cdt * n_params
        m['update: 2 blocks + head gathered (FSDP)'] = (cdt * (2 * block + V * cfg.hidden_size)
                                                        + 4 * block)
    fixed = sum(v for k, v in m.items() if not k.startswith(('rollout', 'update')))
    update = (m.get('update: 2 blocks + head gathered (FSDP)', 0)
              + m[f'update activations, grad_checkpoint '
                  f'{"on" if checkpointing else "off"}'])
    m['peak'] = fixed + max(sum(v for k, v in m.items() if k.startswith('rollout')), update)
    return m

def sampling_estimate(cfg: ModelConfig, *, n_params, slots, w, tokens, prompt, bf16, fsdp=0):
    """{item: bytes} on one rank of a stage that only samples (an evaluation, the warm-up set): the
    weights, under FSDP gathered whole for the stage, and the sampling engine's cache of `slots`
    groups of w rows."""
    S, cdt = fsdp or 1, 2 if bf16 else 4
    m = {'weights (fp32)': 4 * n_params / S,
         'bf16 inference copy': 2 * n_params if bf16 and not fsdp else 0,
         'weights gathered (FSDP)': cdt * n_params if fsdp else 0,
         'prefill of staged prompts': prefill_bytes(cfg, bf16),
         f'engine: {slots} slots x {w} rows x {tokens:,} tokens':
             slots * slot_bytes(cfg, tokens, w, prompt, bf16)}
    m['peak'] = sum(m.values())
    return m

def slot_bytes(cfg: ModelConfig, tokens, w, prompt, bf16):
    """One group slot of the sampling engine: its rows' KV cache and 4 fp32 logit buffers, and its
    staged prompt's cache."""
    return w * (kv_bytes(cfg, bf16) * tokens + 16 * cfg.vocab_size) + kv_bytes(cfg, bf16) * prompt

# one staging prefill's activations: MLP and attention, per token
def prefill_bytes(cfg: ModelConfig, bf16):
    return STAGE_TOKENS * (2 if bf16 else 4) * (3 * cfg.intermediate_size + 6 * cfg.hidden_size)

def sampling_slots(cfg: ModelConfig, run, tokens, w, prompt, groups, room, bf16):
    """Group slots of a sampling call at width w: run['sample_slots'] if set, else as many as
    `room` bytes hold (the device's memory left beside the stage's weights), at most `groups`,
    at least one."""
    if run['sample_slots']:
        return min(run['sample_slots'], groups)
    return max(1, int(min(groups, room // slot_bytes(cfg, tokens, w, prompt, bf16))))

def device_bytes(device):
    """What one rank may fill: on CUDA what is free plus what this process holds (the weights may be
    there already), on the CPU the available memory."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    with open('/proc/meminfo') as f:
        return int(next(l for l in f if l.startswith('MemAvailable')).split()[1]) * 1024

# K and V of every layer, per cached token, in the compute dtype
def kv_bytes(cfg: ModelConfig, bf16):
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (2 if bf16 else 4)

ADVICE = {'warm-up set sampling': 'lower sample_slots or max_new_tokens',
          'sft': 'lower sft_batch or max_new_tokens, or set grad_checkpoint=True',
          'warmup': 'lower micro_groups (groups per micro-batch) or max_new_tokens, or set '
                    'grad_checkpoint=True',
          'grpo': 'lower width, max_new_tokens, batch_prompts or micro_groups, logprob_chunk, '
                  'or set grad_checkpoint=True',
          'eval': 'lower sample_slots or eval_max_new_tokens'}

def check_memory(stages, have, device, verbose=True):
    """Print each stage's estimate ({stage: {item: bytes}}); stop with a one-line error on CUDA if a
    stage cannot fit, warn on CPU."""
    size = lambda v: f"{v / 2**30:8.2f} GiB" if v >= 2**30 else f"{v / 2**20:8.1f} MiB"
    if verbose:
        print('memory estimate per rank, for each stage this run runs:')
        for stage, m in stages.items():
            print(f"{stage}: peak {size(m['peak']).strip()}\n"
                  + '\n'.join(f"  {k:<52} {size(v)}" for k, v in m.items() if k != 'peak'))
    for stage, m in stages.items():
        msg = (f"the run needs ~{m['peak'] / 2**30:.1f} GiB per rank in its {stage} stage but "
               f"{device} has {have / 2**30:.1f} GiB: {ADVICE[stage]}")
        if m['peak'] > 0.95 * have and device.type == 'cuda':
            raise UserError(msg)
        if m['peak'] > 0.95 * have and verbose:
            print(f"WARNING: {msg}")

def stage_estimates(model, bridge, extra, base, run, world, lens, sizes, stages, bf16, have):
    """({stage: {item: bytes}}, rooms) for every stage of a train.py run (run: its settings; stages:
    those it will run; lens: {set: longest prompt}; sizes: {set: problems}, the test sets in order
    and 'the warm-up set'; extra, base: the Bridge's and the base model's parameters; have: the
    bytes of one rank's device). Sampling holds the engine's cache: the longest prompt of any set +
    the stage's answer length (eval_max_new_tokens for evaluation). rooms: the bytes a sampling call
    may fill beside the weights ('sampling') or beside SFT's training state ('sft'); a GRPO rollout
    holds its own groups, which memory_estimate counts."""
    # before Bridge: the warm-up set, SFT
    cfg, now = model.config, base + (extra if model.bridge_config else 0)
    fsdp, new, prompt = world if run['fsdp'] else 0, run['max_new_tokens'], max(lens.values())
    # the engine's cache, for every call of the run
    cap = lambda n: min(prompt + n, cfg.max_position_embeddings)
    # a rank's share of n problems (the first ranks hold one more)
    per_rank = lambda n: -(-n // world)
    warm_len = lens.get('the warm-up data', lens['the training set'])
    common = dict(new_tokens=new, chunk=run['logprob_chunk'], bf16=bf16, fsdp=fsdp,
                  checkpointing=model.grad_checkpoint)
    # in order: SFT checks the first
    tests = [n for name, n in sizes.items() if name != 'the warm-up set']
    weights = sampling_estimate(cfg, n_params=extra + base, slots=0, w=1, tokens=0, prompt=0,
                                bf16=bf16, fsdp=fsdp)
    rooms = {'sampling': 0.9 * have - weights['peak']}

    # one sampling call of `groups` groups of w rows
    def sampling(n_params, groups, w, tokens, room):
        slots = sampling_slots(cfg, run, tokens, w, prompt, groups, room, bf16)
        return sampling_estimate(cfg, n_params=n_params, slots=slots, w=w, tokens=tokens,
                                 prompt=prompt, bf16=bf16, fsdp=fsdp)
    out = {}
    if 'warmup' in stages and bridge and not run['warmup_set']:
        # each its own group of one
        rows = per_rank(sizes['the warm-up set']) * run['warmup_samples']
        out['warm-up set sampling'] = sampling(now, rows, 1, cap(new), rooms['sampling'])
    if 'sft' in stages:
        train = memory_estimate(cfg, model.bridge_config, n_params=now, n_train=now, width=1,
                                tokens=cap(new), rows=0, mb_rows=run['sft_batch'] // world,
                                **common)
        rooms['sft'] = 0.9 * have - train['peak']
        held = per_rank(min(tests[0], run['eval_problems'] or tests[0]))
        rows = sampling_slots(cfg, run, cap(new), 1, prompt, held, rooms['sft'], bf16)
        out['sft'] = memory_estimate(cfg, model.bridge_config, n_params=now, n_train=now, width=1,
                                     tokens=cap(new), rows=rows, mb_rows=run['sft_batch'] // world,
                                     **common)
    if 'warmup' in stages and bridge:
        groups = min(run['micro_groups'] or run['warmup_groups'], run['warmup_groups'] // world)
        out['warmup'] = memory_estimate(
            cfg, bridge, n_params=extra + base, n_train=extra, width=run['warmup_samples'], rows=0,
            mb_rows=groups * run['warmup_samples'], tokens=warm_len + new, **common)
    if 'grpo' in stages:
        per_rank_prompts = run['batch_prompts'] // world
        out['grpo'] = memory_estimate(
            cfg, bridge, n_params=extra + base,
            n_train=extra if run['bridge_only'] else extra + base,
            rows=per_rank_prompts * run['width'],
            mb_rows=(run['micro_groups'] or per_rank_prompts) * run['width'],
            tokens=cap(new), width=run['width'], beta=run['beta'], **common)
    if 'eval' in stages:
        # 1: rows drawn once, then grouped
        widths = [1] + [int(w) for w in run['eval_widths'].split(',')]
        tokens = cap(run['eval_max_new_tokens'] or new)
        largest = per_rank(max(min(n, run['eval_problems'] or n) for n in tests))
        calls = [sampling(extra + base if bridge else now, largest * run['eval_samples'] // w, w,
                          tokens, rooms['sampling']) for w in widths]
        out['eval'] = max(calls, key=lambda m: m['peak'])
    return out, rooms

def check_run(model, bridge, run, world, lens, sizes, stages, bf16, device, verbose, have=None):
    """The estimate of a train.py run, stage by stage, from the model it starts from and the Bridge
    it will have, printed; stops a CUDA run with a stage that cannot fit; -> ({stage: peak bytes},
    the rooms sampling may fill: stage_estimates). have: the bytes of one rank's device (default:
    this one's). Decides grad_checkpoint=None: on from 100M parameters, where activations grow to
    ~4 MB per token at 1.5B, off below, where recomputing is only a second forward pass."""
    extra, base = bridge_params(meta_model(model.config, bridge))
    model.grad_checkpoint = (extra + base >= 1e8 if run['grad_checkpoint'] is None
                             else run['grad_checkpoint'])
    have = have or device_bytes(device)
    out, rooms = stage_estimates(model, bridge, extra, base, run, world, lens, sizes, stages, bf16,
                                 have)
    check_memory(out, have, device, verbose)
    return {stage: m['peak'] for stage, m in out.items()}, rooms
