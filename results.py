"""
What a run leaves behind besides its model: the protocol card that every result carries (every
setting that changes a metric, the data files' hashes, the commit), the evaluation metrics and
tables (one per test set and their average), GRPO's health warnings, and out_dir/log.jsonl, one JSON
object per logged step, so that curves can be plotted and compared without parsing stdout.
"""
import hashlib
import json
import math
import os
import subprocess
import time
from collections import Counter

import torch

# the card's fields that change a metric other than the model: compare.py refuses results that
# differ in them
PROTOCOL = ('chat_template', 'instruction', 'temperature', 'top_p', 'top_k', 'max_new_tokens',
            'samples_per_problem', 'widths', 'parser', 'truncated', 'data', 'eval_problems')

def sha256(path=None, data=None):
    h = hashlib.sha256(data if data is not None else b'')
    if path:
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
    return h.hexdigest()[:16]

def commit(where):
    """The git commit of the code that ran (with '+dirty' if the tree has changes), or None
    outside a checkout."""
    try:
        run = lambda *a: subprocess.run(['git', '-C', where, *a], capture_output=True, text=True,
                                        timeout=10)
        head = run('rev-parse', 'HEAD')
        if head.returncode:
            return None
        dirty = run('status', '--porcelain', '--untracked-files=no').stdout.strip()
        return head.stdout.strip()[:12] + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return None

def card(cfg, task, model, model_dir, device, bf16, once=False):
    """The protocol of an evaluation: what produced its numbers, as one dict. once: the rows were
    drawn once at width 1 and grouped at every width (rows that do not read each other), which
    compare.py accepts beside rows sampled at each width: the estimates are the same."""
    mcfg = json.dumps({k: getattr(model.config, k)
                       for k in sorted(model.config.__dataclass_fields__)}, sort_keys=True)
    data = {}
    for name, probs in task.test_sets.items():
        path = getattr(task, 'sets', {}).get(name)  # a JSONL file, or one the task generates
        data[name] = {'problems': len(probs),
                      **({'file': path, 'lines': lines(path), 'sha256': sha256(path)} if path
                         else {'generated': f"tasks.py {task.name}",
                               'sha256': sha256(data=json.dumps(probs).encode())})}
        grader = task.grader(probs[0]) if probs else None
        if grader is not None:  # a transfer set: its own prompt format and parser
            data[name] |= {'grader': probs[0]['grader'], 'parser': grader.parser}
    return {
        'model': model_dir or 'scratch (the embedded model)',
        'model_config_sha256': sha256(data=mcfg.encode()),
        'bridge': model.bridge_config.to_dict() if model.bridge_config else None,
        'chat_template': cfg['chat_template'] if task.files else 'none (raw prompt)',
        'instruction': cfg['instruction'] if task.files else '',
        'temperature': cfg['eval_temperature'], 'top_p': cfg['eval_top_p'] or cfg['top_p'],
        'top_k': cfg['top_k'],
        'max_new_tokens': cfg['eval_max_new_tokens'] or cfg['max_new_tokens'],
        'samples_per_problem': cfg['eval_samples'],
        'truncated': 'scores 0',  # a row cut at max_new_tokens, before its stop token
        'sampling': 'once at width 1, grouped at every width' if once else 'at every width',
        'widths': cfg['eval_widths'], 'seed': cfg['seed'], 'parser': task.parser, 'data': data,
        'eval_problems': cfg['eval_problems'] or 'all',
        'commit': commit(os.path.dirname(os.path.abspath(__file__))), 'torch': torch.__version__,
        'device': str(device), 'dtype': 'bfloat16 autocast' if bf16 else 'float32',
    }

def lines(path):
    with open(path, 'rb') as f:
        return sum(1 for line in f if line.strip())

def card_line(c):
    data = '; '.join(f"{k} {v['problems']} problems"
                     + (f" ({os.path.basename(v['file'])}, sha256 {v['sha256']})"
                        if 'file' in v else '')
                     for k, v in c['data'].items())
    return (f"protocol: model {c['model']} (config sha256 {c['model_config_sha256']}), "
            f"chat {c['chat_template']}, T={c['temperature']} top_p={c['top_p']} "
            f"top_k={c['top_k']} max_new_tokens={c['max_new_tokens']}, "
            f"{c['samples_per_problem']} samples per problem at widths {c['widths']} (sampled "
            f"{c.get('sampling', 'at every width')}), seed {c['seed']}, parser: "
            f"{c['parser']}; data: {data}; eval_problems {c['eval_problems']}; "
            f"commit {c['commit']}, torch {c['torch']}, {c['device']} {c['dtype']}")

COLS = ['acc', 'pass@w', 'maj', 'gpass@0.25', 'gpass@0.5', 'gpass@0.75', 'gpass@1.0', 'agree',
        'fix', 'width_gain', 'chance', 'sibling', 'len']

