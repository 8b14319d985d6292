"""
Draw the paper's figures from result files: train.py's out_dir/eval_*.json and out_dir/log.jsonl.
One PNG per command; matplotlib is needed here only (pip install matplotlib).

    # accuracy, pass@w and majority vote against width (Fig. 5), one line per arm
    python plot.py --kind=width --seeds=1-5 \\
        --runs='bridge=runs/b-{seed}/eval_grpo.json,rlvr=runs/r-{seed}/eval_grpo.json'
    # G-Pass@w_tau against tau at one width, on one test set instead of the average over sets
    python plot.py --kind=gpass --width=8 --set=gsm8k --runs='bridge=out/eval_grpo.json'
    # per layer: the Bridge output's norm over the residual stream's (Fig. 7), and the sibling share
    python plot.py --kind=probe --runs='sft=out/eval_sft.json,grpo=out/eval_grpo.json'
    # training curves of a stage, several runs overlaid
    python plot.py --kind=curves --stage=grpo --runs='a=out1/log.jsonl,b=out2/log.jsonl'

A {seed} in a path makes its arm one file per seed of --seeds: the figure draws their mean and
their 95% t-interval as a band (compare.py's interval: Student's t from a table for 1-30 degrees
of freedom, 1.96 beyond). A path without {seed} is one run, drawn without a band. The title names
the protocol read from the results' cards, which must agree (as in compare.py); --out= sets the
PNG's path.
"""
import json
import os
import sys
import textwrap

from checkpoint import atomic_write
from compare import check_cards, int_list, interval, load
from settings import UserError

KINDS = ('width', 'gpass', 'probe', 'curves')
TAUS = (0.25, 0.5, 0.75, 1.0)
# the log.jsonl columns drawn by default for each stage (--metrics= picks others)
CURVES = {'grpo': 'reward,acc,entropy,kl,len,zero_std', 'sft': 'loss,gnorm', 'warmup': 'loss,gnorm'}

