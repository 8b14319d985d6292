"""
Transfer benchmarks: evaluation-only sets outside math, each with a grader that reads a JSONL line
into a problem and scores a completion. A grader has a name (the set's kind in
--data_test=name=path:kind), binary (rewards are 0/1), parser (one line for the protocol card),
read(d, where), final(text), reward(text, problem) and extra(text, problem). Every grader reads only
the text after the last '</think>' when there is one (a reasoning model thinks first; what it tries
out there is not its answer), and never raises on any completion.

  gpqa       Idavidrein/gpqa: a multiple-choice science question, four options, \\boxed{X}
  zebra      allenai/ZebraLogicBench (grid_mode): a logic grid puzzle, answered as a JSON grid
  countdown  Jiayi-Pan/Countdown-Tasks-3to4: reach a target with + - * / over given numbers

Choices made, set by set:

GPQA. Rows are {"question", "correct", "incorrect": [3 strings]} or the Hub's own columns
("Question", "Correct Answer", "Incorrect Answer 1".."3"); every text is stripped. The four options
are shuffled per question with random.Random seeded by the first 8 bytes of sha256(question)
(Python's hash() of a string changes with every process), so the order is the same on every run and
machine but the correct letter varies from one question to the next. The problem keeps 'options'
(the texts in A-D order) and 'answer' (the gold letter). The prompt:

    Answer the following multiple choice question. Think step by step, then give the letter
    of your final answer as \\boxed{X}, where X is one of A, B, C or D.

    <question>

    A) ...
    B) ...
    C) ...
    D) ...

The grader reads the last \\boxed{...} only. Its content must be one capital letter A-D, alone or in
\\text{} / \\textbf{}, with any whitespace around; anything else in the last box is no answer (we do
not go back to an earlier box), and prose such as "Answer: A" or "A good idea" never counts. Reward:
the letter is the gold one.

ZebraLogic. Rows are {"id", "size", "puzzle", "solution": {"header": ["House", <attribute>...],
"rows": [["1", <value>...], ...]}}. The prompt is the puzzle followed by ZeroEval's answer format,
written out for this puzzle's houses and attributes (ZeroEval's one-shot example is left out: the
format alone is shown):

    {"reasoning": "___",
     "solution": {"House 1": {"<attribute>": "___", ...}, "House 2": {...}, ...}}

Extraction: the last top-level JSON object after '</think>' that parses and has a "solution" key.
Top-level objects are found by one scan that matches braces (braces inside JSON strings do not
count) and keeps the matched spans that no other matched span contains, so a stray '{' in the prose
before the answer does not hide it; they are tried with json.loads from the last backwards. The grid
is the value of "solution": an object of houses, each an object of attribute -> value. A value is a
string or an integer; a cell of any other type (list, null, object, bool, float) is left out, i.e.
wrong. Normalisation, for house names, attribute names and values alike: lower case, whitespace runs
collapsed to one space, stripped ("House  1" == "house 1"). The gold grid is written the same way,
house i as "House <row[0]>". final() is the grid as a sorted tuple of ((house, attribute), value);
None when no grid is found. Reward (puzzle accuracy): the grid equals the solution exactly: every
cell right, and no house or attribute the puzzle does not have (a 6-house answer to a 5-house puzzle
is not its solution). extra() gives 'cell': the fraction of the solution's cells that the answer
gets right (0 without a grid).

Countdown. Rows are {"target": int, "nums": [int, ...]}. The prompt, in TinyZero's wording without
its <think> instruction (the chat template handles thinking):

    Using the numbers [a, b, c], create an equation that equals t. Use each number exactly
    once, with only the basic arithmetic operations (+, -, *, /) and parentheses. Return the
    final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.

The grader takes the last <answer>...</answer>. A trailing '= n' is allowed (any whitespace), but
only when n is what the expression is worth: a false equation is no answer. The expression may hold
only decimal digits, + - * / ( ) and whitespace, and is parsed with ast (never eval) against a
whitelist: Expression, BinOp with Add, Sub, Mult or Div, and int Constants. So no unary minus, no
'**' or '//', no floats, names or calls. It is evaluated exactly with fractions.Fraction (an
intermediate value may be a fraction; division by zero is no answer). Reward 1 when the multiset of
constants equals the given numbers (each used exactly once; '12' is the constant 12, never 1 and 2
side by side) and the value equals the target. final() is ast.unparse of the expression: spacing and
redundant parentheses normalised, so '(1+2)*3' and '( 1 + 2 ) * 3' are one answer.
"""
import ast
import hashlib
import json
import random
import re
from fractions import Fraction

