"""
Memory at paper scale, from outside the model: what one rank holds at a GRPO run's peak (weights, gradients, AdamW,
the KL reference, the rollout's KV cache, one micro-batch's activations and the chunked head), with the activations
per token measured on one real Block. train.py prints it at start, and stops on CUDA if the run cannot fit.
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
    kv_token = 2 * L * cfg.num_key_value_heads * cfg.head_dim * cdt  # K and V of every layer, per cached token
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

def check_memory(m, device, verbose=True):
    """Print the estimate; stop with a one-line error on CUDA if it cannot fit, warn on CPU."""
    if verbose:
        print('memory estimate per rank:\n' + '\n'.join(f"  {k:<48} {v / 2**30:8.2f} GiB" if v >= 2**30 else
                                                        f"  {k:<48} {v / 2**20:8.1f} MiB" for k, v in m.items()))
    if device.type == 'cuda':  # the weights may already be on the device
        have = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    else:
        with open('/proc/meminfo') as f:
            have = int(next(l for l in f if l.startswith('MemAvailable')).split()[1]) * 1024
    msg = (f"the run needs ~{m['peak'] / 2**30:.1f} GiB per rank but {device} has {have / 2**30:.1f} GiB: lower width, "
           "max_new_tokens, batch_prompts or micro_groups, logprob_chunk, or set grad_checkpoint=True")
    if m['peak'] > 0.95 * have and device.type == 'cuda':
        raise ValueError(msg)
    if m['peak'] > 0.95 * have and verbose:
        print(f"WARNING: {msg}")

def sampling_rows(cfg: ModelConfig, tokens, rollout_rows, mb):
    """The most rows one sampling call may hold: as many as a GRPO rollout (which memory_estimate counts), or as many
    as fit `mb` MiB of fp32 KV cache at `tokens` per row, whichever is more (the embedded tasks sample in one call)."""
    row_bytes = 8 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens
    return max(rollout_rows, mb * 2**20 // row_bytes)

def check_run(model, bridge, cfg, world, prompt_len, bf16, device, verbose):
    """The estimate of a train.py run (cfg: its settings) from the model it starts from and the Bridge it will have,
    printed; stops a CUDA run that cannot fit. Decides grad_checkpoint=None: on from 100M parameters, where
    activations grow to ~4 MB per token at 1.5B, off below, where recomputing is only a second forward pass."""
    with torch.device('meta'):
        extra, base = bridge_params(Transformer(model.config, bridge))
    n_train = extra if cfg['bridge_only'] else extra + base
    model.grad_checkpoint = extra + base >= 1e8 if cfg['grad_checkpoint'] is None else cfg['grad_checkpoint']
    per_rank = cfg['batch_prompts'] // world
    check_memory(memory_estimate(
        model.config, bridge, n_params=extra + base, n_train=n_train, rows=per_rank * cfg['width'],
        mb_rows=(cfg['micro_groups'] or per_rank) * cfg['width'], tokens=prompt_len + cfg['max_new_tokens'],
        new_tokens=cfg['max_new_tokens'], chunk=cfg['logprob_chunk'], width=cfg['width'], bf16=bf16,
        fsdp=world if cfg['fsdp'] else 0, beta=cfg['beta'], checkpointing=model.grad_checkpoint), device, verbose)