def parse_runs(spec):
    """'name=PATH,name=PATH' -> {name: PATH}, in the order given (the legend's order)."""
    pairs = [part.split('=', 1) for part in spec.split(',') if part.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise UserError(f"runs={spec!r}: expected name=PATH,name=PATH,... e.g. "
                        "'bridge=runs/b-{seed}/eval_grpo.json,rlvr=runs/r-{seed}/eval_grpo.json'")
    named = {name.strip(): path.strip() for name, path in pairs}
    if len(named) < len(pairs):
        raise UserError(f"runs={spec!r}: each run needs its own name")
    return named

def expand(pattern, seeds):
    """The files of one arm: one per seed when the path has {seed}, else the path itself."""
    return [pattern.replace('{seed}', str(s)) for s in seeds] if '{seed}' in pattern else [pattern]

def read_log(name, path):
    """The records of a log.jsonl, one per logged step."""
    try:
        with open(path) as f:
            text = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{name}={path}: no such log file") from None
    records = []
    for i, line in enumerate(text, 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            raise UserError(f"{name}={path}: line {i} is not JSON (not a log.jsonl?)") from None
    return records

def number(d, key, where):
    """d[key] when it is a number, else a one-line error saying which file lacks what."""
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where}: no {key!r}" + (f" (it has {', '.join(d)})" if d else ''))
    return v

def table(where, r, test_set):
    """{width: {metric: value}} of one eval result: one test set, or the average over sets (avg)."""
    if test_set == 'avg':  # the average sits beside 'sets' under the widths' own keys
        return {int(k): v for k, v in r.items() if k.isdigit()}
    if test_set not in r['sets']:
        raise UserError(f"{where}: no test set {test_set!r} "
                        f"(it has {', '.join(r['sets'])}, or avg)")
    return {int(k): v for k, v in r['sets'][test_set].items()}

# One function per kind turns a file into points, {x: {panel: y}}; combine() and figure() draw.
def width_points(where, r, test_set, panels):
    return {w: {k: number(m, k, f"{where} at width {w}") for k in panels}
            for w, m in table(where, r, test_set).items()}

def gpass_points(where, r, test_set, width):
    by_width = table(where, r, test_set)
    if width not in by_width:
        raise UserError(f"{where}: no width {width} (it has {', '.join(map(str, by_width))})")
    return {tau: {'gpass': number(by_width[width], f'gpass@{tau}', f"{where} at width {width}")}
            for tau in TAUS}

def probe_points(where, r, panels):
    if not all(r.get(k) for k in panels):  # evaluate() probes Bridge blocks that read siblings only
        raise UserError(f"{where}: the run had no probe (no {' or '.join(panels)}): it ran "
                        "with --probe=False (evaluate it with --probe_problems=N), or its rows "
                        "do not read each other (no Bridge, self-only, P-Match)")
    return {int(layer): {k: number(r[k], layer, f"{where} {k}") for k in panels}
            for layer in r[panels[0]]}

def curve_points(where, records, stage, panels):
    steps = [rec for rec in records if rec.get('stage') == stage]
    if not steps:
        logged = dict.fromkeys(str(rec.get('stage')) for rec in records)  # distinct, in order
        raise UserError(f"{where}: no {stage} steps (it logs {', '.join(logged) or 'nothing'})")
    # a resumed run appends to its log: a step logged twice keeps its last record
    return {rec['step']: {k: number(rec, k, f"{where} {stage} step {rec['step']}") for k in panels}
            for rec in steps}

def combine(name, points):
    """One arm's points, one {x: {panel: y}} per file -> (the xs every file has,
    {panel: [ys per file]}). A run still training has logged fewer steps than the others: the
    seeds are compared where all of them are."""
    xs = sorted(set.intersection(*(set(p) for p in points)))
    if not xs:
        raise UserError(f"{name}: its files share no point to average (different steps or widths)")
    return xs, {k: [[p[x][k] for x in xs] for p in points] for k in points[0][xs[0]]}

def span(xs):
    """[1, 2, 3, 5] -> '1-3,5': seeds the way --seeds= takes them."""
    out, xs = [], sorted(xs)
    for x in xs:
        if out and isinstance(x, int) and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ','.join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)

def protocol(files, what):
    """The title: what every eval result's card says about the model, the sampling and the seeds."""
    cards = [r['card'] for fs in files.values() for _, r in fs]
    one = lambda key: ' / '.join(dict.fromkeys(str(c.get(key)) for c in cards))  # distinct values
    seeds = {c.get('seed') for c in cards}
    return (f"{one('model')} · {one('samples_per_problem')} samples per problem at widths "
            f"{one('widths')} · seed{'s' if len(seeds) > 1 else ''} {span(seeds)} · {what}")

def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no window), or one line saying how to get
    it."""
    try:
        import matplotlib
    except ImportError:
        print("error: plot.py draws with matplotlib, which is not installed: "
              "pip install matplotlib", file=sys.stderr)
        sys.exit(1)
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt

def draw(ax, xs, ys, label):
    """One arm on one panel: the mean over its files as a line and, with several files (seeds),
    their 95% t-interval as a band of the line's colour."""
    stats = [interval(list(col)) for col in zip(*ys)]
    line, = ax.plot(xs, [m for m, _ in stats], label=label, marker='o' if len(xs) <= 32 else None)
    if len(ys) > 1:
        ax.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats],
                        color=line.get_color(), alpha=0.2, linewidth=0)

