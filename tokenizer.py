"""
The tokenizer, from a checkpoint's own files, with tiktoken as the only dependency: byte-level BPE
built from tokenizer.json (or a Qwen rank file), its added tokens, stop and pad ids, and the
checkpoint's chat format re-implemented for the two template families we know (ChatML/Qwen and
DeepSeek-R1), byte for byte, without jinja.
"""
import base64
import json
import os
import re
import unicodedata

import tiktoken

from settings import UserError

# ByteLevel(use_regex=true) in a tokenizer.json means GPT-2's split pattern
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
             r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT-2's bytes_to_unicode, inverted: HF byte-level vocab strings spell each byte
# as one printable char
_bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
_extra = [b for b in range(256) if b not in _bs]
BYTE_OF = {chr(c): b for b, c in zip(_bs + _extra, _bs + [256 + i for i in range(len(_extra))])}
# the same as a str.translate table (then latin-1 = the bytes)
TO_BYTE = {ord(c): b for c, b in BYTE_OF.items()}

def _read(fn, mode='r'):
    with open(fn, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
        return f.read()

def _read_json(path, name):
    fn = os.path.join(path, name)
    return json.loads(_read(fn)) if os.path.exists(fn) else {}

def _content(tok):  # tokenizer_config stores tokens as "str" or {"content": "str", ...}
    return tok.get('content') if isinstance(tok, dict) else tok

def _from_tokenizer_json(fn):
    """tokenizer.json -> (ranks, added, unreachable, split pattern, nfc); refuses what
    tiktoken can't mimic"""
    tj = json.loads(_read(fn))
    def unsupported(field, v):
        return ValueError(f"{fn}: unsupported {field} {json.dumps(v)[:300]} "
                          "(only GPT-2/Qwen-style byte-level BPE tokenizers are implemented)")
    norm = tj.get('normalizer')
    norms = ((norm.get('normalizers') or []) if norm and norm['type'] == 'Sequence' else
             [norm] if norm else [])
    if any(n['type'] != 'NFC' for n in norms):
        raise unsupported('normalizer', norm)
    pre = tj.get('pre_tokenizer') or {}
    pres = pre.get('pretokenizers', []) if pre.get('type') == 'Sequence' else [pre]
    kinds, bl = [p.get('type') for p in pres], pres[-1]
    if kinds == ['ByteLevel'] and bl.get('use_regex', True) and not bl.get('add_prefix_space'):
        pat = GPT2_PAT
    elif (kinds == ['Split', 'ByteLevel'] and 'Regex' in pres[0]['pattern']
          and pres[0]['behavior'] == 'Isolated' and not pres[0].get('invert')
          and not bl.get('use_regex', True) and not bl.get('add_prefix_space')):
        pat = pres[0]['pattern']['Regex']
    else:
        raise unsupported('pre_tokenizer', pre)
    model = tj['model']
    if (model['type'] != 'BPE' or model.get('dropout') or model.get('byte_fallback')
            or model.get('continuing_subword_prefix') or model.get('end_of_word_suffix')):
        raise unsupported('model', {k: v for k, v in model.items() if k not in ('vocab', 'merges')})
    added = {t['content']: t['id'] for t in tj.get('added_tokens', [])}
    odd = [t for t in tj.get('added_tokens', [])
           if t.get('lstrip') or t.get('rstrip') or t.get('single_word')]
    if odd:  # HF would also swallow the whitespace around these
        raise unsupported('added_tokens entry', odd[0])
    vocab = model['vocab']
    merges = [m.split(' ') if isinstance(m, str) else m for m in model['merges']]
    merged = [vocab.get(a + b) for a, b in merges]
    # added tokens are cut out of the text before BPE (and may sit in the vocab too): not BPE ranks
    bpe = {s: i for s, i in vocab.items() if s not in added}
    if not set(''.join(bpe)) <= BYTE_OF.keys():
        raise UserError(f"{fn}: model.vocab has tokens outside the GPT-2 byte-level alphabet")
    # C speed: 150k tokens at start
    ranks = {s.translate(TO_BYTE).encode('latin-1'): i for s, i in bpe.items()}
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{fn}: model.vocab lacks the single-byte tokens of {len(missing)} bytes, "
                        f"e.g. {missing[:5]}")
    # HF applies merges in list order, tiktoken merges the pair whose result has the lowest id: the
    # two agree when the ids of the merged tokens strictly increase along the merge list
    for k, i in enumerate(merged):
        if i is None or (k and i <= merged[k - 1]):
            raise UserError(f"{fn}: model.merges[{k}] {merges[k]} makes a token missing from the "
                            "vocab or out of id order; "
                            "tiktoken needs merge order == token id order")
    # vocab entries no merge can build (e.g. '[PAD151700]' fillers) are unreachable in HF
    # too: keep them out of the BPE, but decodable (as tiktoken 'specials' that encode()
    # never matches in text)
    reachable = set(merged)
    unreachable = {b.decode('utf-8', 'replace'): ranks.pop(b) for b, i in list(ranks.items())
                   if len(b) > 1 and i not in reachable}
    return ranks, added, unreachable, pat, bool(norms)

