"""
Checkpoints, from outside the model: Hugging Face layout in and out (config.json + safetensors, read
with plain file I/O), atomic files and directories, and a training run's own checkpoint
(out_dir/ckpt): its resume plan and the rule that a run never replaces a model it was not asked to.
"""
import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile

import torch
import torch.nn as nn

import model as M
from bridge import BridgeConfig, bridge_report
from distributed import full_state
from model import ModelConfig, Transformer, rope_inv_freq
from settings import UserError
from tokenizer import write_byte_tokenizer

ARCHS = {'qwen2': 'Qwen2ForCausalLM', 'llama': 'LlamaForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

def config_from_hf(d, where='config.json'):
    """ModelConfig from a config.json dict, as transformers 4.x and 5.x write it."""
    d = dict(d)
    if d.get('use_sliding_window'):
        raise UserError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    if 'model_type' not in d:
        raise UserError(f"{where}: missing field 'model_type'")
    # transformers 5.x moved rope_theta/rope_scaling into rope_parameters and torch_dtype to dtype
    rp = d.get('rope_parameters') or {}
    if 'rope_theta' not in d and 'rope_theta' in rp:
        d['rope_theta'] = rp['rope_theta']
    if not d.get('rope_scaling') and rp.get('rope_type', 'default') != 'default':
        d['rope_scaling'] = {k: v for k, v in rp.items() if k != 'rope_theta'}
    if d.get('dtype') and not d.get('torch_dtype'):
        d['torch_dtype'] = d['dtype']
    rs = d.get('rope_scaling')
    if rs and rs.get('rope_type', rs.get('type')) not in ('default', 'llama3'):
        raise UserError(f"{where}: rope_scaling type {rs.get('rope_type', rs.get('type'))!r} "
                        "is not supported (supported: default, llama3)")
    names = ModelConfig.__dataclass_fields__
    try:
        return ModelConfig(**{k: v for k, v in d.items() if k in names})
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None

def config_to_hf(cfg: ModelConfig):
    d = {k: getattr(cfg, k) for k in ModelConfig.__dataclass_fields__}
    d['architectures'] = [ARCHS[cfg.model_type]]
    if d['rope_scaling'] is None:
        d.pop('rope_scaling')
    return d

ST_DTYPES = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
             'F64': torch.float64, 'I64': torch.int64, 'I32': torch.int32, 'I8': torch.int8,
             'U8': torch.uint8, 'BOOL': torch.bool}

def read_safetensors(path):
    """The one tensor loader: yields (name, shape, read) for each tensor of a .safetensors file,
    where read() reads just that tensor with plain file I/O. No mmap, so pages of the file never
    count as a second copy of the model in RAM. Format: 8-byte little-endian header size, a JSON
    header, then the raw bytes."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        try:
            n = int.from_bytes(f.read(8), 'little')
            if n > size - 8:
                raise UserError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
            entries = [(k, v['dtype'], tuple(v['shape']), v['data_offsets'])
                       for k, v in header.items() if k != '__metadata__']
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        for k, dt, shape, (start, end) in entries:
            if dt not in ST_DTYPES:
                raise UserError(f"{path}: tensor {k} has unsupported dtype {dt}")
            if 8 + n + end > size or end - start != math.prod(shape) * ST_DTYPES[dt].itemsize:
                raise UserError(f"{path}: corrupt or truncated safetensors file "
                                f"(tensor {k} is out of bounds)")

            def read(k=k, dt=dt, shape=shape, start=start):
                t = torch.empty(shape, dtype=ST_DTYPES[dt])
                f.seek(8 + n + start)
                # straight into the tensor's memory
                f.readinto(t.view(-1).view(torch.uint8).numpy())
                return t
            yield k, shape, read

def weight_files(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: invalid shard index ({e})") from None
        for s in shards:
            if not os.path.isfile(os.path.join(path, s)):
                raise UserError(f"shard {s} named in {index} is missing")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(single):
        raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return [single]

def read_config(path):
    """(ModelConfig, the Bridge config saved with it or None) of an HF checkpoint directory."""
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.isdir(path):
        raise UserError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: invalid JSON ({e})") from None
    try:
        bridge = BridgeConfig.from_dict(raw['bridge']) if raw.get('bridge') else None
    except (TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: {e}") from None
    return config_from_hf(raw, cfg_path), bridge

@contextlib.contextmanager
def no_init():
    """Modules built without their init, as HF's no_init_weights: on the meta device any arithmetic
    (an init's normal_, RoPE's frequencies) imports torch._dynamo, ~1 s of start-up, for values
    that are loaded or recomputed next."""
    names = ('normal_', 'uniform_', 'kaiming_uniform_', 'zeros_', 'ones_')
    saved = [getattr(nn.init, n) for n in names] + [M.rope_inv_freq]
    for n in names:
        setattr(nn.init, n, lambda t, *args, **kwargs: t)
    M.rope_inv_freq = lambda cfg: torch.empty(cfg.head_dim // 2)
    try:
        yield
    finally:
        for n, f in zip(names, saved):
            setattr(nn.init, n, f)
        M.rope_inv_freq = saved[-1]

def meta_model(config, bridge=None):
    """A Transformer's shapes on the meta device, uninitialised: no memory, no start-up cost."""
    with torch.device('meta'), no_init():
        return Transformer(config, bridge)

