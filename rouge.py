"""
ROUGE-1 F1 for the summarisation transfer benchmarks (XSum, CNN/DailyMail), and their grader,
Summary.

rouge1() matches rouge-score's RougeScorer(['rouge1'], use_stemmer=True) exactly, without its
dependencies:
- tokens as rouge_score/tokenize.py makes them: str.lower(), every run of characters outside
  [a-z0-9] becomes a space, split on whitespace, empty tokens dropped (no stopwords, no length
  limit; its final ^[a-z0-9]+$ check drops nothing else, every token being made of those already);
- tokens of more than 3 characters go through the Porter stemmer rouge-score builds, nltk's
  PorterStemmer() in its default mode, NLTK_EXTENSIONS, ported below; shorter ones stay as they are;
- precision and recall on clipped unigram counts (a reference token matches at most as many times
  as it occurs in the prediction), with rouge-score's max(count, 1) denominators, F = 2PR / (P + R),
  0 when P + R is 0: the same operations in the same order, so the floats are identical.
"""
import re
from collections import Counter
from functools import lru_cache

from settings import UserError

# ---- Porter stemmer --------------------------------------------------------------------------
# M.F. Porter, "An algorithm for suffix stripping", Program 14(3), 130-137 (1980), in the variant
# of nltk/stem/porter.py with mode=PorterStemmer.NLTK_EXTENSIONS (nltk's default, the one
# rouge-score's tokenizers.DefaultTokenizer constructs). Each NLTK extension is marked where it
# departs from the paper.

_VOWELS = frozenset('aeiou')

# NLTK_EXTENSIONS: irregular forms, looked up before any rule runs
_IRREGULAR = {
    'sky': 'sky', 'skies': 'sky', 'dying': 'die', 'lying': 'lie', 'tying': 'tie', 'news': 'news',
    'innings': 'inning', 'inning': 'inning', 'outings': 'outing', 'outing': 'outing',
    'cannings': 'canning', 'canning': 'canning', 'howe': 'howe',
    'proceed': 'proceed', 'exceed': 'exceed', 'succeed': 'succeed',
}

def _is_consonant(w, i):
    """Porter's consonant: not a vowel, and a 'y' only where the letter before is not a consonant.
    A run of 'y's alternates, so it is walked back in a loop (no recursion depth on 'yyyy...')."""
    flip = False
    while i > 0 and w[i] == 'y':
        flip, i = not flip, i - 1
    return (w[i] not in _VOWELS) != flip

def _cv(w):
    """w as consonant flags in one left-to-right pass (what _is_consonant says at each i)."""
    flags = []
    for i, ch in enumerate(w):
        flags.append(ch not in _VOWELS if ch != 'y' else (i == 0 or not flags[-1]))
    return flags

def _measure(w):
    # m in [C](VC)^m[V]: the number of vowel-to-consonant transitions
    f = _cv(w)
    return sum(1 for a, b in zip(f, f[1:]) if not a and b)

def _has_vowel(w):
    return not all(_cv(w))

def _ends_double_consonant(w):
    return len(w) >= 2 and w[-1] == w[-2] and _is_consonant(w, len(w) - 1)

def _ends_cvc(w):
    """*o: the stem ends consonant-vowel-consonant, the last not w, x or y; NLTK_EXTENSIONS also
    accepts a two-letter vowel-consonant stem."""
    if len(w) >= 3 and _is_consonant(w, len(w) - 3) and not _is_consonant(w, len(w) - 2) \
            and _is_consonant(w, len(w) - 1) and w[-1] not in 'wxy':
        return True
    return len(w) == 2 and not _is_consonant(w, 0) and _is_consonant(w, 1)

def _first_rule(w, rules, ok):
    """The first rule whose suffix w ends with decides: its replacement if ok(stem), else w as it is
    (a later rule with a shorter matching suffix is not tried, as in the paper's step lists)."""
    for suffix, repl in rules:
        if w.endswith(suffix):
            stem = w[:len(w) - len(suffix)]
            return stem + repl if ok(stem) else w
    return w