from settings import UserError

# Completions are untrusted: only their tail is read. ZebraLogic's answer holds its
# reasoning inside the JSON, so the bound is wide.
MAX_TEXT_CHARS = 200_000
MAX_EXPR_CHARS = 1_000  # a Countdown expression over 3-4 numbers is ~20 characters


def answer_part(text):
    """The text after the last '</think>' (all of it if there is none), its tail; '' if not text."""
    if not isinstance(text, str):
        return ''
    # the last one: a model may close its thinking twice, and only what follows is its answer
    return text.rsplit('</think>', 1)[-1][-MAX_TEXT_CHARS:]


def _text(d, key, where, what):
    """d[key] as a stripped non-empty string, or a UserError naming the fields expected."""
    v = d.get(key)
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: expected {what}; {key!r} is missing, empty or not text")
    return v.strip()


# ------------------------------------------------------------------------------------ GPQA

LETTERS = 'ABCD'
# the last box's whole content: a letter, bare or in \text{} / \textbf{}, whitespace around
_BOX_RE = re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{\s*([A-D])\s*\}|([A-D]))\s*\}")


def stable_seed(s):
    """A seed from a string, the same in every process (hash() of a str is salted per process)."""
    return int.from_bytes(hashlib.sha256(s.encode('utf-8')).digest()[:8], 'big')


class GPQA:
    name = 'gpqa'
    binary = True
    parser = (r"the last \boxed{X} after </think>, X one capital letter A-D (bare or in \text{}); "
              "anything else is no answer; correct = the gold letter")
    FIELDS = ('{"question", "correct", "incorrect": [3 strings]} or the columns "Question", '
              '"Correct Answer", "Incorrect Answer 1".."3"')

    def read(self, d, where):
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object {self.FIELDS}")
        if 'Question' in d and 'question' not in d:  # the Hub's column names
            d = {'question': d.get('Question'), 'correct': d.get('Correct Answer'),
                 'incorrect': [d.get(f'Incorrect Answer {i}') for i in (1, 2, 3)]}
        q = _text(d, 'question', where, self.FIELDS)
        right = _text(d, 'correct', where, self.FIELDS)
        wrong = d.get('incorrect')
        if not isinstance(wrong, list) or len(wrong) != 3 or \
                not all(isinstance(w, str) and w.strip() for w in wrong):
            raise UserError(f"{where}: expected {self.FIELDS}; "
                            "'incorrect' must be 3 non-empty strings")
        texts = [right] + [w.strip() for w in wrong]  # the Hub's texts carry stray newlines
        # one order per question, the same everywhere; across questions the gold letter varies.
        # Indices are shuffled, not texts, so that an option repeated word for word cannot move
        # the gold letter.
        order = [0, 1, 2, 3]
        random.Random(stable_seed(q)).shuffle(order)
        options, gold = [texts[k] for k in order], LETTERS[order.index(0)]
        listed = '\n'.join(f"{L}) {o}" for L, o in zip(LETTERS, options))
        prompt = ("Answer the following multiple choice question. Think step by step, then give "
                  "the letter of your final answer as \\boxed{X}, where X is one of A, B, C or D."
                  f"\n\n{q}\n\n{listed}")
        return {'prompt': prompt, 'answer': gold, 'options': options}

    def final(self, text):
        text = answer_part(text)
        i = text.rfind('\\boxed')
        m = _BOX_RE.match(text, i) if i >= 0 else None
        # the last box decides: if it is not a lone letter there is no answer (earlier boxes are
        # drafts the model moved past)
        return (m.group(1) or m.group(2)) if m else None

    def reward(self, text, problem):
        return 1.0 if self.final(text) == problem['answer'] else 0.0

    def extra(self, text, problem):
        return {}


# ------------------------------------------------------------------------------ ZebraLogic

_JSON_MARKS = re.compile(r'[{}"\\]')


def norm(s):
    """Case and spacing do not matter: 'House  1 ' == 'house 1'."""
    return ' '.join(str(s).split()).lower()