def load_model(path, device=None, dtype=None, bridge: BridgeConfig | None = None, verbose=True):
    """A Transformer from an HF checkpoint directory; with a `bridge` config that the checkpoint
    lacks, fresh zero-output Bridge blocks are added. device='meta' reads shapes only (train.py
    --dry_run), from config.json alone if the directory has no weights yet."""
    config, saved_bridge = read_config(path)
    bridge = bridge or saved_bridge
    dtype = dtype or DTYPES.get(config.torch_dtype, torch.float32)
    device = torch.device(device or 'cpu')
    model = meta_model(config, bridge)  # no memory until the real tensors arrive
    expected = {k: v.shape for k, v in hf_state_dict(model).items()}
    tensors, unexpected, bad = {}, [], []
    shapes_only = device.type == 'meta' and not any(os.path.exists(os.path.join(path, f)) for f in (
        'model.safetensors', 'model.safetensors.index.json'))
    for f in [] if shapes_only else weight_files(path):
        for k, shape, read in read_safetensors(f):
            if (k.endswith('rotary_emb.inv_freq')
                    or (k == 'lm_head.weight' and config.tie_word_embeddings)):
                continue  # derived buffers, or a redundant copy of the tied matrix
            if k not in expected:
                unexpected.append(k)
            elif shape != tuple(expected[k]):
                bad.append(f"{k}: checkpoint {shape} vs model {tuple(expected[k])}")
            elif device.type == 'meta':  # shapes only (train.py --dry_run): read nothing
                tensors[k] = torch.empty(shape, dtype=dtype, device=device)
            else:  # one tensor at a time: peak RAM stays ~ one model + one tensor
                tensors[k] = read().to(device=device, dtype=dtype)
    missing = [] if shapes_only else [k for k in expected if k not in tensors and not (
        bridge is not None and saved_bridge is None and '.bridge.' in k)]
    if missing or unexpected or bad:
        hint = (" (Bridge weights do not match the Bridge config)"
                if any('.bridge.' in k for k in missing + unexpected + bad) else "")
        raise UserError(f"checkpoint {path} does not match {config.model_type} config{hint}:\n" +
                        "\n".join([f"  missing: {k}" for k in missing] +
                                  [f"  unexpected: {k}" for k in unexpected] +
                                  [f"  wrong shape: {b}" for b in bad]))
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for b in model.bridge_modules():  # a base checkpoint gets fresh, zero-output Bridge blocks
        if any(p.is_meta for p in b.parameters()) and device.type != 'meta':
            b.to_empty(device=device).to(dtype).reset_parameters()
    model.inv_freq = rope_inv_freq(config).to(device)
    if verbose and bridge is not None:
        print(bridge_report(model))
    return model.eval()

def hf_state_dict(model, base_only=False, sd=None):
    # sd: e.g. the full state that FSDP gathers on rank 0
    sd = dict(model.state_dict() if sd is None else sd)
    if model.config.tie_word_embeddings:
        sd.pop('lm_head.weight', None)  # HF tied checkpoints store the matrix once
    return {k: v for k, v in sd.items() if not (base_only and '.bridge.' in k)}

