"""
Every train.py setting, checked in one place before anything runs: rules() holds one rule per
setting (its range, list or choice), relations() the rules between settings. A failure is one line
naming the setting, its value and what would be accepted. train.py calls check() before it loads
anything (and again on a resumed run's stored settings), and check_data() once the checkpoint, its
tokenizer and the data are loaded, still before the first step.
"""
import os

STAGES = ('sft', 'warmup', 'grpo', 'eval')

class UserError(ValueError):
    """A mistake in a setting, a path or a file. The command line prints it as one line
    (configurator.py); any other exception is a bug and keeps its traceback."""

def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)

def integer(lo, hi=None):
    def rule(v):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            return f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return rule

def number(lo, hi=None, above=False, below=False):
    """lo <= v (lo < v if above) and v <= hi (v < hi if below)."""
    def rule(v):
        if (not _num(v) or (v <= lo if above else v < lo)
                or (hi is not None and (v >= hi if below else v > hi))):
            return (f"a number {'>' if above else '>='} {lo}"
                    + (f" and {'<' if below else '<='} {hi}" if hi is not None else ""))
    return rule

def choice(*options):
    return lambda v: None if v in options else "one of " + ", ".join(map(repr, options))

def boolean(v):
    return None if isinstance(v, bool) else "True or False"

def text(v):
    return None if isinstance(v, str) else "a string"

def nonempty(v):
    return None if isinstance(v, str) and v.strip() else "a non-empty string"

def int_list(v):
    """'1,2,4': positive integers, comma-separated."""
    try:
        xs = [int(x) for x in str(v).split(',')]
    except ValueError:
        xs = []
    return None if xs and all(x >= 1 for x in xs) and len(set(xs)) == len(xs) else \
        "distinct integers >= 1, comma-separated, e.g. '1,2,4,8'"

def stages(v):
    xs = str(v).split(',')
    return None if xs and set(xs) <= set(STAGES) else \
        f"stages among {', '.join(STAGES)}, comma-separated, in the order to run them"

def key_pair(v):
    ok = isinstance(v, str) and (v == '' or (len(v.split(',')) == 2 and all(v.split(','))))
    return None if ok else "'' or 'prompt_key,answer_key'"

def device_name(v):
    kind, _, index = str(v).partition(':')
    ok = v in ('auto', 'cpu', 'cuda') or (kind == 'cuda' and index.isdigit())
    return None if ok else "auto, cpu, cuda or cuda:N"

def optional_bool(v):
    return None if v is None or isinstance(v, bool) else "None (automatic), True or False"

def widths(cfg):
    return [int(x) for x in cfg['eval_widths'].split(',')]