def json_objects(text):
    """The top-level {...} spans of a text, in order: pairs of matched braces (outside JSON
    strings) that no other matched pair encloses. An unmatched '{' in prose encloses nothing, so
    it cannot hide the objects after it."""
    spans, stack, in_str, skip = [], [], False, -1
    for m in _JSON_MARKS.finditer(text):  # only braces, quotes and backslashes matter
        i, c = m.start(), m.group()
        if i == skip:  # the character after a backslash in a string is escaped
            continue
        if in_str:  # inside a JSON string only its closing quote matters (braces are text)
            if c == '\\':
                skip = i + 1
            elif c == '"':
                in_str = False
        elif c == '"' and stack:  # quotes in prose, outside any object, are not strings
            in_str = True
        elif c == '{':
            stack.append(i)
        elif c == '}' and stack:
            start = stack.pop()
            while spans and spans[-1][0] > start:  # pairs this one encloses are not top-level
                spans.pop()
            spans.append((start, i + 1))
    return [text[a:b] for a, b in spans]


def _field(d, name):
    """d's value under the (first) key that normalises to name, else None."""
    return next((v for k, v in d.items() if norm(k) == name), None)


def grid_cells(solution):
    """{(house, attribute): value}, all normalised, from a solution object; cells of a wrong
    type are left out (so they count as wrong)."""
    cells = {}
    if not isinstance(solution, dict):
        return cells
    for house, attrs in solution.items():
        if not isinstance(attrs, dict):
            continue
        for attr, value in attrs.items():
            # keys equal once normalised ("Name", "name"): the last wins, as json.loads does.
            # Values: strings, and integers for number-valued attributes (bool is an int: excluded)
            if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
                cells[norm(house), norm(attr)] = norm(value)
    return cells


class ZebraLogic:
    name = 'zebra'
    binary = True
    parser = ('the last top-level JSON object after </think> with a "solution" grid; houses, '
              'attributes and values lower-cased, whitespace collapsed; solved = the grid equals '
              'the solution')
    FIELDS = ('{"id", "size", "puzzle", "solution": {"header": ["House", ...], '
              '"rows": [["1", ...], ...]}}')

    def read(self, d, where):
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object {self.FIELDS}")
        puzzle = _text(d, 'puzzle', where, self.FIELDS)
        sol = d.get('solution')
        header = sol.get('header') if isinstance(sol, dict) else None
        rows = sol.get('rows') if isinstance(sol, dict) else None
        ok = (isinstance(header, list) and len(header) >= 2 and norm(header[0]) == 'house'
              and all(isinstance(h, str) for h in header) and isinstance(rows, list) and rows
              and all(isinstance(r, list) and len(r) == len(header) and
                      all(isinstance(v, (str, int)) for v in r) for r in rows))
        if not ok:
            raise UserError(f"{where}: expected {self.FIELDS}; 'solution' must have a header "
                            "starting with 'House' and rows as long as the header")
        attrs = header[1:]
        # the format names this puzzle's houses and attributes, so the answer's keys are known
        template = {'reasoning': '___',
                    'solution': {f'House {r[0]}': {a: '___' for a in attrs} for r in rows}}
        prompt = (f"{puzzle}\n\nSolve the puzzle above. Give your reasoning and the solution as "
                  f"one JSON object in this format:\n\n{json.dumps(template, indent=4)}")
        # the gold in final()'s form: reward is final == answer, so one grid gets one reward
        gold = {(norm(f'House {r[0]}'), norm(a)): norm(v)
                for r in rows for a, v in zip(attrs, r[1:])}
        out = {'prompt': prompt, 'answer': tuple(sorted(gold.items()))}
        out.update({k: d[k] for k in ('id', 'size') if k in d})
        return out

    def grid(self, text):
        """The answer's cells (grid_cells), or None without a JSON object holding a "solution"."""
        for candidate in reversed(json_objects(answer_part(text))):
            try:
                obj = json.loads(candidate)
            except (ValueError, RecursionError):  # not JSON, a huge int literal, absurdly deep
                continue
            # the last object holding a solution is the answer; a later one without (a note,
            # a confidence) is not, and an earlier one is a draft
            if isinstance(obj, dict) and _field(obj, 'solution') is not None:
                return grid_cells(_field(obj, 'solution'))
        return None

    def final(self, text):
        cells = self.grid(text)
        # an empty grid is no answer, so that a majority vote never elects "nothing"
        return tuple(sorted(cells.items())) if cells else None

    def reward(self, text, problem):
        return 1.0 if self.final(text) == problem['answer'] else 0.0

    def extra(self, text, problem):
        cells, gold = self.grid(text) or {}, problem['answer']
        # over the solution's cells only (ZeroEval's cell accuracy): extra houses do not count
        return {'cell': sum(cells.get(k) == v for k, v in gold) / len(gold)}