def save_model(model, path, base_only=False, max_shard_bytes=5 * 2**30, state_dict=None):
    """HF layout: config.json + model.safetensors, or shards + model.safetensors.index.json. Bridge
    weights are extra tensors (model.layers.{i}.bridge.*) plus a "bridge" entry in config.json;
    base_only=True drops both, so transformers and any HF tool can read the result. Every file is
    written atomically. state_dict: write these tensors instead of the module's own (a sharded
    model's, gathered)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous()
          for k, v in hf_state_dict(model, base_only, state_dict).items()}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    shards.append(cur)
    names = ['model.safetensors'] if len(shards) == 1 else \
        [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(os.path.join(path, name),
                     lambda tmp, s=shard: save_file(s, tmp, metadata={'format': 'pt'}))
    if len(shards) > 1:
        index = {'metadata': {'total_size': sum(v.numel() * v.element_size() for v in sd.values())},
                 'weight_map': {k: n for n, s in zip(names, shards) for k in s}}
        atomic_write(os.path.join(path, 'model.safetensors.index.json'),
                     json.dumps(index, indent=2))
    keep = set(names) | ({'model.safetensors.index.json'} if len(shards) > 1 else set())
    # weights of an earlier save with another shard layout would be read instead
    for f in os.listdir(path):
        if f not in keep and (f in ('model.safetensors', 'model.safetensors.index.json')
                              or re.fullmatch(r'model-\d{5}-of-\d{5}\.safetensors', f)):
            os.remove(os.path.join(path, f))
    cfg = config_to_hf(model.config)
    cfg['torch_dtype'] = str(model.lm_head.weight.dtype).replace('torch.', '')
    if model.bridge_config is not None and not base_only:
        cfg['bridge'] = model.bridge_config.to_dict()
    atomic_write(os.path.join(path, 'config.json'), json.dumps(cfg, indent=2))

# -----------------------------------------------------------------------------
# atomic files and directories

# the process's umask: reading it means setting it, so put it back at once
os.umask(_UMASK := os.umask(0o022))

def atomic_write(path, data):
    """Write to a temp file, then rename: a crash never leaves a half-written file under the
    real name. data is text, or a function that writes the temp path it is given
    (safetensors, torch.save)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.',
                               prefix=os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def atomic_dir(path, write):
    """atomic_write for a whole directory: write(new) fills a fresh sibling path.new, which then
    replaces path by two renames (path -> path.old, path.new -> path). A crash before them leaves
    the old directory whole; between them path is missing, and recover_dir() completes the swap
    on the next start."""
    recover_dir(path)
    new, old = path + '.new', path + '.old'
    os.makedirs(new)
    write(new)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)  # absent on the first save

def recover_dir(path):
    """Undo what a crashed atomic_dir left: path.new is complete if path.old exists (path
    is renamed away only after path.new is written), so it becomes path; any other leftover
    was never committed."""
    new, old = path + '.new', path + '.old'
    if not os.path.exists(path) and os.path.exists(old):
        os.replace(new if os.path.exists(new) else old, path)
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)

# -----------------------------------------------------------------------------
# a training run's checkpoint: out_dir/ckpt = the model in HF layout + its tokenizer
# files + train_state.pt

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json',
                   'qwen.tiktoken')

def save_run(ckpt, model, opt, fsdp, ranks, train_state, tokenizer_dir=None):
    """Model (+ Bridge) as HF safetensors, its tokenizer files (tokenizer_dir's, or the embedded
    byte tokenizer), and the rest (optimizer, RNG, step, settings) as train_state.pt, written by
    rank 0 into a fresh directory that then replaces ckpt whole: a crash never mixes two steps.
    Every rank calls it (an FSDP2 state is gathered from all)."""
    state_dict, optim = full_state(model, None, fsdp), full_state(model, opt, fsdp)
    if not ranks.master:
        return
    rng = {'torch': torch.get_rng_state(), 'python': random.getstate()}
    train_state = {**train_state, 'optimizer': optim, 'rng': rng}
    def write(path):
        save_model(model, path, state_dict=state_dict)
        if tokenizer_dir is None:
            write_byte_tokenizer(path)
        for f in TOKENIZER_FILES if tokenizer_dir else ():
            if os.path.exists(os.path.join(tokenizer_dir, f)):
                shutil.copy(os.path.join(tokenizer_dir, f), path)
        # last: its presence marks a checkpoint
        torch.save(train_state, os.path.join(path, 'train_state.pt'))
    atomic_dir(ckpt, write)