def figure(plt, arms, panels, xlabel, title, out, log2=False, ticks=False):
    """arms: {name: combine()'s (xs, {panel: ys})}; panels: {panel: its y label}, three to a row.
    log2: a log2 x axis; ticks: a tick at each x (widths, tau, layers) when there are few."""
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    inches = max(4.8 * cols, 7)  # room for the protocol's title above a single panel
    fig, axes = plt.subplots(rows, cols, figsize=(inches, 3.8 * rows), squeeze=False)
    xs_all = sorted({x for xs, _ in arms.values() for x in xs})
    for ax, (key, ylabel) in zip(axes.flat, panels.items()):
        for name, (xs, ys) in arms.items():
            n = len(ys[key])
            draw(ax, xs, ys[key], f"{name} (mean of {n} seeds, 95% t-interval)" if n > 1 else name)
        if log2:  # widths double: 1, 2, 4, 8, 16 evenly spaced
            ax.set_xscale('log', base=2)
            ax.minorticks_off()
        if ticks and len(xs_all) <= 16:
            ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize='small')
    fig.suptitle(textwrap.fill(title, int(11 * inches)), fontsize='medium')
    fig.tight_layout()
    # a crash or a reader never sees half a PNG under the real name
    atomic_write(out, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    plt.close(fig)

if __name__ == '__main__':
    kind = 'width'      # width, gpass, probe or curves
    runs = ''           # name=PATH,...: eval_*.json (log.jsonl for curves); {seed}: one per seed
    seeds = '1-5'       # the seeds a {seed} in a path stands for: '1-5' or '1,2,3'
    test_set = 'avg'    # width, gpass: a test set's name, or avg (the unweighted mean over sets)
    width = 4           # gpass: the w of G-Pass@w_tau
    stage = 'grpo'      # curves: the stage whose steps to draw (sft, warmup or grpo)
    metrics = ''        # curves: log.jsonl columns, comma-separated ('' = the stage's usual ones)
    out = ''            # the PNG to write ('' = plot_{kind}.png)
    # --set= is short for --test_set=: a global named set would hide the builtin that
    # configurator.py (and this file) call
    sys.argv = [('--test_set=' + a[6:]) if a.startswith('--set=') else a for a in sys.argv]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if kind not in KINDS:
        raise UserError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    named = parse_runs(runs)
    seed_list = int_list(seeds, 'seeds', "'1-5' or '1,2,3'") if '{seed}' in runs else []
    read = read_log if kind == 'curves' else load
    files = {n: [(f"{n}={p}", read(n, p)) for p in expand(pattern, seed_list)]
             for n, pattern in named.items()}
    if kind != 'curves':  # a figure compares arms evaluated alike, as compare.py's tables do
        check_cards({where: r for fs in files.values() for where, r in fs})
    scope = f"test set {test_set}"
    if kind == 'width':
        panels = {'acc': 'accuracy (mean over answers)', 'pass@w': 'pass@w (any answer right)',
                  'maj': 'majority vote right'}
        points = lambda at, r: width_points(at, r, test_set, panels)
        xlabel, title = 'width w (answers generated together)', protocol(files, scope)
    elif kind == 'gpass':
        panels = {'gpass': f'G-Pass@{width}' + r'$_\tau$'}
        points = lambda at, r: gpass_points(at, r, test_set, width)
        xlabel = r'$\tau$ (at least $\lceil \tau w \rceil$ of the w answers right)'
        title = protocol(files, f"{scope} · width {width}")
    elif kind == 'probe':
        panels = {'bridge_norm_ratio': r'$\Vert$Bridge output$\Vert$ / $\Vert$residual$\Vert$',
                  'bridge_sibling_share': "Bridge attention's share on siblings"}
        points = lambda at, r: probe_points(at, r, list(panels))
        probed = sorted({str(r.get('probe_width')) for fs in files.values() for _, r in fs})
        xlabel, title = 'layer', protocol(files, f"probed at width {' / '.join(probed)}")
    else:
        cols = (metrics or CURVES.get(stage, 'loss')).split(',')
        panels = {k: k for k in cols}
        points = lambda at, recs: curve_points(at, recs, stage, cols)
        xlabel = f'{stage} step'
        title = f"training curves · stage {stage}" + (f" · seeds {span(seed_list)}"
                                                       if seed_list else '')
    arms = {n: combine(n, [points(at, r) for at, r in fs]) for n, fs in files.items()}
    out = out or f'plot_{kind}.png'
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    figure(pyplot(), arms, panels, xlabel, title, out, log2=kind == 'width', ticks=kind != 'curves')
    print(f"wrote {out}")