# ------------------------------------------------------------------------------- Countdown

# decimal digits only: no '0x13', '1_2', '1e1' or '1.5' literals reach the parser
_EXPR_CHARS = re.compile(r"[0-9+\-*/()\s]+")
_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
        ast.Div: Fraction.__truediv__}


def _evaluate(node, used):
    """The exact value of a whitelisted expression tree, appending each constant to used;
    ValueError for anything outside the whitelist."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if type(node.op) is ast.Div and right == 0:
            raise ValueError('division by zero')
        return _OPS[type(node.op)](left, right)
    # UnaryOp, Pow, FloorDiv, Name, Call, float constants, ...
    raise ValueError(f'{type(node).__name__} is not allowed')


def parse_equation(answer):
    """'(1 + 2) * 3 = 9' -> (normalised expression, its Fraction value, [constants used]),
    or None when it is not a whitelisted expression (or states a false equation)."""
    if not isinstance(answer, str) or len(answer) > MAX_EXPR_CHARS or answer.count('=') > 1:
        return None
    # one '=' at most: 'a = b = c' is not an answer; the right side must be a plain number
    expr, _, claimed = answer.partition('=')
    if claimed and not re.fullmatch(r"\s*\d+\s*", claimed):
        return None
    if not _EXPR_CHARS.fullmatch(expr):
        return None
    try:
        # parsed, never run; newlines become spaces so a wrapped answer still parses
        tree = ast.parse(' '.join(expr.split()), mode='eval')
        used = []
        value = _evaluate(tree.body, used)
    except (SyntaxError, ValueError, RecursionError):
        return None
    if claimed and Fraction(int(claimed)) != value:  # '2 + 3 = 6' is false: no answer
        return None
    return ast.unparse(tree), value, used


class Countdown:
    name = 'countdown'
    binary = True
    parser = ("the last <answer>...</answer> after </think>: int literals, + - * / and "
              "parentheses, optional '= n', parsed with ast (no eval), exact Fraction value; "
              "correct = each given number used exactly once and the value equals the target")
    FIELDS = '{"target": int, "nums": [int, ...]}'

    def read(self, d, where):
        isint = lambda v: isinstance(v, int) and not isinstance(v, bool)
        nums = d.get('nums') if isinstance(d, dict) else None
        if not isinstance(d, dict) or not isint(d.get('target')) or not isinstance(nums, list) \
                or len(nums) < 2 or not all(isint(n) and n >= 0 for n in nums):
            raise UserError(f"{where}: expected a JSON object {self.FIELDS}, 'nums' holding 2 or "
                            "more integers >= 0 (3 or 4 in Countdown-Tasks-3to4)")
        target, nums = d['target'], list(nums)
        # the numbers as a Python list, as TinyZero's prompt shows them
        prompt = (f"Using the numbers {nums}, create an equation that equals {target}. Use each "
                  "number exactly once, with only the basic arithmetic operations (+, -, *, /) "
                  "and parentheses. Return the final answer in <answer> </answer> tags, for "
                  "example <answer> (1 + 2) / 3 </answer>.")
        return {'prompt': prompt, 'answer': target, 'target': target, 'nums': nums}

    def _parsed(self, text):
        text = answer_part(text)
        j = text.rfind('</answer>')
        i = text.rfind('<answer>', 0, j) if j >= 0 else -1
        # the last closing tag and the nearest opening tag before it:
        # '<answer> <answer>1+2</answer>' reads '1+2'
        return parse_equation(text[i + len('<answer>'):j]) if i >= 0 else None

    def final(self, text):
        parsed = self._parsed(text)
        return parsed[0] if parsed else None

    def reward(self, text, problem):
        parsed = self._parsed(text)
        if parsed is None:
            return 0.0
        _, value, used = parsed
        # sorted lists compare multisets: every given number exactly once, nothing added
        right = sorted(used) == sorted(problem['nums']) and value == problem['target']
        return 1.0 if right else 0.0

    def extra(self, text, problem):
        return {}


GRADERS = {'gpqa': GPQA(), 'zebra': ZebraLogic(), 'countdown': Countdown()}
