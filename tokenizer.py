"""
The tokenizer of amlm: a character-level BPE trained in plain Python, and the character sub-token units of the
N-hot embedding. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing
Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025); written after karpathy's minbpe.

    tok = Tokenizer.train(["the dog walked", "the cat walks"], vocab_size=300)
    tok.encode("the dog") -> [id("▁the"), id("▁dog")];  tok.decode(...) -> "the dog"
    table, units = tok.subtoken_table()   # (vocab, max units) ids for model.MaskedLM's N-hot sum

Ids: 0-4 the specials, 5-260 the 256 UTF-8 bytes "<0x00>".."<0xFF>", then the alphabet (characters seen at
least twice), then one id per merge. A character outside the alphabet is encoded as its UTF-8 bytes, so nothing is
ever [UNK]. Normalisation: whitespace runs (and a literal "▁") become one space, the ends are stripped, so
decode(encode(s)) == " ".join(s.replace("▁", " ").split()) for every string s. Case is kept. Every text starts a
word (like SentencePiece), so "walked" at a line start and " walked" share "▁walked". A special token's name typed
in the text ("[MASK]") is plain text here, encoded like any other characters.

Training (learn_merges_simply is the whole idea; learn_merges computes the same merges much faster):
    words as lists of ids -> count adjacent pairs -> merge the most frequent pair into a new id -> repeat
"""
import array, heapq, json, os, re
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.errors import DataError

PAD, CLS, SEP, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
FIRST_BYTE, FIRST_CHAR = 5, 5 + 256          # byte-fallback ids, then the alphabet
MIN_CHAR_COUNT = 2                          # rarer characters fall back to bytes
TOKENIZER_VERSION = 1
# a pre-token: optional word-start marker, then a word (letters, inner apostrophes), a number, or punctuation.
# Every non-space character falls in one branch, so nothing is lost; "▁" only ever appears as the prefix.
PAT = re.compile(r"▁?(?:[^\W\d_]+(?:['’][^\W\d_]+)*|\d+|(?:[^\w\s▁]|_)+)")
PAT_LINES = re.compile(PAT.pattern + r"|\n")  # corpus encoding: "\n" between lines becomes [SEP] [CLS]
MAX_PRETOKEN = 64  # longer pre-tokens are cut into 64-character chunks before BPE: one pathological line
                   # (a 5 MB word) would otherwise make every merge rescan it

# -----------------------------------------------------------------------------
# pre-tokenization: text -> words, numbers and punctuation runs, each marked where a word starts

def pre_tokenize(text):
    """Example: "I walked, (walked) 42x" -> ["▁I", "▁walked", ",", "▁(", "walked", ")", "▁42", "x"]."""
    return PAT.findall("▁" + "▁".join(text.replace("▁", " ").split())) if text else []

def chunks(word):
    """A pre-token cut into pieces of at most MAX_PRETOKEN characters. Example (cap 4): "▁abcdefghi" ->
    ["▁abc", "defg", "hi"]."""
    return [word[i:i + MAX_PRETOKEN] for i in range(0, len(word), MAX_PRETOKEN)] if word else []

# -----------------------------------------------------------------------------
# BPE training: the plain way, then the same merges fast

