"""
Tasks: a task is an object with its problems (a train split and named test sets), how a prompt is
written, how an answer is read and rewarded, and for the positive control the environment that
writes some tokens itself. train.py asks `make_task(...)` for one and never branches on a task's
name. A problem is a dict: prompt (text), answer (the gold final answer) and response (a reference
answer for SFT).

  add       the embedded default: 'ab+cd=' -> 'SSS;SSS', a draft sum then the final sum (sum3,
            mul: harder kin)
  maxdigit  the positive control: the answer is the largest digit of the group, which only
            siblings can tell
  math      JSONL files of math problems (GSM8K, MATH, or problem/answer layouts), rewarded by
            grading.py; a test set may name another grader (transfer.py, rouge.py): its own
            prompt format and reward
"""
import itertools
import json
import math
import os
import random
from functools import cached_property

import torch

from checkpoint import atomic_write
from grading import extract_answer, gold_answer, math_reward
from rouge import Summary
from settings import UserError
from transfer import GRADERS as TRANSFER

# a test set's grader beside math (--data_test=name=path:grader): its prompt format and its reward
GRADERS = {**TRANSFER, 'xsum': Summary('xsum'), 'cnn': Summary('cnn')}

class Task:
    name, parser, files = '', '', ()
    # text -> (draft, final) where answers carry a draft before their final
    # (the fix rate reads them)
    draft = None

    # train_set: the training problems; test_sets: {set name: problems}, each evaluated in full
    # unless eval_problems limits it. Both are read whole once (cached properties), so train.py
    # checks every line before the first step.
    train_set = test_sets = None

    transfer = frozenset()  # test sets outside the Avg (transfer benchmarks, each reported alone)

    def encode(self, tok, problem):  # a problem's prompt as token ids
        return tok.encode(problem['prompt'])

    def grader(self, problem):  # a test set's own grader (transfer.py), or None: the task's
        return None

    def final(self, text, problem=None):  # the final answer a completion gives (None: none)
        raise NotImplementedError

    def correct(self, final, problem):
        return final is not None and final == problem['answer']

    def reward(self, text, problem):  # the verifiable reward: 1 for a correct final answer, else 0
        return 1.0 if self.correct(self.final(text), problem) else 0.0

    def env(self, tok):  # the sampler's env hook (sample.generate, engine.sample), or None
        return None

    # each sampled row's problem (maxdigit: the gold depends on the group)
    def rows(self, problems, texts, w):
        return problems

    # the best a row that cannot read its siblings can score, where the task knows it
    def chance(self, w):
        return None

def final_answer(text):
    """'draft;final' -> (draft, final); either may be None."""
    draft, _, final = text.partition(';')
    return draft.strip() or None, (final.strip() or None) if _ else None

class Arithmetic(Task):
    """The embedded tasks in the 'draft;final' format: 'ab+cd=' -> 'SSS;SSS', a draft result then
    the final result, zero-padded so that every row of a group writes its final digits at the same
    timesteps, where Bridge can compare them. Reward is on the final only, so a row whose draft is
    wrong can still be saved by reading its siblings.
      add   ab+cd=      (the default; digits = operand digits)
      sum3  ab+cd+ef=   three operands
      mul   ab*c=       a digits-digit number times one digit
    The held-out split is a fixed hash of the operands, so train and test never overlap at any
    difficulty; the first 256 held-out problems are the test set."""
    parser, draft = "the final after ';', exact match", staticmethod(final_answer)
    KINDS = {'add': ('+', 2), 'sum3': ('+', 3), 'mul': ('*', 2)}

    def __init__(self, kind='add', digits=2, n_test=256):
        if digits < 1:
            raise UserError(f"digits={digits} must be >= 1")
        self.name, self.digits, self.n_test = kind, digits, n_test
        self.op, n = self.KINDS[kind]
        self.sizes = [10 ** digits] * n if kind != 'mul' else [10 ** digits, 10]

    def split(self, split):
        if math.prod(self.sizes) <= 200_000:
            tuples = itertools.product(*map(range, self.sizes))
        else:
            rng = random.Random(0)
            tuples = [tuple(rng.randrange(n) for n in self.sizes) for _ in range(200_000)]
        out = []
        for t in tuples:
            if ((sum(x * p for x, p in zip(t, (7919, 104729, 1299709))) % 16 == 0)
                    == (split == 'test')):
                s = f"{sum(t) if self.op == '+' else math.prod(t):0{self.digits + 1}d}"
                prompt = self.op.join(f"{x:0{len(str(n - 1))}d}"
                                      for x, n in zip(t, self.sizes)) + '='
                out.append({'prompt': prompt, 'answer': s, 'response': f"{s};{s}"})
        if split == 'test':
            random.Random(1).shuffle(out)
            out = out[:512]
        return out

    @cached_property
    def train_set(self):
        return self.split('train')

    @cached_property
    def test_sets(self):
        return {self.name: self.split('test')[:self.n_test]}

    def final(self, text, problem=None):
        return final_answer(text)[1]

