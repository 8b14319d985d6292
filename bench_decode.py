"""
The plan's decode step (plan.py) against one model's measured decode steps: `rows` rows at two
context lengths, eager and compiled (CUDA graphs on a GPU), each beside the plan's figure for the
same step. gpu_check.sh runs it on the GPU: what it prints calibrates plan.GPUS (launch, replay)
and BANDWIDTH_SHARE.
    python bench_decode.py --ckpt=DIR          # any checkpoint directory (config.json + weights)
    python bench_decode.py --ckpt=DIR --device=cuda --rows=64 --contexts=1024,4096
Per mode and context: the measured and planned ms per step, their ratio, and the time per kernel
beyond the step's bytes and FLOPs, beside the plan's launch (eager) or replay (compiled) cost.
"""
import os
import time

import torch

import plan
from checkpoint import load_model
from fastpath import fuse
from settings import UserError

ckpt = ''               # a checkpoint directory
device = 'cpu'          # 'cpu' | 'cuda'
rows = 8                # rows decoded at once (the engine's slots x width)
contexts = '64,256'     # cached tokens attention reads, at two lengths
repeats = 20            # timed steps per figure, after 3 untimed (median)
modes = 'eager,compiled'
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

def timed(step, cache, C, dev):
    """Median seconds of one decode step reading the whole cache of C tokens (as compiled)."""
    x = torch.zeros(rows, 1, dtype=torch.long, device=dev)
    pos = torch.full((rows,), C - 1, device=dev)
    cache.kv_len = C
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    times = []
    for _ in range(3 + repeats):
        sync()
        t0 = time.perf_counter()
        step(x, width=1, cache=cache, pos=pos)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times[3:])[repeats // 2]

if __name__ == '__main__':
    if not os.path.isfile(os.path.join(ckpt, 'config.json')):
        raise UserError(f"--ckpt={ckpt!r} holds no config.json")
    dev = torch.device(device)
    bf16 = dev.type == 'cuda'  # a GPU decodes in bf16 (the inference copy), a CPU in fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = fuse(load_model(ckpt, device=dev, dtype=dtype, verbose=False))
    cfg, params = model.config, sum(p.numel() for p in model.parameters())
    target = plan.GPUS['h100'] if dev.type == 'cuda' else plan.measure_cpu()
    kernels = plan.ops_per_step(cfg, None)[0]
    m = plan.Model(cfg, params, params, False, False)
    # the step's bytes and FLOPs alone: a device that launches for free
    free = plan.Device('', 0, target.bandwidth, target.flops, 0, 0, target.overlap)
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else target.name
    print(f"{name}; {params:,} params, {rows} rows, {kernels:.0f} kernels per step; the plan's "
          f"constants: {target.name}")
    with torch.no_grad():
        for mode in modes.split(','):
            eager = mode == 'eager'
            for C in [int(c) for c in contexts.split(',')]:
                cache = model.make_cache(rows, C)
                step = model
                if not eager:  # as engine.sample compiles it
                    torch._dynamo.mark_static_address(cache.k)
                    torch._dynamo.mark_static_address(cache.v)
                    graphs = 'reduce-overhead' if dev.type == 'cuda' else None
                    step = torch.compile(model, dynamic=False, mode=graphs)
                t = timed(step, cache, C, dev)
                planned = m.decode(target, rows, C, (kernels, 0), eager, bf16)  # the model's step
                per_kernel = max(t - m.decode(free, rows, C, (0, 0), eager, bf16), 0) / kernels
                const = target.launch if eager else target.replay
                print(f"decode {mode} context {C:,}: measured {1e3 * t:.2f} ms, planned "
                      f"{1e3 * planned:.2f} ms (planned / measured {planned / t:.2f}); beyond the "
                      f"bytes and FLOPs {1e6 * per_kernel:.2f} us per kernel (plan: "
                      f"{1e6 * const:.2f})")