def _step1a(w):
    # NLTK_EXTENSIONS: 'ties' -> 'tie', 'dies' -> 'die' (the paper: 'ti'); 'flies' -> 'fli' still
    if w.endswith('ies') and len(w) == 4:
        return w[:-3] + 'ie'
    return _first_rule(w, (('sses', 'ss'), ('ies', 'i'), ('ss', 'ss'), ('s', '')),
                       lambda s: True)

def _step1b(w):
    # NLTK_EXTENSIONS: 'died' -> 'die', 'spied' -> 'spi', whatever the measure
    if w.endswith('ied'):
        return w[:-3] + ('ie' if len(w) == 4 else 'i')
    # (m>0) EED -> EE; a word ending in 'eed' never falls through to the ED rule ('feed' stays)
    if w.endswith('eed'):
        return w[:-3] + 'ee' if _measure(w[:-3]) > 0 else w
    for suffix in ('ed', 'ing'):
        if w.endswith(suffix) and _has_vowel(w[:-len(suffix)]):
            s = w[:-len(suffix)]
            break
    else:
        return w
    # -ED or -ING removed: tidy the stem so that steps 4 and 5 see the form of the bare word
    if s.endswith(('at', 'bl', 'iz')):
        return s + 'e'
    if _ends_double_consonant(s):
        return s if s[-1] in 'lsz' else s[:-1]
    return s + 'e' if _measure(s) == 1 and _ends_cvc(s) else s

def _step1c(w):
    # NLTK_EXTENSIONS: Y -> I only after a consonant that is not the whole stem ('happy' ->
    # 'happi'; 'enjoy' and 'by' stay); the paper's condition is a vowel anywhere in the stem
    if w.endswith('y') and len(w) > 2 and _is_consonant(w, len(w) - 2):
        return w[:-1] + 'i'
    return w

_STEP2 = (('ational', 'ate'), ('tional', 'tion'), ('enci', 'ence'), ('anci', 'ance'),
          ('izer', 'ize'), ('bli', 'ble'), ('alli', 'al'), ('entli', 'ent'), ('eli', 'e'),
          ('ousli', 'ous'), ('ization', 'ize'), ('ation', 'ate'), ('ator', 'ate'), ('alism', 'al'),
          ('iveness', 'ive'), ('fulness', 'ful'), ('ousness', 'ous'), ('aliti', 'al'),
          ('iviti', 'ive'), ('biliti', 'ble'), ('fulli', 'ful'))

def _step2(w):
    # NLTK_EXTENSIONS: ALLI -> AL is tried first and the result goes through step 2 again
    if w.endswith('alli') and _measure(w[:-4]) > 0:
        return _step2(w[:-4] + 'al')
    # BLI (not the paper's ABLI), FULLI and LOGI are Porter's later rules as nltk has them. LOGI
    # counts the measure with the 'l' kept, so that short stems ('geo', 'theo') are stemmed too;
    # no other suffix here ends in 'gi', so testing it first keeps the first-match order
    if w.endswith('logi'):
        return w[:-1] if _measure(w[:-3]) > 0 else w
    return _first_rule(w, _STEP2, lambda s: _measure(s) > 0)

_STEP3 = (('icate', 'ic'), ('ative', ''), ('alize', 'al'), ('iciti', 'ic'), ('ical', 'ic'),
          ('ful', ''), ('ness', ''))

def _step3(w):
    return _first_rule(w, _STEP3, lambda s: _measure(s) > 0)

_STEP4 = ('al', 'ance', 'ence', 'er', 'ic', 'able', 'ible', 'ant', 'ement', 'ment', 'ent', 'ion',
          'ou', 'ism', 'ate', 'iti', 'ous', 'ive', 'ize')

def _step4(w):
    for suffix in _STEP4:
        if w.endswith(suffix):
            s = w[:-len(suffix)]
            # (m>1 and (*S or *T)) ION; every other suffix needs m>1 alone
            ok = _measure(s) > 1 and (suffix != 'ion' or s[-1] in 'st')
            return s if ok else w
    return w

