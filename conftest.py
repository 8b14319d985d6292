"""
The test harness, shared by test_bridge.py: the device and dtype the suite runs on, the autocast
every test runs under, command lines run the way a user runs them (forked from a server that has
imported torch), the tiny settings of a training run, and the SFT checkpoint many tests start from.
"""
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bridge import BridgeConfig
from model import ModelConfig, Transformer

DEVICE, DTYPE = (os.environ.get('NANOBRIDGE_DEVICE', 'cpu'),
                 os.environ.get('NANOBRIDGE_DTYPE', 'float32'))
if DTYPE not in ('float32', 'bfloat16'):
    raise ValueError(f"NANOBRIDGE_DTYPE={DTYPE!r}: expected float32 or bfloat16")
DEV, BF16 = torch.device(DEVICE), DTYPE == 'bfloat16'
CPU = DEV.type == 'cpu'
cpu_only = lambda why: pytest.mark.skipif(not CPU, reason=f"CPU only: {why}")
needs_cuda = pytest.mark.skipif(DEV.type != 'cuda', reason='needs NANOBRIDGE_DEVICE=cuda')


def tol(fp32, bf16):
    """A bound per compute dtype. fp32: two correct implementations of the same math differ by ~1e-6
    relative, and the fp32 bounds are 10-100x that. bf16 autocast rounds every matmul input to 8
    mantissa bits (0.4% relative): the bf16 bounds are ~3x the largest difference measured with
    NANOBRIDGE_DTYPE=bfloat16 on CPU (see each test)."""
    return bf16 if BF16 else fp32


@pytest.fixture(autouse=True)
def compute_dtype(request):
    """Every test runs under the autocast train.py uses (fp32 weights, bf16 matmuls) when
    NANOBRIDGE_DTYPE=bfloat16, the transformers references included; a test of an fp32-only path
    sets the parameter None."""
    with torch.autocast(DEV.type, torch.bfloat16,
                        enabled=BF16 and getattr(request, 'param', True) is not None):
        yield


# A command line runs the way a user runs it: a fresh process executes the script as __main__ with
# its argv, in its directory, and we read its exit code, stdout and stderr. Most of such a process's
# time is importing torch (1.5 s), so by default it is forked from a server that has imported torch
# and nothing else (no project module, no thread pool started); the child then runs the script from
# its first line and ends like an interpreter does: an uncaught exception goes through
# sys.excepthook and exits 1, atexit handlers run. real=True (and torchrun) starts a new interpreter
# instead, start-up included.
CHILD = """import atexit, os, runpy, sys
argv, cwd, env, out, err = ARGS
os.chdir(cwd or '.')
os.environ.update(env)
os.dup2(os.open(out, os.O_WRONLY), 1), os.dup2(os.open(err, os.O_WRONLY), 2)
sys.argv = argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
code = 0
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
except SystemExit as e:
    code = 0 if e.code is None else e.code
    if not isinstance(code, int):  # sys.exit('message'): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
except BaseException:
    sys.excepthook(*sys.exc_info())
    code = 1
atexit._run_exitfuncs()
sys.stdout.flush(), sys.stderr.flush()
# the exit code, which forkserver may fail to relay (it says 255)
with open(out + '.code', 'w') as f:
    f.write(str(code))
os._exit(code)
"""
FORK = None


def run(kw, timeout):
    global FORK
    args, real = kw['args'], kw.get('real') or kw['args'][1] == '-m'
    if real:
        return subprocess.run(args, cwd=kw.get('cwd'), env={**os.environ, **kw.get('env', {})},
                              capture_output=True, text=True, timeout=timeout)
    if FORK is None:
        import multiprocessing
        FORK = multiprocessing.get_context('forkserver')
        FORK.set_forkserver_preload(['torch', 'numpy', 'tiktoken', 'safetensors.torch'])
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, 'out'), os.path.join(d, 'err')
        open(out, 'w').close(), open(err, 'w').close()
        p = FORK.Process(target=exec, args=(CHILD, {'ARGS': (args, kw.get('cwd') and str(kw['cwd']),
                                                             kw.get('env', {}), out, err)}))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            raise subprocess.TimeoutExpired(args, timeout)
        # the child's own record of its exit code: multiprocessing's forkserver reports 255 when it
        # loses a child's status, which happens now and then with two children at once
        code = int(open(out + '.code').read()) if os.path.exists(out + '.code') else p.exitcode
        return subprocess.CompletedProcess(args, code, open(out).read(), open(err).read())


def run_all(cmds, timeout=600, workers=2):
    """Run independent command lines concurrently, as many at once as the machine has cores (see
    CHILD)."""
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as ex:
        return list(ex.map(lambda kw: run(kw, timeout), cmds))


ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ['--log_interval=1', '--n_layer=2', '--n_embd=64', '--n_head=2', '--n_kv_head=1',
        '--ffn=128', '--bridge_dim=16', '--threads=1', '--digits=1', '--eval_problems=16',
        '--eval_samples=4', '--eval_widths=1,4', f'--device={DEVICE}', f'--dtype={DTYPE}']
# Two training runs that must end on the same weights (resume against the unbroken run) agree bit
# for bit on CPU. A CUDA backward need not be bit-deterministic (atomic adds in SDPA and index_add),
# so two runs may part from the first step: there the weights must agree within what 6 AdamW steps
# of lr 3e-4 can move them apart (up to ~3 lr a step). The CPU run is the exact check; on CUDA this
# one catches a resume that fails outright.
RESUME_ATOL = 0.0 if CPU else 6e-3
bitwise = cpu_only('compares two training runs bit for bit; a CUDA backward is not '
                   'bit-deterministic')
gloo = cpu_only('2 torchrun ranks on gloo; one GPU cannot host 2 NCCL ranks')


def random_bridge_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = Transformer(cfg, BridgeConfig(dim=16, n_head=2)).to(DEV)
    for b in m.bridge_modules():  # a "trained" Bridge: W_O no longer zero
        torch.nn.init.normal_(b.o_proj.weight, std=0.2)
    return m


def cmd(*args, torchrun=False, script='train.py', cwd=None, real=False):
    """`python train.py args` (or under torchrun with 2 ranks) as a user types it, for run_all."""
    return dict(args=([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                       '--nproc_per_node=2'] if torchrun else [sys.executable])
                     + [os.path.join(ROOT, script), *map(str, args)],
                cwd=cwd, env={'OMP_NUM_THREADS': '1'}, real=real)


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def train_py(*args, cwd, timeout=300, torchrun=False):
    return ok(run_all([cmd(*args, torchrun=torchrun, cwd=cwd)], timeout)[0])


def one_error_line(p, pattern):
    """A user's mistake ends the command with exactly one 'error: ...' line on stderr and no
    traceback."""
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stdout[-1000:] + p.stderr[-2000:]
    err = [l for l in p.stderr.splitlines() if l.startswith('error: ')]
    assert len(err) == 1 and re.search(pattern, err[0]), p.stderr[-2000:]
    return err[0]


@pytest.fixture(scope='module')
def sft_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('sft')
    # its own LR, so that a change of train.py's default does not move every test built on it
    train_py('--mode=sft', '--sft_steps=200', '--sft_target=2', '--sft_eval_every=50',
             '--sft_batch=128', '--sft_lr=3e-3', *TINY, cwd=d)
    return d / 'out' / 'ckpt'
