"""
Compare evaluation results (train.py's out_dir/eval_*.json) the way the paper does, or arm against
arm over seeds.

The paper's table (docs/paper.md §4.3-4.4): each test set, Avg (the unweighted mean over sets) and
the gain over the base model, Delta = Avg(method) - Avg(base), and Bridge's relative gain
(Delta_Bridge - Delta_next best) / Delta_next best, where the next best is the best other trained
method; undefined when that Delta is <= 0. The results must share their protocol card (data hashes,
sampling, widths, parser...); different commits are allowed, and listed.
    python compare.py base=out-base/eval_init.json rlvr=out-rlvr/eval_grpo.json \\
        pmatch=out-pmatch/eval_grpo.json bridge=out/eval_grpo.json
        # every width; --width=4 for one; --metric=acc
Arms paired by seed: a {seed} in each path; the mean of each arm, and of the first arm minus each
other one, with a 95% t-interval over seeds.
    python compare.py --paired=True bridge='runs/bridge-{seed}/eval_grpo.json' \\
        rlvr='runs/rlvr-{seed}/eval_grpo.json' \\
        --seeds=1-5 --widths=1,4,8
The transfer sets (config/r1_transfer.py) are never in the Avg: in an evaluation file beside the
math sets, or in a file of their own per arm, given with --transfer, they get a table of their own,
set by set.
    python compare.py base=... bridge=... \\
        --transfer='base=out-base-transfer/eval_init.json,bridge=...'
"""
import json
import math
import os
import sys

from results import PROTOCOL
from settings import UserError

# two-sided 95% critical values of Student's t for 1..30 degrees of freedom (no scipy at run time)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

def load(name, path):
    try:
        with open(path) as f:
            r = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{name}={path}: no such result file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{name}={path}: not a JSON result file ({e})") from None
    if 'sets' not in r or 'card' not in r:
        raise UserError(f"{name}={path}: no 'sets' and 'card' (written by an older train.py?)")
    return r

def protocol(c):
    """The part of a card that changes a metric other than the model (a data file's name and place
    do not)."""
    return {k: ({n: {f: v for f, v in d.items() if f != 'file'} for n, d in c[k].items()}
                if k == 'data' and c.get(k) else c.get(k)) for k in PROTOCOL}