def rules(tasks, losses):
    """{setting: rule}, one per train.py setting; a rule returns None or what would be accepted."""
    steps = integer(0)
    return {
        'out_dir': nonempty,
        'init_from': nonempty,
        'mode': stages,
        'overwrite': boolean,
        'save_every': integer(1),
        'log_interval': integer(1),
        'seed': integer(0),
        'task': choice(*tasks),
        'digits': integer(1),
        'data_train': text,
        'data_test': text,
        'test_keys': key_pair,
        'chat_template': choice('auto', 'plain'),
        'instruction': text,
        'n_layer': integer(1),
        'n_embd': integer(2),
        'n_head': integer(1),
        'n_kv_head': integer(1),
        'ffn': integer(1),
        'use_bridge': boolean,
        'bridge_dim': integer(1),
        'bridge_heads': integer(1),
        'bridge_mode': choice('bridge', 'self', 'pmatch'),
        'sft_lr': number(0, above=True),
        'sft_batch': integer(1),
        'sft_steps': steps,
        'sft_horizon': integer(1),
        'sft_target': number(0),
        'sft_temperature': number(0),
        'sft_eval_every': integer(1),
        'sft_max_seconds': number(0),
        'warmup_steps': steps,
        'warmup_lr': number(0, above=True),
        'warmup_data': text,
        'warmup_problems': integer(1),
        'warmup_samples': integer(2, 64),
        'warmup_temperature': number(0),
        'warmup_set': text,
        'warmup_groups': integer(1),
        'grpo_steps': steps,
        'max_iters': steps,
        'batch_prompts': integer(1),
        'width': integer(1),
        'lr': number(0, above=True),
        'min_lr_ratio': number(0, 1),
        'lr_warmup_iters': steps,
        'weight_decay': number(0),
        'beta1': number(0, 1, below=True),
        'beta2': number(0, 1, below=True),
        'grad_clip': number(0),
        'temperature': number(0),
        'top_k': integer(0),
        'top_p': number(0, 1, above=True),
        'max_new_tokens': integer(1),
        'loss_type': choice(*losses),
        'eps_low': number(0, 1, below=True),
        'eps_high': number(0),
        'beta': number(0),
        'num_iterations': integer(1),
        'scale_rewards': choice('group', 'none'),
        'mask_truncated': boolean,
        'micro_groups': integer(0),
        'logprob_chunk': integer(0),
        'grad_checkpoint': optional_bool,
        'bridge_only': boolean,
        'eval_widths': int_list,
        'eval_problems': integer(0),
        'eval_samples': integer(1),
        'eval_temperature': number(0),
        'eval_max_new_tokens': integer(0),
        'eval_top_p': number(0, 1),
        'answer_fallback': boolean,
        'probe': boolean,
        'probe_problems': integer(0),
        'sample_slots': integer(0),
        'device': device_name,
        'dtype': choice('auto', 'bfloat16', 'float32'),
        'compile': boolean,
        'threads': integer(0),
        'fsdp': boolean,
        'dry_run': boolean,
        'plan_gpu': choice('', 'h100', 'h200', 'cpu'),
        'plan_answer_tokens': integer(0),
        'wandb_log': boolean,
        'wandb_project': nonempty,
    }