# a set scored on a continuous scale (ROUGE-1): its mean per row and the best row of each group
SCORE_COLS = ['score', 'best', 'width_gain', 'len']

def format_table(by_width, title=''):
    lines_ = [title] if title else []
    first = next(iter(by_width.values()))
    cols = SCORE_COLS if 'score' in first else COLS + (['cell'] if 'cell' in first else [])
    lines_.append('width ' + ' '.join(f"{c:>10}" for c in cols))
    for w, m in by_width.items():
        lines_.append(f"{w:>5} " + ' '.join(f"{m[c]:>10.3f}" if c in m else f"{'-':>10}"
                                            for c in cols))
    return '\n'.join(lines_)

def average(sets):
    """{width: {metric: the unweighted mean over sets}}, over the metrics every set has at that
    width ({} for no sets: a transfer evaluation has no Avg)."""
    if not sets:
        return {}
    first = next(iter(sets.values()))
    return {w: {k: sum(s[w][k] for s in sets.values()) / len(sets) for k in first[w]
                if all(k in s[w] for s in sets.values())} for w in first}

def report(results, probe=None):
    """The printed evaluation: the card's line, a table per set (when there are several), the
    average, the probe."""
    out = [card_line(results['card'])]
    sets = results['sets']
    averaged = [n for n in sets if n not in results.get('transfer', [])]
    if len(sets) > 1 or not averaged:
        out += [format_table(m, f"{name}:") for name, m in sets.items()]
    if averaged:
        title = f"average over the {len(averaged)} test sets:" if len(sets) > 1 else ''
        if len(averaged) < len(sets):
            title = f"average over the {len(averaged)} math sets (Avg; transfer sets apart):"
        out.append(format_table({w: results[str(w)] for w in sets[averaged[0]]}, title))
    for key, what in (('bridge_norm_ratio', 'Bridge output / residual norm'),
                      ('bridge_sibling_share',
                       "share of a row's Bridge attention on its siblings")):
        if results.get(key):
            out.append(f"{what} per layer at width {results['probe_width']}: "
                       + ' '.join(f"{v:.3g}" for v in results[key].values()))
    return '\n'.join(out)

def below(first_name, first, last_name, last):
    """A message if the run's last evaluation scores below its first (mean accuracy over sets, at
    the first width)."""
    if not any(k.isdigit() for k in first):  # a transfer evaluation: no Avg to compare
        return None
    w = min(int(k) for k in first if k.isdigit())
    a, b = first[str(w)]['acc'], last[str(w)]['acc']
    return b < a and (f"the model after {last_name} scores below the model it started from: "
                      f"accuracy {b:.3f} at width {w} against {a:.3f} after {first_name} "
                      f"(eval_{first_name}.json): training made it worse")