def skewed_digits(u, k=10):
    """Symbols floor(k u^4) of uniforms u ~ U(0, 1): the largest of 4 is uniform over 0..k-1, so at
    width 4 no answer is likelier than another, and a row that sees only its own symbol can do no
    better than answer it."""
    return (k * u ** 4).long().clamp(max=k - 1)

def max_chance(w, k=10):
    """The Bayes limit of a row that sees only its own symbol s (skewed_digits) when the answer is
    the largest of its w rows: sum_s P(s) max_m P(max = m | s). 1 at w=1, 0.347 at w=4 (k=10), where
    the best guess is s itself."""
    F = lambda j: ((j + 1) / k) ** 0.25 if j >= 0 else 0.0  # P(symbol <= j)
    return sum((F(s) - F(s - 1)) * max(F(m) ** (w - 1) - (F(m - 1) ** (w - 1) if m > s else 0)
                                       for m in range(s, k))
               for s in range(k))

class MaxDigit(Arithmetic):
    """The positive control: every prompt is 'max?', the environment writes 'd;' (d from
    skewed_digits) and the stop token, the policy writes only F, and the reward asks for F = the
    largest d of the group, which only siblings can tell. The SFT responses are self-only: F is d
    half the time, else a random digit, so GRPO starts from a policy that never reads siblings but
    still explores (after SFT on 'd;d' alone, F was nearly deterministic and sibling reading took
    off in 1 seed of 3)."""
    name, parser = 'maxdigit', "the final after ';' against the group's largest digit"

    def __init__(self, n_train=4096, n_test=256):
        self.n_train, self.n_test = n_train, n_test

    def split(self, split):
        n = self.n_train if split == 'train' else self.n_test
        g = torch.Generator().manual_seed(int(split == 'test'))
        d, r = skewed_digits(torch.rand(n, generator=g)), torch.randint(10, (n,), generator=g)
        f = torch.where(torch.rand(n, generator=g) < 0.5, r, d)
        return [{'prompt': 'max?', 'answer': None, 'response': f"{x};{y}"}
                for x, y in zip(d.tolist(), f.tolist())]

    def env(self, tok):
        """The environment writes 'd;' and the stop token, the policy only F. Its digit comes from
        the uniform the sampler keys on the row and its position (a draw of the environment's, not
        the policy's)."""
        digits, semi = torch.tensor(tok.encode('0123456789')), tok.encode(';')[0]
        def env(steps, tokens, pos, u):
            # a digit not chosen
            out = torch.where(steps == 0, digits.to(pos.device)[skewed_digits(u)], -1)
            out = torch.where(steps == 1, semi, out)
            return torch.where(steps == 3, tok.eos_id, out)
        return env

    def rows(self, problems, texts, w):
        """The gold answer of every row: the largest digit the environment wrote (each text's first
        character) in its group."""
        gold = [max(t[:1] for t in texts[i - i % w:i - i % w + w]) for i in range(len(texts))]
        return [{**p, 'answer': a} for p, a in zip(problems, gold)]

    def chance(self, w):
        return max_chance(w)

# -----------------------------------------------------------------------------
# math problems from JSONL files

LAYOUTS = {  # (prompt key, answer key) -> how the gold answer is read from the answer field
    ('question', 'answer'): 'gsm8k',   # '... #### 72'
    ('problem', 'answer'): 'plain',    # MATH-500, AIME, AMC: the final answer itself
    ('problem', 'solution'): 'boxed',  # MATH: a worked solution ending in \boxed{}
    ('prompt', 'answer'): 'plain',
}

