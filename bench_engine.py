"""
The sampling engine against the way evaluation sampled before it, side by side (repeats
interleaved): the same model, problems and stop lengths. Each row's stop is drawn i.i.d. uniform on
[1, new_tokens] by a stop rule of the bench's own (an environment writes the stop token at step s
with probability 1 / (new_tokens - s)), so only the layout differs: sample.generate in lock-step
calls of `rows` rows, each decoding until its slowest row stops, against engine.sample with
rows / w slots, each refilled when its group has stopped.
    python bench_engine.py        # the embedded model's shape, widths 1 and 4, ~45 s on 2 cores
It prints, per width, both wall times, their ratio, and the ratio the row-step shares predict.
"""
import os
import statistics
import time

import torch

import engine
import train as T  # train.py's default config: the embedded model's shape
from distributed import free_cores
from fastpath import fuse
from model import ModelConfig, Transformer
from sample import generate
from settings import UserError

widths = '1,4'          # sampling widths
problems = 64           # problems, each sampled `samples` times (evaluation's eval_samples)
samples = 16
new_tokens = 64         # the stop rule's range: lengths uniform on [1, new_tokens]
rows = 64               # rows one call (or the engine's slots) holds
repeats = 3             # interleaved timed repeats after one warm-up (median)
n_layer, n_embd, n_head, n_kv_head, ffn = T.n_layer, T.n_embd, T.n_head, T.n_kv_head, T.ffn
threads = 0             # 0 = the free cores
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

def stop_rule(steps, tokens, pos, u):  # stop token 0 at hazard 1 / (n - s): uniform on [1, n]
    return torch.where(u < 1 / (new_tokens - steps).clamp(min=1), 0, 1)

def lock_step(model, prompts, w):
    """Calls of `rows` rows, each until its slowest row stops. -> (kept, row-steps)."""
    per, kept, spent = max(1, rows // w), 0, 0
    for k in range(0, len(prompts), per):
        g = generate(model, prompts[k:k + per], w, new_tokens, stop_ids=[0], seed=k, env=stop_rule)
        kept, spent = kept + int(g.lengths.sum()), spent + g.lengths.numel() * int(g.lengths.max())
    return kept, spent

def slots(model, prompts, w):
    keys = [engine.key(i) for i in range(len(prompts) * w)]
    g = engine.sample(model, prompts, keys, w, new_tokens, stop_ids=[0], slots=max(1, rows // w),
                      env=stop_rule)
    return g.stats.kept_row_steps, g.stats.slot_steps * w  # every slot's row-steps, busy or not

if __name__ == '__main__':
    if not all(v.strip().isdigit() and int(v) >= 1 for v in widths.split(',')):
        raise UserError(f"widths={widths!r}: expected integers >= 1, comma-separated, e.g. '1,4'")
    torch.set_num_threads(threads or free_cores())
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=260, hidden_size=n_embd, intermediate_size=ffn,
                      num_hidden_layers=n_layer, num_attention_heads=n_head,
                      num_key_value_heads=n_kv_head, max_position_embeddings=256)
    model = fuse(Transformer(cfg))
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
                if l.startswith('model name')), '?')
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; {problems} "
          f"problems x {samples} rows, lengths uniform on [1, {new_tokens}], {rows} rows per call "
          "or in slots")
    for w in [int(v) for v in widths.split(',')]:
        prompts = [[1, 2, 3, 4, 5, 6]] * (problems * samples // w)
        times, shares = {'lock-step': [], 'engine': []}, {}
        for rep in range(repeats + 1):  # the first round warms up; then the sides alternate
            for side, fn in (('lock-step', lock_step), ('engine', slots)):
                t0 = time.perf_counter()
                kept, spent = fn(model, prompts, w)
                if rep:
                    times[side].append(time.perf_counter() - t0)
                shares[side] = kept / spent
        a, b = statistics.median(times['lock-step']), statistics.median(times['engine'])
        predict = shares['engine'] / shares['lock-step']
        print(f"width {w}: lock-step {a:.2f} s (kept row-steps {shares['lock-step']:.3f}), engine "
              f"{b:.2f} s (kept {shares['engine']:.3f}; lock-step bound (w+1)/2w = "
              f"{(w + 1) / (2 * w):.3f}): {a / b:.2f}x shorter, the shares predict {predict:.2f}x")