def _step5(w):
    # 5a: (m>1) E ->, and (m=1 and not *o) E -> ('cease' -> 'ceas', 'rate' stays): both tried
    if w.endswith('e'):
        m = _measure(w[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(w[:-1])):
            w = w[:-1]
    # 5b: (m>1 and *d and *L) -> single letter ('controll' -> 'control', 'roll' stays)
    if w.endswith('ll') and _measure(w[:-1]) > 1:
        w = w[:-1]
    return w

@lru_cache(maxsize=1 << 16)  # a reference's words are stemmed again for every sampled summary
def stem(word):
    """nltk's PorterStemmer().stem(word), mode NLTK_EXTENSIONS, to_lowercase=True."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    # NLTK_EXTENSIONS: one- and two-letter words are left alone (rouge-score never sends any)
    if len(word) <= 2:
        return w
    return _step5(_step4(_step3(_step2(_step1c(_step1b(_step1a(w)))))))

# ---- ROUGE-1 ---------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r'[^a-z0-9]+')

def tokenize(text):
    """rouge-score's DefaultTokenizer(use_stemmer=True).tokenize(text). str.lower() runs before
    the ASCII filter, as there: some non-ASCII letters lower to ASCII ones (Kelvin sign)."""
    return [stem(t) if len(t) > 3 else t for t in _NON_ALNUM.sub(' ', text.lower()).split()]

def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 of prediction against reference, as RougeScorer(['rouge1'], use_stemmer=True)
    .score(reference, prediction)['rouge1'].fmeasure computes it."""
    ref, pred = Counter(tokenize(reference)), Counter(tokenize(prediction))
    overlap = sum(min(n, pred[t]) for t, n in ref.items())
    precision = overlap / max(sum(pred.values()), 1)
    recall = overlap / max(sum(ref.values()), 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

# ---- the grader ------------------------------------------------------------------------------

# each benchmark's two text fields: (document, reference summary)
LAYOUTS = {'xsum': ('document', 'summary'), 'cnn': ('article', 'highlights')}

INSTRUCTIONS = {
    'xsum': "Summarize the following article in one sentence.",
    'cnn': ("Summarize the following news article in 3 or 4 short sentences, one per line, "
            "as highlights."),
}

class Summary:
    """A summarisation test set: a continuous reward (ROUGE-1 F1 against the reference), so no
    pass@w and no majority vote. style picks the instruction; either layout is read under either."""
    name = 'summary'
    binary = False
    parser = "ROUGE-1 F1 (rouge-score's tokens, Porter stemmer) of the text after the last </think>"

    def __init__(self, style='xsum'):
        if style not in INSTRUCTIONS:
            raise UserError(f"summary style {style!r}: expected one of "
                            f"{', '.join(map(repr, INSTRUCTIONS))}")
        self.style = style

    def prompt(self, document):
        # the instruction comes first, where a long article cannot push it out of a truncated view
        return f"{INSTRUCTIONS[self.style]}\n\nArticle:\n{document.strip()}\n\nSummary:"

    def read(self, d, where):
        """One JSONL object -> {'prompt': the full user message, 'answer': the reference}."""
        ok = isinstance(d, dict)
        keys = next((k for k in LAYOUTS.values() if ok and k[0] in d and k[1] in d), None)
        if keys is None:
            has = sorted(d) if ok else f"a {type(d).__name__}"
            raise UserError(f"{where}: expected 'document' and 'summary' (XSum) or 'article' and "
                            f"'highlights' (CNN/DailyMail); it has {has}")
        for k in keys:
            if not isinstance(d[k], str) or not d[k].strip():
                raise UserError(f"{where}: {k!r} is empty or not text")
        return {'prompt': self.prompt(d[keys[0]]), 'answer': d[keys[1]]}

    def reward(self, text, problem):
        """ROUGE-1 F1 of the text after the last '</think>' (all of it if there is none); 0.0 for
        anything that is not text, so a malformed completion scores 0 instead of stopping a run."""
        answer = problem.get('answer') if isinstance(problem, dict) else None
        if not isinstance(text, str) or not isinstance(answer, str):
            return 0.0
        # the reasoning trace restates the article: scoring it would reward copying it
        return rouge1(text.rsplit('</think>', 1)[-1], answer)

    def final(self, text):
        return None  # no discrete final answer: nothing to vote on or compare