def json_lines(path, expected):
    """(line number, object) for every non-blank line of a JSONL file; a line that is not a JSON
    object is an error naming the file, the line and what was `expected` there."""
    with open(path, encoding='utf-8') as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: expected {expected} (JSONDecodeError: {e})") from None
            if not isinstance(d, dict):
                raise UserError(f"{path}:{i}: expected {expected} "
                                f"(a {type(d).__name__}, not an object)")
            yield i, d

def read_jsonl(path, keys=None):
    """Every line of a JSONL file, checked: a line that is not a JSON object with a known layout
    (LAYOUTS, or keys=(prompt_key, answer_key)) or that has no usable gold answer is an error naming
    the file and line."""
    out, expected = [], 'a JSON object with a prompt and an answer'
    for i, d in json_lines(path, expected):
        k = keys or next((k for k in LAYOUTS if k[0] in d and k[1] in d), None)
        if not k or k[0] not in d or k[1] not in d:
            known = ', '.join(f'{a}/{b}' for a, b in ([keys] if keys else LAYOUTS))
            raise UserError(f"{path}:{i}: expected {expected} (KeyError: none of the layouts "
                            f"{known}; it has {sorted(d)})")
        q, a = d[k[0]], d[k[1]]
        kind = LAYOUTS.get(tuple(k), 'plain')
        gold = extract_answer(str(a), fallback=False) if kind == 'boxed' else gold_answer(a)
        if kind == 'gsm8k' and '####' not in str(a):
            gold = None
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{path}:{i}: {k[0]!r} is empty or not text")
        if not gold:
            what = {'gsm8k': "no '#### n' final answer",
                    'boxed': 'no \\boxed{} final answer'}.get(kind, 'empty')
            raise UserError(f"{path}:{i}: {what} in {k[1]!r}")
        out.append({'prompt': q, 'answer': gold, 'response': str(a)})
    if not out:
        raise UserError(f"{path}: the dataset is empty")
    return out

def read_groups(path):
    """A warm-up set (train.py writes out_dir/warmup_set.jsonl): one problem per line, its prompt
    and 2 or more correct responses."""
    groups = []
    with open(path, encoding='utf-8') as f:
        for i, line in enumerate(f, 1):
            try:
                g = json.loads(line) if line.strip() else None
                if g is not None and ('prompt' not in g or len(g['responses']) < 2):
                    raise KeyError('prompt')
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: expected a warm-up set, one JSON object per line "
                                "with a prompt and 2 or more responses") from None
            groups += [g] if g is not None else []
    # may be empty: no problem had 2 correct answers (the warm-up then says so and skips)
    return groups

def group_batch(groups, tok, task):
    """Groups of answers to one prompt each -> (inputs, targets, alive, width) for teacher forcing
    (SFT: groups of one). A group keeps its own width: it is padded to the widest of the batch with
    dead rows (alive=False), which no row reads, which read nothing and carry no loss, so k answers
    attend exactly as at width k. As in sample.generate, a row is live up to the input position of
    its stop token; targets are its answer and stop."""
    W = max(len(g['responses']) for g in groups)
    rows = [(task.encode(tok, g), tok.encode(t) + [tok.eos_id] if t is not None else None)
            for g in groups for t in g['responses'] + [None] * (W - len(g['responses']))]
    T = max(len(p) + len(c or []) for p, c in rows)
    x, y = torch.full((len(rows), T), tok.pad_id), torch.full((len(rows), T), -1)
    alive = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        if c is not None:
            x[i, :len(p) + len(c)], y[i, len(p) - 1:len(p) + len(c) - 1] = (torch.tensor(p + c),
                                                                            torch.tensor(c))
            alive[i, :len(p) + len(c) - 1] = True
    return x[:, :-1], y[:, :-1], alive[:, :-1], W

def write_groups(path, groups, asked):
    """Write a warm-up set (read_groups reads it) atomically, and say what it holds."""
    atomic_write(path, ''.join(json.dumps(g) + '\n' for g in groups))
    print(f"warm-up set: {len(groups)} groups kept of {asked} (>= 2 right answers, finished), "
          f"{sum(len(g['responses']) for g in groups)} answers -> {path}")