class Log:
    """A logged step: one line on stdout, one JSON object in out_dir/log.jsonl (a resumed run
    appends to its own, a new run starts it afresh: curves can be plotted with any tool, without
    parsing stdout), and wandb when asked."""

    def __init__(self, out_dir=None, wandb_project=None, config=None, fresh=True):
        self.path = os.path.join(out_dir, 'log.jsonl') if out_dir else None
        if self.path and fresh and os.path.exists(self.path):
            # a new run's curves never mix with an earlier run's in the same out_dir
            os.remove(self.path)
        self.wandb = None
        if wandb_project:
            import wandb  # imported only when enabled
            self.wandb = wandb
            wandb.init(project=wandb_project, config=config)

    def __call__(self, stage, step, total, metrics, ms=0, eta=0):
        print(f"{stage} {step}/{total}: "
              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items() if k != 'lr')
              + f", lr {metrics['lr']:.2e}, {ms:.0f}ms, eta {eta:.0f}s")
        if self.path:
            rec = {'stage': stage, 'step': step, 'total': total, 'time': round(time.time(), 3),
                   **metrics}
            with open(self.path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
        if self.wandb:
            self.wandb.log({f"{stage}/{k}": v for k, v in metrics.items()}, step=step)

class Health:
    """GRPO's warnings, each said once, in words (the log line's columns show the numbers step by
    step): no learning signal (every group with zero reward std, `window` steps in a row), every
    completion truncated, and a collapse: the reward's mean over the last `window` steps has fallen
    below half of its best such mean (>= 0.1) and stayed there for `window` steps. Before the
    first full window, the mean of the first 3 or more steps counts as a best, so that a run that
    falls at its second step is seen. A healthy run's 5-step mean moves by a few hundredths; a
    collapsing one keeps fewer right answers to learn from at every step, and rarely recovers
    (RESULTS.md, seed 4: 0.52 at step 1, 0.05 by step 30)."""
    window = 5

    def __init__(self):
        self.said, self.rewards, self.best, self.low, self.flat = set(), [], (0.0, 0), 0, 0

    def __call__(self, step, reward, zero_std, trunc, max_tokens):
        """The messages not said before, for this step's mean reward and its zero-std and
        truncated fractions."""
        w, r = self.window, self.rewards
        r.append(reward)
        mean = sum(r[-w:]) / min(len(r), w)
        if len(r) >= (w + 1) // 2:  # 3 steps or more: one lucky step is not a best to fall from
            self.best = max(self.best, (mean, -step))
        if len(r) >= w:  # a fall is measured over full windows
            self.low = self.low + 1 if mean < self.best[0] / 2 else 0
        # a near-deterministic policy has a step of all-equal groups now and then; `w` in a row
        # means no signal
        self.flat = self.flat + 1 if zero_std == 1 and reward < 1 else 0
        news = {'std': self.flat >= w and f"grpo steps {step - w + 1}-{step}: every group has zero "
                "reward std, so there is no learning signal: check max_new_tokens, the reward and "
                "the prompt format (zero_std column)",
                'trunc': trunc == 1 and f"grpo step {step}: every completion hit "
                f"max_new_tokens={max_tokens}",
                'collapse': self.low >= w and self.best[0] >= 0.1 and f"GRPO is collapsing: the "
                f"reward, averaged over up to {w} steps, reached {self.best[0]:.2f} at step "
                f"{-self.best[1]} and has stayed below half of that for {self.low} steps "
                f"({mean:.2f} now). With fewer right answers there is less to learn from at every "
                "step, and it rarely recovers: stop it, and rerun with a lower --lr, more "
                "--batch_prompts, or a KL term (--beta)"}
        out = [msg for k, msg in news.items() if msg and k not in self.said]
        self.said |= {k for k, msg in news.items() if msg}
        return out

def eval_metrics(texts, problems, w, task, lengths, finished=None):
    """(sum, count) pairs (so ranks can add them up) for one width. Rows come in groups of w.
    finished: False for a row cut before its stop token, which scores 0 and gives no final answer
    (None: every row finished).
    acc: mean per-response accuracy; pass@w: >= 1 correct in the group;
    maj: the group's plurality answer is right;
    gpass@tau: >= ceil(tau * w) correct (G-Pass@w_tau, Liu et al. 2024, with n = k = w);
    agree: fraction of sibling pairs with the same final answer;
    fix: P(row correct | its own draft is wrong and the plurality of its siblings' drafts is
    right) - about 0 for independent rows, well above 0 if Bridge reads siblings (tasks whose
    answers carry a draft)."""
    done = [True] * len(texts) if finished is None else [bool(f) for f in finished]
    r = torch.tensor([task.reward(t, p) * f for t, p, f in zip(texts, problems, done)]).view(-1, w)
    G = r.size(0)
    grader = task.grader(problems[0]) if problems else None
    if grader is not None and not grader.binary:  # a continuous score has no pass@w or majority
        return {'score': (r.sum().item(), r.numel()), 'best': (r.max(1).values.sum().item(), G),
                'len': (float(lengths.sum()), r.numel())}
    finals = [task.final(t, p) if f else None for t, p, f in zip(texts, problems, done)]
    m = {'acc': (r.sum().item(), r.numel()), 'pass@w': ((r.sum(1) > 0).sum().item(), G),
         'len': (float(lengths.sum()), r.numel())}
    extra = ([grader.extra(t, p) if f else {} for t, p, f in zip(texts, problems, done)]
             if grader else [])
    for k in sorted({k for e in extra for k in e}):  # e.g. ZebraLogic's cell accuracy
        m[k] = (sum(e.get(k, 0.0) for e in extra), len(extra))
    for tau in (0.25, 0.5, 0.75, 1.0):
        m[f'gpass@{tau}'] = ((r.sum(1) >= math.ceil(tau * w)).sum().item(), G)
    maj, agree, pairs, fix, fix_n = 0, 0, 0, 0, 0
    for g in range(G):
        fs = finals[g * w:(g + 1) * w]
        top = Counter(f for f in fs if f is not None).most_common(1)
        maj += bool(top) and bool(r[g, fs.index(top[0][0])] > 0)  # a row giving it scored
        agree += sum(fs[i] is not None and fs[i] == fs[j]
                     for i in range(w) for j in range(i + 1, w))
        pairs += w * (w - 1) // 2
        if task.draft and w > 1:
            drafts = [task.draft(t)[0] for t in texts[g * w:(g + 1) * w]]
            gold = problems[g * w]['answer']
            for i in range(w):
                sib = Counter(d for j, d in enumerate(drafts)
                              if j != i and d is not None).most_common(1)
                if drafts[i] != gold and sib and sib[0][0] == gold:
                    fix, fix_n = fix + int(r[g, i] > 0), fix_n + 1
    return {**m, 'maj': (maj, G), 'agree': (agree, pairs),
            'fix': (fix, fix_n)}  # a count of 0: undefined