class Tokenizer:
    def __init__(self, path, ranks, added, unreachable, pat, nfc):
        self.path, self.nfc = path, nfc
        self.enc = tiktoken.Encoding(os.path.basename(os.path.normpath(path)) or 'tok', pat_str=pat,
                                     mergeable_ranks=ranks, special_tokens={**unreachable, **added})
        self.special_ids, self.n_vocab = dict(added), self.enc.n_vocab
        # ids may have gaps
        self._known = set(ranks.values()) | set(unreachable.values()) | set(added.values())
        # added tokens are cut out of the text before normalisation and BPE, like HF does;
        # longest first so that one added token that is a prefix of another can't shadow it (HF
        # matches leftmost-longest)
        alts = '|'.join(re.escape(s) for s in sorted(added, key=len, reverse=True))
        self._split = re.compile(f"({alts or '(?!)'})")  # (?!) never matches: no added tokens
        tc = _read_json(path, 'tokenizer_config.json')
        eos = _read_json(path, 'generation_config.json').get('eos_token_id')
        # generation_config has the model's real stop set
        if eos is None and _content(tc.get('eos_token')):
            # (instruct Qwen2.5: [<|im_end|>, <|endoftext|>])
            eos = self.token_id(_content(tc['eos_token']))
        self.stop_ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
        self.eos_id = self.stop_ids[0] if self.stop_ids else None
        self.pad_id = (self.token_id(_content(tc['pad_token'])) if _content(tc.get('pad_token'))
                       else self.eos_id)
        self.bos_token = _content(tc.get('bos_token'))  # a string, only the chat template uses it
        ct = tc.get('chat_template')
        if isinstance(ct, list):  # named templates: [{"name": "default", "template": ...}, ...]
            ct = {t['name']: t['template'] for t in ct}.get('default')
        jinja = os.path.join(path, 'chat_template.jinja')  # where newer transformers save it
        if ct is None and os.path.exists(jinja):
            ct = _read(jinja)
        self.chat_template = ct

    @classmethod
    def from_pretrained(cls, path):
        if not os.path.isdir(path):
            raise UserError(f"checkpoint directory {path!r} does not exist")
        fn = os.path.join(path, 'tokenizer.json')
        if os.path.exists(fn):
            return cls(path, *_from_tokenizer_json(fn))  # the full description, preferred
        fn = os.path.join(path, 'qwen.tiktoken')
        if not os.path.exists(fn):
            raise UserError(f"{path}: no tokenizer.json or qwen.tiktoken "
                            "in the checkpoint directory")
        ranks = {base64.b64decode(t): int(r)
                 for t, r in (l.split() for l in _read(fn, 'rb').splitlines() if l)}
        # {"id": {content, ...}}
        dec = _read_json(path, 'tokenizer_config.json').get('added_tokens_decoder') or {}
        # (a bare rank file has no special tokens)
        added = {v['content']: int(k) for k, v in dec.items()}
        return cls(path, ranks, added, {}, QWEN2_PAT, True)  # Qwen2's tokenizer.json normalises NFC

    def encode(self, text):
        ids = []
        for i, part in enumerate(self._split.split(text)):  # odd parts are added tokens
            if i % 2:
                ids.append(self.special_ids[part])  # never BPE'd, never normalised
            elif part:
                ids += self.enc.encode_ordinary(
                    unicodedata.normalize('NFC', part) if self.nfc else part)
        return ids

    def decode(self, ids):
        # ids the tokenizer lacks (the model's padded embedding rows) decode to nothing, as in HF
        return self.enc.decode([i for i in ids if i in self._known], errors='replace')

    def token_id(self, s):
        # e.g. eos named in a config
        ids = [self.special_ids[s]] if s in self.special_ids else self.encode(s)
        if len(ids) != 1:
            raise UserError(f"{self.path}: token {s!r} is not a single token of this vocabulary")
        return ids[0]

    # ---- chat formatting: the output of the checkpoint's jinja chat template for one
    # (system +) user turn with add_generation_prompt=True, for the two template families
    # we know, byte for byte
    def render_chat(self, user, system=None, template=None):
        t = template or self.chat_template
        if t == 'plain':
            # base models: no markup at all
            return f"{system}\n\n{user}\n" if system else f"{user}\n"
        plain_hint = "use chat_template='plain' to format the prompt as plain text instead"
        if not t:
            raise UserError(f"{self.path}: tokenizer_config.json has no chat_template; "
                            f"{plain_hint}")
        tail = t.rstrip()  # the generation prompt is the template's last statement
        if "{{'<｜User｜>' + " in t and tail.endswith(
                ("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")):
            # DeepSeek-R1(-Distill): bos, system text as is, fullwidth-bar role tags; newer
            # revisions end the prompt with a forced '<think>\n' so the model always reasons first
            # jinja renders an unset bos as ''
            bos = (self.bos_token or '') if 'bos_token' in t else ''
            think = '<think>\n' if tail.endswith("<think>\\n'}}{% endif %}") else ''
            return f"{bos}{system or ''}<｜User｜>{user}<｜Assistant｜>{think}"
        if '<|im_end|>' in t and "'<|im_start|>assistant\\n'" in t and 'add_generation_prompt' in t:
            # ChatML (Qwen2/2.5/3): with no system message the template may insert its own default,
            # written as one string literal '<|im_start|>system\n...<|im_end|>\n'
            if system is None:
                m = re.search(r"""(['"])<\|im_start\|>system\\n((?:(?!\1).)*?)<\|im_end\|>\\n\1""",
                              t, re.S)
                system = (re.sub(r'\\(.)', lambda e: {'n': '\n', 't': '\t'}.get(e[1], e[1]), m[2])
                          if m else None)
            head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ''
            return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        raise UserError(f"{self.path}: unrecognised chat template (only ChatML/Qwen and "
                        f"DeepSeek-R1 formats are implemented, without jinja): {t[:80]!r}...; "
                        f"{plain_hint}")

    def encode_chat(self, user, system=None, template=None):
        return self.encode(self.render_chat(user, system, template))

def no_tokenizer(path):
    return not any(os.path.exists(os.path.join(path, f))
                   for f in ('tokenizer.json', 'qwen.tiktoken'))

def write_byte_tokenizer(path):
    """The embedded model's tokenizer (train.py): the 256 bytes plus two specials, saved like
    a Qwen rank file."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'qwen.tiktoken'), 'w') as f:
        f.write(''.join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump({'added_tokens_decoder': {'256': {'content': '<|endoftext|>'},
                                            '257': {'content': '<|im_end|>'}},
                   'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}, f)
    return Tokenizer.from_pretrained(path)
