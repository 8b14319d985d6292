"""
Memory at paper scale, from outside the model: what one rank holds at the peak of each stage a run runs. A training
stage (SFT, the warm-up, GRPO) holds weights, gradients, AdamW, the KL reference, what it samples, one micro-batch's
activations and the chunked head, with the activations per token measured on one real Block; a sampling stage (the
warm-up set, evaluation) holds the weights and one call's KV cache. train.py prints every stage at start, and stops
on CUDA if one cannot fit.
"""
import torch

from bridge import BridgeConfig, bridge_mask, bridge_params
from model import Block, ModelConfig, Transformer, rope, rope_inv_freq

def saved_bytes_per_token(cfg: ModelConfig, bridge: BridgeConfig | None, width, bf16):
    """Bytes autograd keeps per token in one Block (its Bridge included), measured: one Block runs on CPU on
    uninitialised weights under the run's autocast, and saved_tensors_hooks add up the storages it saves. Two
    lengths, so that what does not grow with tokens (autocast's weight copies) cancels."""
    with torch.device('meta'):
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
            block(x, cos, sin, width, bridge_mask(torch.ones(width, T, dtype=torch.bool), width), None, None, None)
        sizes.append(sum(seen.values()))
    return (sizes[1] - sizes[0]) / (8 * width)

def memory_estimate(cfg: ModelConfig, bridge: BridgeConfig | None, *, n_params, n_train, rows, mb_rows, tokens,
                    new_tokens, chunk, width, bf16, fsdp=0, beta=0.0, checkpointing=True):
    """{item: bytes} at a GRPO run's peak on one rank, which train.py prints at start. rows: rollout rows per rank;
    mb_rows: rows of one gradient micro-batch (whole groups); tokens: prompt + new_tokens; fsdp: the FSDP ranks (0:
    none), of which each keeps 1/fsdp of the weights and their state, and gathers in the compute dtype all weights for
    a rollout, or two blocks (one prefetched) and the head for the update, where a block's gradients meet too."""
    L, V, cdt, S = cfg.num_hidden_layers, cfg.vocab_size, 2 if bf16 else 4, fsdp or 1
    kv_token = kv_bytes(cfg, bf16)
    act = saved_bytes_per_token(cfg, bridge, width, bf16)
    head_tokens = min(chunk or mb_rows * new_tokens, mb_rows * new_tokens)
    # checkpointing keeps each block's fp32 input and recomputes one block at a time; the gradients flowing back
    # through that block take about as much again (measured, bench.py's memory rows)
    acts = {c: mb_rows * tokens * ((L * 4 * cfg.hidden_size if c else L * act) + 2 * act) for c in (True, False)}
    # one chunk's fp32 logits (under bf16 also the bf16 product they are cast from: measured); the normed hidden
    head = (6 if bf16 else 4) * head_tokens * V + mb_rows * tokens * 4 * cfg.hidden_size
    # AdamW's foreach step makes a temporary fp32 copy of its parameters (sqrt of exp_avg_sq): measured at 0.5B
    m = {'weights (fp32)': 4 * n_params / S, 'gradients': 4 * n_train / S, 'AdamW state': 8 * n_train / S,
         'AdamW step temporaries': 4 * n_train / S, 'reference model (beta > 0)': 4 * n_params / S if beta > 0 else 0,
         'bf16 weight copies (autocast)': 2 * n_params if bf16 and not fsdp else 0,
         f'rollout KV cache ({kv_token:,} B/token)': kv_token * rows * tokens + 4 * 4 * rows * V,
         'update activations, grad_checkpoint on': acts[True] + head,
         'update activations, grad_checkpoint off': acts[False] + head}
    if fsdp:
        with torch.device('meta'):
            block = sum(p.numel() for p in Block(cfg, 0, bridge).parameters())
        m['rollout: weights gathered (FSDP)'] = cdt * n_params
        m['update: 2 blocks + head gathered (FSDP)'] = cdt * (2 * block + V * cfg.hidden_size) + 4 * block
    fixed = sum(v for k, v in m.items() if not k.startswith(('rollout', 'update')))
    update = m.get('update: 2 blocks + head gathered (FSDP)', 0) + m[f'update activations, grad_checkpoint '
                                                                      f'{"on" if checkpointing else "off"}']
    m['peak'] = fixed + max(sum(v for k, v in m.items() if k.startswith('rollout')), update)
    return m

def sampling_estimate(cfg: ModelConfig, *, n_params, rows, tokens, bf16, fsdp=0):
    """{item: bytes} on one rank of a stage that only samples (an evaluation, the warm-up set): the weights, under
    FSDP gathered whole for the stage, and one sampling call's KV cache and last logits."""
    S, cdt = fsdp or 1, 2 if bf16 else 4
    m = {'weights (fp32)': 4 * n_params / S,
         'bf16 weight copies (autocast)': 2 * n_params if bf16 and not fsdp else 0,
         'weights gathered (FSDP)': cdt * n_params if fsdp else 0,
         f'KV cache of one call: {rows} rows x {tokens:,} tokens': kv_bytes(cfg, bf16) * rows * tokens
         + 4 * 4 * rows * cfg.vocab_size}
    m['peak'] = sum(m.values())
    return m

def kv_bytes(cfg: ModelConfig, bf16):  # K and V of every layer, per cached token, in the compute dtype
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (2 if bf16 else 4)

ADVICE = {'warm-up set sampling': 'lower sample_mb or max_new_tokens',
          'sft': 'lower sft_batch or max_new_tokens, or set grad_checkpoint=True',
          'warmup': 'lower micro_groups (groups per micro-batch) or max_new_tokens, or set grad_checkpoint=True',
          'grpo': 'lower width, max_new_tokens, batch_prompts or micro_groups, logprob_chunk, or set '
                  'grad_checkpoint=True',
          'eval': 'lower sample_mb or eval_max_new_tokens'}