def parse_sets(spec, setting='data_test'):
    """'name=path,name=path:grader' (or one bare path, named after its file) ->
    {name: (path, grader)}.
    A set's grader is 'math' unless its path ends in ':' and a name of GRADERS."""
    sets = {}
    for item in filter(None, (s.strip() for s in spec.split(','))):
        name, path = (item.split('=', 1) if '=' in item
                      else (os.path.splitext(os.path.basename(item))[0], item))
        head, _, tail = path.rpartition(':')
        path, grader = (head, tail) if head and tail in GRADERS else (path, 'math')
        if not name or not path or name in sets:
            raise UserError(f"{setting}={spec!r}: expected 'name=path,name=path:grader' with "
                            f"distinct names (graders: math, {', '.join(GRADERS)})")
        sets[name] = (path, grader)
    return sets

def read_graded(path, grader):
    """A transfer set: every JSONL line read by its grader (transfer.py, rouge.py), checked."""
    out = [{**GRADERS[grader].read(d, f"{path}:{i}"), 'grader': grader}
           for i, d in json_lines(path, f"a {grader} problem")]
    if not out:
        raise UserError(f"{path}: the dataset is empty")
    return out

class MathJSONL(Task):
    """Math problems from JSONL files. fallback=False grades the last \\boxed{} (or '#### n') alone,
    never the last number of a text that gave no final answer (the R1 configs: a reasoning trace is
    full of scratch numbers)."""
    name = 'math'

    def __init__(self, data_train, data_test, test_keys='', chat_template='auto', instruction='',
                 fallback=True):
        self.data_train, self.fallback = data_train, fallback
        self.graders = {name: g for name, (_, g) in parse_sets(data_test).items()}
        self.sets = {name: path for name, (path, _) in parse_sets(data_test).items()}
        self.transfer = frozenset(name for name, g in self.graders.items() if g != 'math')
        self.parser = ('last \\boxed{} else #### n'
                       + (' else the last number' if fallback else ' (no fallback)')
                       + '; equal as exact fractions or normalised text')
        self.keys = tuple(test_keys.split(',')) if test_keys else None
        self.template, self.instruction = chat_template, instruction
        self.files = tuple(f for f in (data_train, *self.sets.values()) if f)

    @cached_property
    def train_set(self):
        return read_jsonl(self.data_train)

    @cached_property
    def test_sets(self):
        read = lambda name, path: (read_jsonl(path, self.keys) if self.graders[name] == 'math'
                                   else read_graded(path, self.graders[name]))
        return {name: read(name, path) for name, path in self.sets.items()}

    def encode(self, tok, problem):
        # a transfer set's prompt is written in its own format: no boxed-answer instruction
        text = problem['prompt'] + ('' if problem.get('grader') else self.instruction)
        return tok.encode_chat(text, template='plain' if self.template == 'plain' else None)

    def grader(self, problem):
        return GRADERS[problem['grader']] if problem.get('grader') else None

    def final(self, text, problem=None):
        g = self.grader(problem) if problem else None
        return g.final(text) if g else extract_answer(text, self.fallback)

    def reward(self, text, problem):  # grading.math_reward: bounded, exact, and it never raises
        g = self.grader(problem)
        return g.reward(text, problem) if g else math_reward(text, problem['answer'], self.fallback)

def prompt_lengths(task, tok, sets, verbose=True):
    """{set name: its longest prompt in tokens}, every prompt rendered in the task's format: a
    prompt the format cannot render fails here, at start. tok=None (a dry run from config.json
    alone) counts ~1 token per 3 characters (English BPE runs ~4), plus 16 for the chat
    markup, and says so."""
    if tok is None and verbose:
        print("no tokenizer files: prompt lengths are estimated at 1 token per 3 characters + 16")
    def count(p):
        if tok:
            return len(task.encode(tok, p))
        extra = '' if p.get('grader') else getattr(task, 'instruction', '')
        return -(-len(p['prompt'] + extra) // 3) + 16
    return {name: max(count(p) for p in probs) for name, probs in sets.items()}

EMBEDDED = (*Arithmetic.KINDS, 'maxdigit')
# the last three are one: JSONL math, layout read from each file
TASKS = (*EMBEDDED, 'gsm8k', 'math', 'jsonl')

def make_task(task, digits=2, data_train='', data_test='', test_keys='', chat_template='auto',
              instruction='', fallback=True):
    if task in Arithmetic.KINDS:
        return Arithmetic(task, digits)
    if task == 'maxdigit':
        return MaxDigit()
    return MathJSONL(data_train, data_test, test_keys, chat_template, instruction, fallback)
