"""
The plan (plan.py) against measured runs on this CPU, side by side: an evaluation and a few GRPO
steps of a real checkpoint, each timed by train.py's own "done <stage> in" line, against
`--dry_run=True --plan_gpu=cpu` of the same command. The plan is given each run's measured mean
answer length (as the exponential mean whose capped mean it is): the lengths are what a plan
cannot know before the run; the rest is its cost model.
    python bench_plan.py --ckpt=DIR --data=DIR   # real-qwen.sh 0.5b's directory, gsm-jsonl.sh's
It prints, per stage, the planned and measured seconds and their ratio.
"""
import json
import math
import os
import re
import subprocess
import sys
import tempfile

from settings import UserError

ckpt = ''               # an HF checkpoint directory (shared/assets/real-qwen.sh)
data = ''               # train.jsonl and test.jsonl in GSM8K's layout (shared/assets/gsm-jsonl.sh)
threads = 2
new_tokens = 64         # the answer length cap of both runs
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

RUNS = {'eval': ['--mode=eval', '--eval_problems=16', '--eval_samples=4', '--eval_widths=1,4'],
        'grpo': ['--mode=grpo', '--grpo_steps=3', '--batch_prompts=2', '--width=4',
                 '--lr_warmup_iters=1']}

def train(args, out):
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'),
           f'--init_from={ckpt}', '--task=gsm8k', f'--data_train={data}/train.jsonl',
           f'--data_test=gsm={data}/test.jsonl', f'--max_new_tokens={new_tokens}',
           f'--threads={threads}', '--device=cpu', f'--out_dir={out}', *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        tail = (p.stdout + p.stderr)[-3000:]
        raise SystemExit(f"error: {' '.join(cmd[1:])} failed:\n{tail}")
    return p.stdout

def uncapped(capped, cap):
    """The exponential mean m whose mean capped at `cap`, m (1 - e^(-cap / m)), is `capped`."""
    lo, hi = 1e-3, 1e6
    for _ in range(100):  # bisection: the capped mean grows with m
        m = (lo + hi) / 2
        lo, hi = (m, hi) if m * -math.expm1(-cap / m) < capped else (lo, m)
    return m

if __name__ == '__main__':
    if not os.path.isfile(os.path.join(ckpt, 'config.json')):
        raise UserError(f"--ckpt={ckpt!r} holds no config.json")
    if not os.path.isfile(os.path.join(data, 'test.jsonl')):
        raise UserError(f"--data={data!r} holds no test.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        for stage, args in RUNS.items():
            out = train(args, os.path.join(tmp, stage))
            measured = float(re.search(rf'^done {stage} in ([\d.]+) s', out, re.M).group(1))
            if stage == 'eval':
                with open(os.path.join(tmp, stage, 'eval_init.json')) as f:
                    lengths = [json.load(f)['1']['len']]
            else:
                lengths = [float(v) for v in re.findall(r'grpo \d+/\d+: .*?len ([\d.]+)', out)]
            capped = sum(lengths) / len(lengths)
            plan = ['--dry_run=True', '--plan_gpu=cpu',
                    f'--plan_answer_tokens={round(uncapped(capped, new_tokens))}']
            p = train([*args, *plan], os.path.join(tmp, 'plan'))
            planned = re.search(rf'^plan {stage}: .*, ([\d.]+) (s|min|h) eager', p, re.M)
            seconds = float(planned.group(1)) * {'s': 1, 'min': 60, 'h': 3600}[planned.group(2)]
            device = re.search(r'^plan on (.*?): ', p, re.M).group(1)
            print(f"{stage}: planned {seconds:.1f} s, measured {measured:.1f} s (mean answer "
                  f"{capped:.1f} of {new_tokens} tokens): planned / measured = "
                  f"{seconds / measured:.2f} ({device})")