def relations(cfg, world, cuda, embedded):
    """(broken, message) for each rule between settings; checked only once every single
    setting is valid."""
    c, run = cfg, cfg['mode'].split(',')
    trains = [s for s in ('sft', 'warmup', 'grpo') if s in run]
    return [
        *[(c[f'{s}_steps'] < 1, f"{s}_steps={c[f'{s}_steps']} but --mode={c['mode']} runs {s}: "
           f"expected >= 1 (or leave {s} out of --mode)") for s in trains],
        ('grpo' in run and c['width'] < 2, f"width={c['width']}: GRPO needs at least 2 rows per "
         "group to compare rewards"),
        *[(s in run and c[k] % world, f"{k}={c[k]} is not divisible by the {world} ranks: expected "
           f"a multiple of {world}")
          for s, k in (('grpo', 'batch_prompts'), ('sft', 'sft_batch'),
                       ('warmup', 'warmup_groups'))],
        *[('eval' in run and c['eval_samples'] % w, f"eval_samples={c['eval_samples']} is not a "
           f"multiple of width {w} (eval_widths={c['eval_widths']}): every width evaluates "
           "eval_samples rows per problem, in eval_samples / w groups of w") for w in widths(c)],
        ('warmup' in run and c['warmup_problems'] < world,
         f"warmup_problems={c['warmup_problems']} is fewer than the {world} ranks that split them: "
         f"expected >= {world}"),
        ('warmup' in run and c['task'] == 'maxdigit', "task='maxdigit' with a warm-up: its "
         "environment writes tokens that a teacher-forced warm-up would train on; leave warmup out "
         "of --mode (config/positive_control.py does)"),
        (c['bridge_dim'] % c['bridge_heads'], f"bridge_dim={c['bridge_dim']} is not a multiple of "
         f"bridge_heads={c['bridge_heads']}"),
        (c['init_from'] == 'scratch'
         and (c['n_embd'] % c['n_head'] or c['n_embd'] // c['n_head'] % 2),
         f"n_embd={c['n_embd']} with n_head={c['n_head']}: expected a head size n_embd / n_head "
         "that is a whole even number (RoPE rotates pairs)"),
        (c['init_from'] == 'scratch' and c['n_head'] % c['n_kv_head'], f"n_head={c['n_head']} is "
         f"not a multiple of n_kv_head={c['n_kv_head']}"),
        *[(not embedded and not os.path.isfile(f),
           f"{k}: data file {f!r} does not exist (set --{k})")
          for k, f in [('data_train', c['data_train'])]
                      + [('data_test', p) for p in test_paths(c['data_test'])]],
        (c['warmup_set'] and not os.path.isfile(c['warmup_set']), "warmup_set: file "
         f"{c['warmup_set']!r} does not exist"),
        ('warmup' in run and c['warmup_data'] and not c['warmup_set']
         and not os.path.isfile(c['warmup_data']),
         f"warmup_data: file {c['warmup_data']!r} does not exist (the warm-up set is built "
         "from it)"),
        (c['device'].startswith('cuda') and not cuda,
         f"device={c['device']!r} but torch.cuda.is_available() is False"),
        (c['fsdp'] and world == 1 and 'RANK' not in os.environ and not c['dry_run'],
         "fsdp=True runs under torchrun (one GPU too: torchrun --standalone --nproc_per_node=1 "
         "train.py)"),
        (c['plan_gpu'] and not c['dry_run'], f"plan_gpu={c['plan_gpu']!r} plans a run without "
         "running it: add --dry_run=True"),
        (c['fsdp'] and c['compile'], "fsdp=True with compile=True is not wired up (torchtitan "
         "compiles each block, then shards)"),
    ]

def test_paths(spec):
    from tasks import parse_sets  # (tasks.py imports this file)
    return [path for path, _ in parse_sets(spec).values()] or ['']

def check(cfg, cuda, tasks, embedded, losses, relate=True):
    """Raise one ValueError naming every broken setting, before anything is loaded. relate=False
    checks each setting alone (a resumed run, before its own settings are read back: the relations
    are checked on those). The world size is torchrun's, read before any process group is joined."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rule = rules(tasks, losses)
    missing = sorted(set(rule) - set(cfg))
    assert not missing, f"settings.rules names settings train.py does not have: {missing}"
    bad = [f"{k}={v!r}: expected {why}" for k, v in cfg.items()
           if k in rule and (why := rule[k](v))]
    bad += [f"{k}: settings.rules has no rule for it" for k in cfg if k not in rule]
    if not bad and relate:
        bad = [msg for broken, msg in relations(cfg, world, cuda, cfg['task'] in embedded)
               if broken]
    if bad:
        raise UserError("config: " + "; ".join(bad))

def check_data(cfg, context, prompt_lens, tests, verbose=True):
    """After loading: every prompt (train, the warm-up data and every test set, rendered in the chat
    format) plus its answer length (max_new_tokens; for a test set, eval_max_new_tokens) fits the
    model's context. prompt_lens: {set name: the longest prompt in tokens}; tests: the test sets'
    names. A limit on the test sets is said."""
    if cfg['eval_problems'] and verbose:
        n = cfg['eval_problems']
        print(f"eval_problems={n}: every test set is cut to its first {n} problems")
    # SFT's held-out check samples a test set at max_new_tokens
    sft = 'sft' in cfg['mode'].split(',')
    for name, n in prompt_lens.items():
        key = ('eval_max_new_tokens' if name in tests and cfg['eval_max_new_tokens']
               else 'max_new_tokens')
        if name in tests and sft and cfg['max_new_tokens'] > cfg[key]:
            key = 'max_new_tokens'
        if n + cfg[key] > context:
            raise UserError(f"{key}={cfg[key]}: the longest prompt of {name} has {n} tokens, and "
                            f"{n} + {cfg[key]} exceeds the model's context of {context} "
                            f"(max_position_embeddings): expected {key} <= {context - n}")