def merge(ids, pair, new):
    """Replace each non-overlapping occurrence of pair, left to right. Example: [1,1,1], (1,1), 9 -> [9,1]."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

def learn_merges_simply(words, freqs, n_merges, next_id):
    """BPE training, the plain way (what learn_merges computes, much faster): count every adjacent pair
    of ids, weighted by how often each word occurs; merge the most frequent pair everywhere (ties -> the
    smallest (a, b)) into the next id; repeat. Words are lists of ids.
    Example: words [[a,b,a,b]] x3, [[a,b]] x1 -> merges [(a,b)=7 times, (ab,ab)=3 times]."""
    words, merges = [list(w) for w in words], []
    for new in range(next_id, next_id + n_merges):
        counts = Counter()
        for w, f in zip(words, freqs):
            for pair in zip(w, w[1:]):
                counts[pair] += f
        if not counts:
            break  # every word is one token: the corpus is exhausted before vocab_size
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        words = [merge(w, pair, new) for w in words]
    return merges

def learn_merges(words, freqs, n_merges, next_id, quiet=True):
    """learn_merges_simply, fast: the pair counts are kept up to date instead of recounted, and each merge
    touches only the words that contain the pair (an index from pair to words). A heap with lazy deletion
    picks the most frequent pair, ties -> smallest (a, b) ids. Words are modified in place.
    Example: words [[a,b,a,b]] x3, [[a,b]] x1 -> merges [(a,b)=7 times, (ab,ab)=3 times]."""
    counts, where = defaultdict(int), defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            counts[p] += f
            where[p].add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    bar = dict(desc="bpe merges", mininterval=1, disable=True if quiet else None)  # None: off when not a terminal
    for new in tqdm(range(next_id, next_id + n_merges), **bar):
        while heap:  # pop until an entry matches the live count; entries go stale when counts drop
            c, pair = heapq.heappop(heap)
            live = counts.get(pair, 0)
            if live == -c:
                break
            if 0 < live < -c:
                heapq.heappush(heap, (-live, pair))
        else:
            break  # no pairs left: the corpus is exhausted before vocab_size
        merges.append(pair)
        grown = set()
        for i in where.pop(pair):
            w = words[i]
            out = merge(w, pair, new)
            if len(out) == len(w):
                continue  # stale index entry: an earlier merge already consumed the pair here
            f = freqs[i]
            for p in zip(w, w[1:]):
                counts[p] -= f
            for p in zip(out, out[1:]):
                counts[p] += f
                if new in p:
                    where[p].add(i)
                    grown.add(p)
            words[i] = out
        del counts[pair]
        for p in grown:
            heapq.heappush(heap, (-counts[p], p))
    return merges

# -----------------------------------------------------------------------------
# N-hot sub-token units: a token's character 1-3-grams

def subtoken_units(token, n=3):
    """Character n-grams (1..n) of a token, with "<" for a word start ("▁") and ">" for the token's end
    (the bare ">" is dropped: every token has it). Example, n=3: "▁walked" -> "<walked>" ->
    < w a l k e d | <w wa al lk ke ed d> | <wa wal alk lke ked ed>  (20 units; "ed>" is shared with
    "▁jumped" but not with "▁edge", whose "ed" is inner)."""
    s = ("<" + token[1:] if token.startswith("▁") else token) + ">"
    units = dict.fromkeys(s[i:i + k] for k in range(1, n + 1) for i in range(len(s) - k + 1))
    units.pop(">", None)
    return list(units)

# -----------------------------------------------------------------------------
# the tokenizer

def _tokenizer_json_problem(s):
    """What is wrong with a tokenizer JSON string, or None. Example: '{"format": "x"}' -> "format is 'x'"."""
    try:
        d = json.loads(s)
    except ValueError:
        return "not valid JSON"
    if not isinstance(d, dict):
        return "not a JSON object"
    for key, want in (("format", "amlm-bpe"), ("version", TOKENIZER_VERSION), ("pattern", PAT.pattern)):
        if d.get(key) != want:
            return f"{key} is {d.get(key)!r}"
    a, m = d.get("alphabet"), d.get("merges")
    if not isinstance(a, list) or a[:1] != ["▁"] or len(set(map(str, a))) != len(a):
        return "the alphabet must be a list of distinct characters starting with ▁"
    if not all(isinstance(c, str) and len(c) == 1 for c in a):
        return "an alphabet entry is not one character"
    if not isinstance(m, list):
        return "merges is not a list"
    for i, p in enumerate(m):  # merge i may only use the alphabet and the i earlier merges
        if not (isinstance(p, list) and len(p) == 2 and all(type(x) is int and FIRST_CHAR <= x < FIRST_CHAR + len(a) + i for x in p)):
            return f"merge {i} is not a pair of earlier ids"
    if d.get("vocab_size") != FIRST_CHAR + len(a) + len(m):
        return f"vocab_size {d.get('vocab_size')!r} does not match the alphabet and merges"
    return None

class _WordCache(dict):
    """pre-token -> tuple of ids, computed on first use (the per-word encode cache)."""
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __missing__(self, word):
        ids = self[word] = tuple(self.fn(word))
        return ids

class Tokenizer:
    """Character BPE with byte fallback (see the module docstring). Build with Tokenizer.train or load."""

    def __init__(self, alphabet, merges):
        self.alphabet, self.merges = list(alphabet), [tuple(p) for p in merges]
        self.tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + self.alphabet
        self._char_id = {ch: FIRST_CHAR + i for i, ch in enumerate(self.alphabet)}
        # splits a word into [alphabet run, foreign run, alphabet run, ...]; foreign characters become bytes
        self._foreign = re.compile(f"([^{re.escape(''.join(self.alphabet))}]+)")
        self._ranks = {}  # pair -> merged id; ids grow with rank, so the smallest id is the earliest merge
        for new, (a, b) in enumerate(self.merges, len(self.tokens)):
            self._ranks[(a, b)] = new
            self.tokens.append(self.tokens[a] + self.tokens[b])
        self.vocab_size = len(self.tokens)
        self._cache = _WordCache(self._encode_word)

    @classmethod
    def train(cls, texts_or_counts, vocab_size, quiet=True):
        """Learn merges from texts (str or iterable of str) or a {pre-token: count} mapping. The vocabulary
        may end up smaller than vocab_size if the corpus runs out of pairs. Example: train({"abab": 3, "ab": 1},
        266) -> alphabet ▁ a b (ids 261-263), merges a+b (7 times) then ab+ab (3 times): tokens[-2:] == ["ab",
        "abab"], and encode("abab") == [261, 265]."""
        counts = texts_or_counts
        if isinstance(counts, str):
            counts = [counts]
        if not hasattr(counts, "items"):
            counts = Counter(chain.from_iterable(map(pre_tokenize, counts)))
        chars = Counter()
        for w, c in counts.items():
            for ch in w:
                chars[ch] += c
        alphabet = ["▁"] + sorted((ch for ch, c in chars.items() if c >= MIN_CHAR_COUNT and ch != "▁"),
                                  key=lambda ch: (-chars[ch], ch))
        if vocab_size < FIRST_CHAR + len(alphabet):
            raise DataError(f"vocab size {vocab_size} is smaller than the {FIRST_CHAR + len(alphabet)} base tokens "
                            f"(5 specials, 256 bytes, {len(alphabet)} characters); use a larger --vocab-size")
        tok = cls(alphabet, [])
        seg = Counter()  # words split at out-of-alphabet characters, which never take part in merges
        for w, c in counts.items():
            for piece in chunks(w):
                for run in tok._foreign.split(piece)[::2]:
                    seg[run] += c
        del seg[""]
        strings = list(seg)
        words = [[tok._char_id[ch] for ch in s] for s in strings]
        merges = learn_merges(words, list(seg.values()), vocab_size - tok.vocab_size, tok.vocab_size, quiet)
        tok = cls(alphabet, merges)
        tok._cache.update(zip(strings, map(tuple, words)))  # training already segmented every corpus word
        return tok

    def _bpe(self, chars):
        ids = [self._char_id[ch] for ch in chars]
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self._ranks.get(p, 1 << 62))
            if pair not in self._ranks:
                break
            ids = merge(ids, pair, self._ranks[pair])
        return ids

    def _encode_word(self, word):
        """BPE within runs of alphabet characters; other characters become their UTF-8 byte ids.
        Example: "▁a☃b" -> [id("▁a"), 231, 157, 136, id("b")] (☃ = E2 98 83)."""
        if len(word) > MAX_PRETOKEN:
            return list(chain.from_iterable(map(self._cache.__getitem__, chunks(word))))
        parts = self._foreign.split(word)
        if len(parts) == 1:
            return self._bpe(word)
        ids = []
        for i, part in enumerate(parts):
            ids += [FIRST_BYTE + b for b in part.encode("utf-8", "surrogatepass")] if i % 2 else self._cache[part]
        return ids

    def encode(self, text):
        """Text -> ids, no specials. Example: encode("Hi 🦊") -> [id("▁Hi"), id("▁"), 245, 164, 171, 143]."""
        return list(chain.from_iterable(map(self._cache.__getitem__, pre_tokenize(text))))

    def encode_words(self, text):
        """Like encode, grouped per pre-token (a word, number or punctuation run; for PLL-word-l2r).
        Example: "I walked." -> [[id("▁I")], [id("▁walk"), id("ed")], [id(".")]]."""
        return [list(self._cache[w]) for w in pre_tokenize(text)]

    def encode_lines(self, lines):
        """Marked lines (see read_lines) -> flat array [CLS] line1 [SEP] [CLS] line2 [SEP] ... (uint16 if it fits)."""
        lookup = _WordCache(self._encode_word)
        lookup.update(self._cache)
        lookup["\n"] = (SEP, CLS)
        out = array.array("H" if self.vocab_size <= 65535 else "i")
        for i in range(0, len(lines), 50_000):  # big chunks: one findall, a C-level map, no per-token Python
            out.append(CLS)
            out.extend(chain.from_iterable(map(lookup.__getitem__, PAT_LINES.findall("\n".join(lines[i:i + 50_000])))))
            out.append(SEP)
        return np.frombuffer(out, dtype=np.uint16 if out.typecode == "H" else np.int32).copy()

    def decode(self, ids):
        """Ids -> text, specials skipped, byte runs decoded as UTF-8. Example: decode(encode(" a  b")) -> "a b"."""
        out, buf = [], bytearray()
        for i in map(int, ids):
            if FIRST_BYTE <= i < FIRST_CHAR:
                buf.append(i - FIRST_BYTE)
                continue
            if buf:
                out.append(buf.decode("utf-8", "replace"))
                buf.clear()
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i >= FIRST_CHAR:
                out.append(self.tokens[i])
        out.append(buf.decode("utf-8", "replace"))
        s = "".join(out).replace("▁", " ")
        return s[1:] if s.startswith(" ") else s

    def subtoken_table(self, n=3, min_count=2, max_units=8192):
        """N-hot table for the model: row i lists unit ids of token i (see subtoken_units), padded with -1.
        Units kept if found in >= min_count vocabulary entries, the max_units most frequent (ties by name).
        Specials and bytes get no units; a token is never its own unit (the model adds its embedding anyway).
        Returns (LongTensor (vocab_size, max units per token), unit names)."""
        per = [subtoken_units(t, n) if i >= FIRST_CHAR else [] for i, t in enumerate(self.tokens)]
        df = Counter(chain.from_iterable(per))
        units = sorted((u for u, c in df.items() if c >= min_count), key=lambda u: (-df[u], u))[:max_units]
        index = {u: i for i, u in enumerate(units)}
        rows = [[index[u] for u in us if u in index] for us in per]
        table = np.full((len(rows), max(1, max(map(len, rows)))), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        return torch.from_numpy(table), units

    def to_json(self):
        """The tokenizer as a JSON string: format, version, pattern, vocab_size, alphabet, merges.
        Example: -> '{"format": "amlm-bpe", "version": 1, "pattern": "▁?(?:...", "vocab_size": 266, ...}'"""
        return json.dumps({"format": "amlm-bpe", "version": TOKENIZER_VERSION, "pattern": PAT.pattern,
                           "vocab_size": self.vocab_size, "alphabet": self.alphabet, "merges": self.merges},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, s):
        """The inverse of to_json; DataError naming the first problem if s is not a tokenizer it wrote."""
        problem = _tokenizer_json_problem(s)
        if problem:
            raise DataError(f"not an amlm tokenizer of this version: {problem}")
        d = json.loads(s)
        return cls(d["alphabet"], d["merges"])

    def save(self, path):
        """to_json() into a file, through a temporary one renamed into place. Example: tok.save("tokenizer.json")"""
        tmp = Path(f"{path}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        """A tokenizer saved with save(); DataError naming the file and the problem. Example: Tokenizer.load("t.json")"""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, DataError) as e:
            raise DataError(f"{path}: {e}") from None

