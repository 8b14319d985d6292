"""
Verifiable math rewards: the final answer of a completion (the last \\boxed{}, else GSM8K's
'#### n', else the last number) against the gold answer, with Hendrycks-style normalisation and
exact Fraction arithmetic (no sympy, no eval).
"""
import re
from fractions import Fraction

# Rewards run on untrusted model output, so every input is bounded: we only look at the tail of a
# completion, answers longer than MAX_ANSWER_CHARS are "no answer", and numbers with more than
# MAX_NUM_DIGITS digits are compared as strings (int() of a huge string is slow and, since
# Python 3.11, raises beyond 4300 digits).
MAX_TEXT_CHARS = 10_000
MAX_ANSWER_CHARS = 2_000
MAX_NUM_DIGITS = 100

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_GSM_RE = re.compile(r"####[ \t]*([^\n]*)")
# last-number fallback: "1,234.5", "-3", "2/3", ".5"; a '-' counts only if it is not a binary minus
_NUM_RE = re.compile(r"(?:(?<![0-9a-zA-Z)])-)?"
                     r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")

def _closing_brace(s, i=0):
    """Index of the '}' that closes the '{' at s[i], or None if it never closes."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return None

def _last_boxed(text):
    """Content of the last \\boxed{...} / \\fbox{...} / '\\boxed 5'. None if absent or malformed."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    i = boxes[-1].end()
    if text[i:i + 1] == "{":
        # match braces by depth so that \boxed{\frac{1}{2}} returns \frac{1}{2}
        j = _closing_brace(text, i)
        # unbalanced: a box that never closes -> no answer
        return None if j is None else text[i + 1:j]
    bare = re.match(r"[ \t]+([^\s$]+)", text[i:])  # Hendrycks also accepts "\boxed 5"
    # the last box decides; a malformed last box is "no answer", we do not go back to earlier boxes
    return bare.group(1) if bare else None

def extract_answer(text, fallback=True):
    """Final answer of a completion: last \\boxed{}, else GSM8K '#### n', else
    (fallback) the last number."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_TEXT_CHARS:]
    # a box is an explicit final answer: no fallback past it, even if malformed
    if _BOX_RE.search(text):
        return _last_boxed(text)
    gsm = [g.strip() for g in _GSM_RE.findall(text) if g.strip()]
    if gsm:
        return gsm[-1]
    if fallback:
        nums = _NUM_RE.findall(text)
        return nums[-1] if nums else None
    return None

def normalize_answer(s):
    """Hendrycks MATH `_strip_string`, extended: canonical string form of an answer
    ('' = no answer)."""
    s = "" if s is None else str(s).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return ""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("\\displaystyle", "")
    s = re.sub(r"\\[td]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # LaTeX spacing; "1\,234" and "1{,}234" are thousands separators
    s = (s.replace("{,}", ",").replace("\\,", "").replace("\\;", "").replace("\\:", "")
         .replace("\\ ", ""))
    # trailing units: "5\text{ cm}", "5 \mbox{cm}^2" -> "5" (only after a number or a closing brace)
    s = re.sub(r"(?<=[0-9}.])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .]*\}"
               r"(?:\^\{?\d\}?)?\s*$", "", s)
    # unwrap \text{Evelyn} -> Evelyn
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    # plain-word units after a bare number: "12 dollars", "5 cm" -> "12", "5"
    s = re.sub(r"^(-?[\d.,]+(?:/\d+)?)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*\.?$", r"\1", s)
    # short "x = 5" / "k=5" prefixes (Hendrycks keeps the rhs when the lhs has <= 2 chars)
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1]
    # \boxed{{5}}: redundant grouping braces
    while s.startswith("{") and _closing_brace(s) == len(s) - 1:
        s = s[1:-1].strip()
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return s.rstrip(".")

_DEC = r"-?(?:\d+(?:\.\d*)?|\.\d+)"

def _to_fraction(s):
    """Exact value of a normalised numeric answer (int, decimal, 1,234, a/b,
    \\frac{a}{b}), else None."""
    if sum(c.isdigit() for c in s) > MAX_NUM_DIGITS:
        return None
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators; "1,2" stays a tuple
        s = s.replace(",", "")
    if re.fullmatch(_DEC, s):
        return Fraction(s)
    m = re.fullmatch(rf"(-?)(?:\\frac\{{({_DEC})\}}\{{({_DEC})\}}|({_DEC})/({_DEC}))", s)
    if m:
        num, den = Fraction(m.group(2) or m.group(4)), Fraction(m.group(3) or m.group(5))
        if den == 0:
            return None
        return -num / den if m.group(1) else num / den
    return None

def is_equiv(pred, gold):
    """True if pred and gold are the same answer: exact numeric equality, else
    normalised string equality."""
    try:
        a, b = normalize_answer(pred), normalize_answer(gold)
        if not a or not b:
            return False
        fa, fb = _to_fraction(a), _to_fraction(b)
        if fa is not None and fb is not None:
            return fa == fb  # Fraction: 0.5 == 1/2 == \frac{1}{2} exactly, no float round-off
        return a == b
    except Exception:  # a reward must never crash a training run
        return False

def gold_answer(gold):
    """Gold answer from a dataset field: GSM8K '... #### 72' -> '72', a MATH
    solution -> its last box."""
    if not isinstance(gold, str):
        return None if gold is None else str(gold)
    if "####" in gold:
        return gold.split("####")[-1].strip()
    if _BOX_RE.search(gold):
        return _last_boxed(gold[-MAX_TEXT_CHARS:])
    return gold.strip()

def math_reward(text, gold, fallback=True):
    """1.0 if the completion's final answer equals the gold answer, else 0.0 (never raises)."""
    try:
        return 1.0 if is_equiv(extract_answer(text, fallback), gold_answer(gold)) else 0.0
    except Exception:
        return 0.0