def load_train_state(ckpt, ranks):
    """The training state of out_dir/ckpt, read with weights_only=True: a tampered checkpoint cannot
    run code. A save killed between its two renames is completed first (by rank 0, before any rank
    reads). The RNGs are restored."""
    if ranks.master:
        recover_dir(ckpt)
    ranks.barrier()
    path = os.path.join(ckpt, 'train_state.pt')
    if not os.path.isfile(path):
        raise UserError(f"--init_from=resume but {path} does not exist (no checkpoint in "
                        f"out_dir={os.path.dirname(ckpt)!r})")
    try:
        # each rank moves its optimizer state
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable training state, refusing to load it "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    torch.set_rng_state(state['rng']['torch'])
    random.setstate(state['rng']['python'])
    return state

def kl_reference(path, model, state_dict, ranks, device):
    """GRPO's KL reference: the model as GRPO starts, saved once to path (state_dict: its full
    weights; None when a resumed run reads back its own) and loaded frozen, in fp32."""
    if state_dict is not None and ranks.master:
        atomic_dir(path, lambda p: save_model(model, p, state_dict=state_dict))
    ranks.barrier()
    return load_model(path, device=device, dtype=torch.float32, verbose=False).requires_grad_(False)

def resume_plan(stages, state, config, path, say=print):
    """(stages left, first step, optimizer state) for --init_from=resume: the checkpoint's stage
    goes on from its step, or is skipped once finished (unless its step count, config's
    {stage}_steps, was raised), and the stages listed before it are skipped; a --mode without that
    stage runs all its stages from step 0 on the checkpoint's weights."""
    s, step, fsdp = state['stage'], state['step'], config['fsdp']
    if s not in stages:
        return stages, 0, None
    i, total = stages.index(s), config[f'{s}_steps']
    if state['extra'].get('done') or step >= total:
        say(f"resume: {path} finished {s} at step {step}/{total}" +
            ("" if state['extra'].get('done') else f"; raise --{s}_steps to train it further"))
        return stages[i + 1:], 0, None
    if state['config'].get('fsdp', False) != fsdp:  # DDP's AdamW state is by index, FSDP's by name
        raise UserError(f"{path} was written with fsdp={not fsdp}; "
                        f"resume it with --fsdp={not fsdp}")
    return stages[i:], step, state['optimizer']

# what concerns one invocation alone: never read back from a checkpoint's settings
INVOCATION = ('init_from', 'mode', 'out_dir', 'overwrite', 'dry_run', 'device', 'threads',
              'compile', 'max_iters', 'log_interval', 'wandb_log', 'wandb_project')

def migrate(saved):
    """A checkpoint's settings under today's names: warmup_iters (the LR warm-up) is
    lr_warmup_iters, min_lr, once an absolute LR floor, is min_lr_ratio = min_lr / lr (the
    floor as a fraction of each stage's peak LR), and sft_horizon, the SFT schedule's
    length, was sft_steps."""
    c = dict(saved)
    if 'warmup_iters' in c:
        c.setdefault('lr_warmup_iters', c.pop('warmup_iters'))
    if 'min_lr' in c:
        c.setdefault('min_lr_ratio', c.pop('min_lr') / c['lr'])
    if 'sft_steps' in c:  # SFT's schedule once spanned its cap
        c.setdefault('sft_horizon', c['sft_steps'])
    return c

def resume_settings(state, config, overrides):
    """The settings of a resumed run: the run's own, saved in its checkpoint (migrated to today's
    names), except what this command sets and what concerns this invocation alone."""
    saved = migrate(state['config'])
    return {k: v for k, v in saved.items()
            if k in config and k not in set(overrides) | set(INVOCATION)}

def check_overwrite(init_from, model_dir, ckpt, trains, overwrite):
    """Never destroy a model unasked: a run that saves may not write into the checkpoint it loads,
    nor replace the checkpoint of another run. --init_from=resume writes where it reads on purpose;
    --overwrite=True allows it."""
    if init_from == 'resume' or overwrite or not trains:
        return
    same = model_dir and os.path.realpath(model_dir) == os.path.realpath(ckpt)
    if same or any(os.path.exists(ckpt + s) for s in ('', '.new', '.old')):
        raise UserError((f"--init_from={init_from} is the checkpoint this run would overwrite "
                         f"(it saves to {ckpt})" if same else
                         f"{ckpt} holds another run's checkpoint, which this run "
                         f"(--init_from={init_from}) would replace") +
                        ": continue that run with --init_from=resume, write to another --out_dir, "
                        "or pass --overwrite=True to replace it")