def check_memory(stages, device, verbose=True):
    """Print each stage's estimate ({stage: {item: bytes}}); stop with a one-line error on CUDA if a stage cannot
    fit, warn on CPU."""
    size = lambda v: f"{v / 2**30:8.2f} GiB" if v >= 2**30 else f"{v / 2**20:8.1f} MiB"
    if verbose:
        print('memory estimate per rank, for each stage this run runs:')
        for stage, m in stages.items():
            print(f"{stage}: peak {size(m['peak']).strip()}\n" + '\n'.join(f"  {k:<52} {size(v)}"
                                                                        for k, v in m.items() if k != 'peak'))
    if device.type == 'cuda':  # the weights may already be on the device
        have = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    else:
        with open('/proc/meminfo') as f:
            have = int(next(l for l in f if l.startswith('MemAvailable')).split()[1]) * 1024
    for stage, m in stages.items():
        msg = (f"the run needs ~{m['peak'] / 2**30:.1f} GiB per rank in its {stage} stage but {device} has "
               f"{have / 2**30:.1f} GiB: {ADVICE[stage]}")
        if m['peak'] > 0.95 * have and device.type == 'cuda':
            raise ValueError(msg)
        if m['peak'] > 0.95 * have and verbose:
            print(f"WARNING: {msg}")

def sampling_rows(cfg: ModelConfig, tokens, run, world, w):
    """The rows one sampling call holds, whole groups of w: as many as a GRPO rollout (which memory_estimate counts),
    or as fit run['sample_mb'] MiB of fp32 KV cache at `tokens` per row, whichever is more (the embedded tasks sample
    in one call); at least one group."""
    row_bytes = 8 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens
    return max(1, int(max(run['batch_prompts'] // world * run['width'], run['sample_mb'] * 2**20 // row_bytes))
               // w) * w

def stage_estimates(model, bridge, extra, base, run, world, lens, stages, bf16):
    """{stage: {item: bytes}} for every stage of a train.py run (run: its settings; stages: those it will run; lens:
    {set: longest prompt}; extra, base: the Bridge's and the base model's parameters). Sampling holds one cache of the
    longest prompt of any set + the stage's answer length (eval_max_new_tokens for evaluation); the warm-up trains on
    the warm-up data's prompts."""
    now = base + (extra if model.bridge_config else 0)  # before Bridge is added: the warm-up set, SFT
    fsdp, new = world if run['fsdp'] else 0, run['max_new_tokens']
    # the sampling engine's cache: the longest prompt of any set + the answer, for every call of the run
    cap = lambda n: min(max(lens.values()) + n, model.config.max_position_embeddings)
    warm_len = lens.get('the warm-up data', lens['the training set'])
    common = dict(new_tokens=new, chunk=run['logprob_chunk'], bf16=bf16, fsdp=fsdp, checkpointing=model.grad_checkpoint)
    out = {}
    if 'warmup' in stages and bridge and not run['warmup_set']:
        S = run['warmup_samples']
        rows = sampling_rows(model.config, cap(new), run, world, S)
        out['warm-up set sampling'] = sampling_estimate(model.config, n_params=now, rows=rows, tokens=cap(new),
                                                        bf16=bf16, fsdp=fsdp)
    if 'sft' in stages:
        out['sft'] = memory_estimate(
            model.config, model.bridge_config, n_params=now, n_train=now, width=1, tokens=cap(new),
            rows=sampling_rows(model.config, cap(new), run, world, 1), mb_rows=run['sft_batch'] // world, **common)
    if 'warmup' in stages and bridge:
        groups = min(run['micro_groups'] or run['warmup_groups'], run['warmup_groups'] // world)
        out['warmup'] = memory_estimate(
            model.config, bridge, n_params=extra + base, n_train=extra, width=run['warmup_samples'], rows=0,
            mb_rows=groups * run['warmup_samples'], tokens=warm_len + new, **common)
    if 'grpo' in stages:
        per_rank = run['batch_prompts'] // world
        out['grpo'] = memory_estimate(
            model.config, bridge, n_params=extra + base, n_train=extra if run['bridge_only'] else extra + base,
            rows=per_rank * run['width'], mb_rows=(run['micro_groups'] or per_rank) * run['width'],
            tokens=cap(new), width=run['width'], beta=run['beta'], **common)
    if 'eval' in stages:
        widths = [1] + [int(w) for w in run['eval_widths'].split(',')]  # 1: rows drawn once, then grouped
        tokens = cap(run['eval_max_new_tokens'] or new)
        rows = max(sampling_rows(model.config, tokens, run, world, w) for w in widths)
        out['eval'] = sampling_estimate(model.config, n_params=extra + base if bridge else now, rows=rows,
                                        tokens=tokens, bf16=bf16, fsdp=fsdp)
    return out

def check_run(model, bridge, run, world, lens, stages, bf16, device, verbose):
    """The estimate of a train.py run, stage by stage, from the model it starts from and the Bridge it will have,
    printed; stops a CUDA run with a stage that cannot fit. Decides grad_checkpoint=None: on from 100M parameters,
    where activations grow to ~4 MB per token at 1.5B, off below, where recomputing is only a second forward pass."""
    with torch.device('meta'):
        extra, base = bridge_params(Transformer(model.config, bridge))
    model.grad_checkpoint = extra + base >= 1e8 if run['grad_checkpoint'] is None else run['grad_checkpoint']
    check_memory(stage_estimates(model, bridge, extra, base, run, world, lens, stages, bf16), device, verbose)