def check_cards(runs):
    ref_name, ref = next(iter(runs.items()))
    for name, r in runs.items():
        diff = [k for k, v in protocol(r['card']).items() if v != protocol(ref['card'])[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{name} and {ref_name} were evaluated under different protocols: "
                            f"{k} is {protocol(r['card'])[k]!r} against "
                            f"{protocol(ref['card'])[k]!r} (also differ: "
                            f"{', '.join(diff[1:]) or 'nothing else'}); "
                            "rerun the evaluation with the same settings")
    commits = {name: r['card'].get('commit') for name, r in runs.items()}
    if len(set(commits.values())) > 1:
        print("commits differ: " + ", ".join(f"{n} {c}" for n, c in commits.items()))

def gain_table(runs, widths, metric):
    """The paper's table at each width: per set, Avg and Delta over `base`, then Bridge's relative
    gain."""
    check_cards(runs)
    sets = math_sets(runs['base'])
    for name, r in runs.items():
        if math_sets(r) != sets:
            raise UserError(f"{name} has test sets {math_sets(r)}, base has {sets}")
    out = []
    for w in widths or sorted(int(k) for k in runs['base']['sets'][sets[0]]):
        val = {n: {s: 100 * r['sets'][s][str(w)][metric] for s in sets} for n, r in runs.items()}
        avg = {n: sum(v.values()) / len(v) for n, v in val.items()}
        delta = {n: avg[n] - avg['base'] for n in runs}
        out.append(f"\n{metric} (%) at width {w}\n| method | " + " | ".join(sets)
                   + " | Avg | Delta |\n|---|" + "---|" * (len(sets) + 2))
        out += [f"| {n} | " + " | ".join(f"{val[n][s]:.2f}" for s in sets)
                + f" | {avg[n]:.2f} | {delta[n]:+.2f} |"
                for n in runs]
        others = {n: d for n, d in delta.items() if n not in ('base', 'bridge')}
        if 'bridge' in runs and others:
            nb = max(others, key=others.get)
            out.append(f"relative gain of bridge over the next best ({nb}): " + (
                f"({delta['bridge']:.2f} - {others[nb]:.2f}) / {others[nb]:.2f} = "
                f"{100 * (delta['bridge'] - others[nb]) / others[nb]:.0f}%" if others[nb] > 0 else
                f"undefined: the next best gains {others[nb]:+.2f} <= 0 over base"))
    return '\n'.join(out)

def math_sets(r):  # the sets of the Avg: a transfer set is reported alone
    return [s for s in r['sets'] if s not in r.get('transfer', [])]

def transfer_table(runs, widths):
    """Each transfer set alone, per arm: its accuracy, or a ROUGE set's mean and best-of-group
    score, and ZebraLogic's cell accuracy."""
    check_cards(runs)
    first = next(iter(runs.values()))
    sets = first.get('transfer', [])
    for name, r in runs.items():
        if r.get('transfer', []) != sets or not sets:
            raise UserError(f"{name} has transfer sets {r.get('transfer', [])}, "
                            f"expected {sets or 'some'}")
    out = []
    for w in widths or sorted(int(k) for k in first['sets'][sets[0]]):
        cols = [(s, k) for s in sets for k in ('acc', 'cell', 'score', 'best')
                if k in first['sets'][s][str(w)]]
        out.append(f"\ntransfer sets (%) at width {w}, not in the Avg\n| method | "
                   + " | ".join(f"{s} {k}" for s, k in cols) + " |\n|---|" + "---|" * len(cols))
        out += [f"| {n} | " + " | ".join(f"{100 * r['sets'][s][str(w)][k]:.2f}" for s, k in cols)
                + " |" for n, r in runs.items()]
    return '\n'.join(out)

def interval(xs):
    """(mean, half-width of the 95% t-interval) over seeds."""
    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return m, float('nan')
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, (T95[n - 2] if n - 1 <= len(T95) else 1.96) * sd / math.sqrt(n)

def paired_table(patterns, seeds, widths, metric):
    runs = {(n, s): load(n, p.replace('{seed}', str(s)))
            for n, p in patterns.items() for s in seeds}
    # the seed is not part of the protocol
    check_cards({f"{n} (seed {s})": r for (n, s), r in runs.items()})
    names, first = list(patterns), next(iter(patterns))
    out = [f"{metric}, per seed, at widths {', '.join(map(str, widths))}\n| seed | "
           + " | ".join(f"{n} w={w}" for w in widths for n in names)
           + " |\n|---|" + "---|" * (len(widths) * len(names))]
    val = {(n, s, w): runs[n, s][str(w)][metric] for n in names for s in seeds for w in widths}
    out += [f"| {s} | " + " | ".join(f"{val[n, s, w]:.3f}" for w in widths for n in names) + " |"
            for s in seeds]
    out.append(f"\nmean and 95% t-interval over {len(seeds)} seeds\n| arm | "
               + " | ".join(f"w={w}" for w in widths) + " |\n|---|" + "---|" * len(widths))
    for n in names:
        out.append(f"| {n} | " + " | ".join(
            "{:.3f} ± {:.3f}".format(*interval([val[n, s, w] for s in seeds]))
            for w in widths) + " |")
    for n in names[1:]:
        out.append(f"| {first} - {n} | " + " | ".join("{:+.3f} ± {:.3f}".format(*interval(
            [val[first, s, w] - val[n, s, w] for s in seeds])) for w in widths) + " |")
    return '\n'.join(out)

def int_list(spec, name, example):
    try:
        xs = [s for part in str(spec).split(',')
              for s in (range(int(part.split('-')[0]), int(part.split('-')[1]) + 1)
                        if '-' in part else [int(part)])]
    except (ValueError, IndexError):
        xs = []
    if not xs:
        raise UserError(f"{name}={spec!r}: expected e.g. {example}")
    return xs

if __name__ == '__main__':
    arms = [a for a in sys.argv[1:] if '=' in a and not a.startswith('--')]
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a not in arms]
    width = 0           # one width, or 0 = every width (the paper's table)
    widths = '1,4,8'    # --paired: the widths to show
    metric = 'acc'      # any column of the evaluation table
    paired = False      # compare arms paired by seed instead of the paper's table
    seeds = '1-5'       # --paired: the seeds
    transfer = ''       # 'name=PATH,name=PATH': each arm's transfer evaluation, a table set by set
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    named = dict(a.split('=', 1) for a in arms)
    if len(named) < len(arms):
        raise UserError("each name=PATH needs its own name: "
                        f"{sorted(a.split('=', 1)[0] for a in arms)}")
    if paired:
        if not named or any('{seed}' not in p for p in named.values()):
            raise UserError("--paired=True needs arms as name=PATH with {seed} in each PATH")
        args = (named, int_list(seeds, 'seeds', "'1-5' or '1,2,3'"),
                int_list(widths, 'widths', "'1,4,8'"), metric)
    elif 'base' not in named or len(named) < 2:
        raise UserError("expected base=PATH and at least one more name=PATH "
                        "(e.g. rlvr=, pmatch=, bridge=)")
    else:
        args = {n: load(n, p) for n, p in named.items()}, [width] if width else None, metric
    extra = dict(a.split('=', 1) for a in transfer.split(',') if '=' in a)
    try:
        print((paired_table if paired else gain_table)(*args))
        if extra or any(r.get('transfer') for r in (args[0].values() if not paired else [])):
            tr = {n: load(n, p) for n, p in extra.items()} if extra else args[0]
            print(transfer_table(tr, [width] if width else None))
    except KeyError as e:  # a metric or width that a result does not have
        raise UserError(f"metric={metric!r} at the widths asked: "
                        f"{e} is missing from a result") from None
