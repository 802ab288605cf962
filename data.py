"""
Everything between raw text and packed token batches, for amlm: a PyTorch reimplementation of Edman & Fraser,
"Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    corpus (name or path) -> checked UTF-8 lines -> tokenizer.py's BPE -> flat cached token array -> (B, T) batches
                                                                      `-> the N-hot table for the model

    d = prepare("synthetic", "data", vocab_size=1000)   # d.tokenizer, d.train (flat ids), d.nhot_table, ...
    x = Batches(d.train, block_size=256, seed=0).next(batch_tokens=4096, seq_len=64)   # (64, 64) ids

Run:  python data.py --corpus synthetic            (offline, seconds)
      python data.py --corpus babylm_10M --data-dir data --vocab-size 16384

A corpus is text: UTF-8 *.train or *.txt files. A file that holds a NUL byte or is not valid UTF-8 is refused,
naming the file and the byte offset; a zip archive is refused with the advice to unzip it. The tokenizer is
trained and the corpus encoded once, then cached under <data_dir>/cache/<key>/ and checked at every load.
"""
import hashlib, json, os, random, shutil, sys, time, urllib.request, zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.errors import ArgumentParser, DataError
from lib.run import wrote_by_train
from tokenizer import CLS, MASK, MAX_PRETOKEN, MIN_CHAR_COUNT, PAD, PAT, SEP, SPECIALS, TOKENIZER_VERSION, UNK, Tokenizer

VAL_EVERY = 150                             # non-empty line k is validation iff k % 150 == 0 (0.67 %)
CACHE_VERSION = 1
DOWNLOADS = {"babylm_10M": ("https://osf.io/download/5mk3x/", "dc67e5d2db96ed4f76cb072e2504a18c")}
KNOWN = ["babylm_10M", "babylm_100M", "synthetic"]
CHECK_BYTES = 256 << 20  # bytes hashed per cache file; larger files are sampled, so a check costs well under a second

class CacheError(DataError):
    """A token cache that fails its check (missing, truncated or altered file): rebuilt, never loaded."""

# ----------------------------------------------------------------------------- corpus

def is_run_output(file):
    """Whether a text file is train.py's own output, never corpus text: anything in a run folder (one holding
    latest.pt or train.lock), or a log.txt that opens with train.py's "config: " line.
    Example: out/run/log.txt -> True; books/alice.txt -> False."""
    if (file.parent / "latest.pt").exists() or (file.parent / "train.lock").exists():
        return True
    return file.name == "log.txt" and wrote_by_train(file.parent)

def find_files(path):
    """Text files of a corpus path: the file itself, or a folder's *.train/*.txt, sorted, recursively (hidden files,
    __MACOSX zip debris and train.py's own outputs skipped). Example: dir with b.txt, a/c.train -> [a/c.train, b.txt]."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".train", ".txt") and p.is_file()
                  and not any(s.startswith((".", "__MACOSX")) for s in p.relative_to(path).parts)
                  and not is_run_output(p))

def _urlopen(url):
    return urllib.request.urlopen(url, timeout=60)  # a dead network fails instead of hanging forever

def download(url, dest, md5=None, opener=_urlopen, quiet=False):
    """Download url to dest via dest.part (renamed only when complete); an md5 mismatch is a loud warning."""
    dest, part, h = Path(dest), Path(str(dest) + ".part"), hashlib.md5()
    try:
        with opener(url) as r, open(part, "wb") as f:
            size = int(getattr(r, "headers", {}).get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=True if quiet else None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk), h.update(chunk), bar.update(len(chunk))
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({getattr(e, 'reason', e)})") from None
    if md5 and h.hexdigest() != md5:
        print(f"WARNING: {dest.name} has md5 {h.hexdigest()}, expected {md5}; using it anyway", file=sys.stderr)
    os.replace(part, dest)

def safe_extract(zip_path, target):
    """Extract a zip into target via a temporary folder, refusing members that would land outside it
    (absolute paths, "../"); on any failure nothing is left behind. Example: member "../evil" -> DataError."""
    target = Path(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            for m in z.infolist():
                parts = Path(m.filename.replace("\\", "/")).parts
                if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise DataError(f"refusing to extract {zip_path}: member {m.filename!r} escapes the target folder")
            z.extractall(tmp, [m for m in z.infolist() if not m.filename.startswith("__MACOSX")])
        os.replace(tmp, target)
    except zipfile.BadZipFile:
        raise DataError(f"{zip_path} is not a valid zip file") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def synthetic_text(n_sentences=40_000, seed=0):
    """A deterministic English-like corpus from a tiny grammar with regular morphology (walk/walked/walks/
    walking, happy/happiness/happily, real/reality, baby/babies); ~320k words in ~0.2 s.
    Example: synthetic_text(2) -> "The calm farmer followed a baby.\\nDid the ..." (one sentence per line)."""
    rng = random.Random(seed)
    nouns = "dog cat bird teacher farmer king queen doctor student girl boy horse friend baker baby puppy".split()
    verbs = "walk jump help call watch visit follow paint clean push kick like love wash chase kiss".split()
    adjs = "happy kind dark quick sad bright calm weak soft brave silly lazy".split()
    adjs_ity = "active real formal normal equal rapid solid humid timid stupid".split()
    places = "park garden river house school market forest".split()
    names = "Anna Ben Clara David Emma Felix".split()
    y_ies = lambda w, end: w[:-1] + "i" + end if w[-1] == "y" and w[-2] not in "aeiou" else None  # baby -> babies
    plural = {n: y_ies(n, "es") or n + "s" for n in nouns}
    past = {v: v + "d" if v.endswith("e") else v + "ed" for v in verbs}
    third = {v: v + "es" if v.endswith(("sh", "ch", "ss")) else v + "s" for v in verbs}
    ing = {v: v[:-1] + "ing" if v.endswith("e") else v + "ing" for v in verbs}
    ness = [y_ies(a, "ness") or a + "ness" for a in adjs]
    ity = [a[:-1] + "ity" if a.endswith("e") else a + "ity" for a in adjs_ity]
    adv = [y_ies(a, "ly") or a + "ly" for a in adjs]
    c = rng.choice
    templates = [
        lambda: f"the {c(adjs)} {c(nouns)} {past[c(verbs)]} {c(['the', 'a'])} {c(nouns)}.",
        lambda: f"the {plural[c(nouns)]} {c(verbs)} the {c(adjs)} {plural[c(nouns)]} in the {c(places)}.",
        lambda: f"a {c(nouns)} {third[c(verbs)]} the {c(nouns)} {c(adv)}.",
        lambda: f"the {c(ness)} of the {c(nouns)} {past[c(verbs)]} the {plural[c(nouns)]}.",
        lambda: f"did the {c(nouns)} {c(verbs)} the {c(nouns)}?",
        lambda: f"the {c(nouns)} was {ing[c(verbs)]} {c(adv)} near the {c(places)}.",
        lambda: f"{c(names)} said that the {c(ity)} of the {c(nouns)} {past[c(verbs)]} everyone.",
    ]
    return "\n".join(s[0].upper() + s[1:] for s in (c(templates)() for _ in range(n_sentences))) + "\n"

def resolve_corpus(corpus, data_dir="data", quiet=False, opener=_urlopen):
    """Turn --corpus into a list of text files: a path, `synthetic` (written to <data_dir>/synthetic/),
    or a BabyLM name looked up as <data_dir>/<name>/ and downloaded there if absent."""
    data_dir = Path(data_dir)
    if corpus == "synthetic":
        path = data_dir / "synthetic" / "synthetic.train"
        if not path.exists():  # written once, so its mtime (part of the cache key) stays put
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".tmp").write_text(synthetic_text(), encoding="utf-8")
                os.replace(path.with_suffix(".tmp"), path)
            except OSError as e:
                raise DataError(f"data dir {data_dir} is not writable ({e.strerror or e}); "
                                "pass --data-dir with a writable folder") from None
        return [path]
    if corpus in KNOWN:
        folder = data_dir / corpus
        if not (folder.is_dir() and find_files(folder)):
            if corpus not in DOWNLOADS:
                raise DataError(f"{corpus} is not in {folder}/; download train_100M.zip from the BabyLM OSF "
                                f"project (https://osf.io/ad7qg/) and unzip its *.train files there")
            url, md5 = DOWNLOADS[corpus]
            zip_path = data_dir / f"{corpus}.zip"
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                download(url, zip_path, md5, opener, quiet)
            except DataError as e:
                raise DataError(f"{e}; without network, put the BabyLM *.train files into {folder}/") from None
            safe_extract(zip_path, folder)
            zip_path.unlink()
        corpus = folder
    path = Path(corpus)
    if not path.exists():
        raise DataError(f"unknown corpus {str(corpus)!r}: not an existing file or folder, "
                        f"nor one of {', '.join(KNOWN)}")
    if path.is_file() and zipfile.is_zipfile(path):
        raise DataError(f"{path} is a zip archive: unzip it and pass the folder (the BabyLM train_10M.zip: put its "
                        f"*.train files into {data_dir / 'babylm_10M'}/ and use --corpus babylm_10M)")
    files = find_files(path)
    if not files:
        zips = sorted(path.glob("*.zip")) if path.is_dir() else []
        raise DataError(f"corpus folder {path} holds no *.train or *.txt files" +
                        (f" ({zips[0].name} is a zip archive: unzip it there first)" if zips else ""))
    return files

def read_text(file):
    """A corpus file's text, checked to be text: DataError naming the file and the byte offset of the first NUL byte
    or the first byte that is not valid UTF-8 (a binary file, a zip given as a corpus, a Latin-1 text).
    Example: a file b"caf\xe9" -> DataError("x.txt is not UTF-8 text: byte 3 is 0xE9 ...")."""
    try:
        raw = Path(file).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {file} ({e.strerror or e})") from None
    nul = raw.find(b"\0")
    try:
        text = raw[:nul if nul >= 0 else len(raw)].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text: byte {e.start} is 0x{raw[e.start]:02X}; convert it to UTF-8 "
                        "first") from None
    if nul >= 0:
        raise DataError(f"{file} is not a text file: byte {nul} is a NUL byte")
    return text

def read_lines(files):
    """Normalised non-empty lines, split into (train, val, n_train_words); every VAL_EVERY-th line is held out.
    Lines come back word-start-marked: "  Hi  there " -> "▁Hi▁there"."""
    train, val, n_words, k = [], [], 0, 0
    for f in files:
        for line in read_text(f).replace("▁", " ").splitlines():
            words = line.split()
            if words:
                if k % VAL_EVERY == 0:
                    val.append("▁" + "▁".join(words))
                else:
                    train.append("▁" + "▁".join(words))
                    n_words += len(words)
                k += 1
    return train, val, n_words

# ----------------------------------------------------------------------------- cache + prepare

@dataclass
class Data:
    """What prepare returns; n_train_words counts whitespace words, n_train_tokens includes [CLS]/[SEP]."""
    tokenizer: Tokenizer
    train: np.ndarray          # flat ids, memmapped; each line is [CLS] ... [SEP]
    val: np.ndarray
    nhot_table: torch.Tensor   # (vocab_size, max_units) LongTensor, pad -1
    units: list
    n_train_words: int
    n_train_tokens: int
    key: str
    cache_dir: Path
    info: dict

def cache_key(files, vocab_size):
    """Hash of everything the cached arrays depend on: files (name, size, mtime) and tokenizer settings."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([stats, vocab_size, PAT.pattern, MAX_PRETOKEN, TOKENIZER_VERSION, CACHE_VERSION,
                                      MIN_CHAR_COUNT, VAL_EVERY]).encode()).hexdigest()[:16]

def checksum(x, limit=CHECK_BYTES):
    """blake2b (128 bits, hex) of the bytes of an array or a bytes object; one over `limit` bytes is hashed
    over `limit` bytes of it, in 256 slices spread evenly, so checking a cache stays about as cheap as
    loading it. Example: checksum(b"abc") == hashlib.blake2b(b"abc", digest_size=16).hexdigest()."""
    b = memoryview(x if isinstance(x, bytes) else np.ascontiguousarray(x)).cast("B")
    h = hashlib.blake2b(digest_size=16)
    if len(b) <= limit:
        h.update(b)
    else:
        size, stride = limit // 256, len(b) // 256
        for i in range(256):
            h.update(b[i * stride:i * stride + size])
    return h.hexdigest()

def load_cache(cache):
    """(tokenizer, train, val, meta) of a cache folder, each file checked against meta.json's lengths and
    checksums first; CacheError naming the first problem otherwise. Example: a train.npy cut short ->
    CacheError("train.npy is unreadable (ValueError)")."""
    try:
        meta = json.loads((cache / "meta.json").read_text())
    except FileNotFoundError:
        raise CacheError("no meta.json") from None
    except (OSError, ValueError):
        raise CacheError("meta.json is unreadable") from None
    checks = meta.get("checks") if isinstance(meta, dict) else None
    if not isinstance(checks, dict):
        raise CacheError("meta.json holds no checksums, so the cache cannot be checked")
    arrays = {}
    for name in ("train.npy", "val.npy"):
        try:
            arrays[name] = np.load(cache / name, mmap_mode="r")  # a truncated file fails here, before any use
        except (OSError, ValueError, EOFError) as e:
            raise CacheError(f"{name} is unreadable ({type(e).__name__})") from None
        if arrays[name].ndim != 1 or arrays[name].dtype not in (np.uint16, np.int32):
            raise CacheError(f"{name} is not a flat array of token ids")
    try:
        tok_bytes = (cache / "tokenizer.json").read_bytes()
    except OSError:
        raise CacheError("tokenizer.json is unreadable") from None
    for name, x in (*arrays.items(), ("tokenizer.json", tok_bytes)):
        if checks.get(name) != [len(x), checksum(x)]:
            raise CacheError(f"{name} does not match the checksum in meta.json")
    try:
        tok = Tokenizer.from_json(tok_bytes.decode("utf-8"))
    except (UnicodeDecodeError, DataError) as e:
        raise CacheError(f"tokenizer.json: {e}") from None
    return tok, arrays["train.npy"], arrays["val.npy"], meta

def _discard(cache):
    """Move a failed cache out of the way at once (one rename), then delete it."""
    trash = cache.with_name(f"{cache.name}.bad{os.getpid()}")
    try:
        os.replace(cache, trash)
    except OSError:
        pass  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)

def _build_cache(files, vocab_size, cache, quiet):
    train, val, n_words = read_lines(files)
    if not train:
        raise DataError(f"the corpus ({len(files)} file(s) starting with {files[0]}) holds no text, or a single line")
    counts = Counter()
    for i in range(0, len(train), 50_000):  # chunked so the pre-token lists stay small
        counts.update(PAT.findall("".join(train[i:i + 50_000])))
    if not quiet:
        print(f"data: {len(files)} files, {len(train):,} lines, {n_words:,} words; {len(counts):,} distinct "
              f"pre-tokens; training BPE up to {vocab_size:,} tokens, then encoding", file=sys.stderr)
    tok = Tokenizer.train(counts, vocab_size, quiet=quiet)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")  # renamed into place only when complete
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        tr, va = tok.encode_lines(train), tok.encode_lines(val)
        np.save(tmp / "train.npy", tr), np.save(tmp / "val.npy", va)
        tok.save(tmp / "tokenizer.json")
        meta = {"files": [str(f) for f in files], "lines": len(train), "words": n_words, "tokens": len(tr),
                "val_lines": len(val), "val_tokens": len(va), "tokens_per_word": (len(tr) - 2 * len(train)) / n_words,
                "checks": {name: [len(x), checksum(x)] for name, x in  # lengths: items of an array, bytes of a file
                           (("train.npy", tr), ("val.npy", va), ("tokenizer.json", (tmp / "tokenizer.json").read_bytes()))}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: the checks cover every other file
        if not (cache / "meta.json").exists():  # else another process finished first: keep its copy
            shutil.rmtree(cache, ignore_errors=True)  # an incomplete cache folder is never trusted
            os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def prepare(corpus, data_dir="data", vocab_size=16384, quiet=False):
    """Resolve the corpus, train the tokenizer and tokenize once (cached under <data_dir>/cache/<key>/),
    and return a Data. Example: prepare("synthetic", "/tmp/d", 1000).train[:3] -> [CLS, id("▁The"), ...]."""
    t0, data_dir = time.time(), Path(data_dir)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"vocab size must be a positive integer, got {vocab_size!r}")
    files = resolve_corpus(corpus, data_dir, quiet)  # first: a corpus that is not there leaves no folder behind
    try:
        (data_dir / "cache").mkdir(parents=True, exist_ok=True)
        probe = data_dir / "cache" / f".probe{os.getpid()}"
        probe.write_bytes(b""), probe.unlink()
    except OSError as e:
        raise DataError(f"data dir {data_dir} is not writable ({e.strerror or e}); "
                        "pass --data-dir with a writable folder") from None
    key = cache_key(files, vocab_size)
    cache = data_dir / "cache" / key
    try:
        tok, train, val, info = load_cache(cache)
        hit = True
    except CacheError as e:
        if cache.exists():  # a missing cache is a plain miss; a broken one is said, and never loaded
            print(f"data: the token cache {cache} fails its check ({e}); rebuilding it", file=sys.stderr)
            _discard(cache)
        try:
            _build_cache(files, vocab_size, cache, quiet)
        except OSError as e:  # a full disk: _build_cache leaves no half-written folder
            raise DataError(f"cannot write the token cache {cache} ({e.strerror or e})") from None
        try:
            tok, train, val, info = load_cache(cache)
        except CacheError as e:  # a full disk, or another process breaking it meanwhile
            raise DataError(f"the token cache {cache} fails its check right after being built ({e})") from None
        hit = False
    if tok.vocab_size < vocab_size and not quiet:
        print(f"data: the corpus has no pair of tokens left to merge at {tok.vocab_size:,} tokens, so the vocabulary "
              f"stops there, short of the {vocab_size:,} asked for (--vocab-size)", file=sys.stderr)
    table, units = tok.subtoken_table()
    info.update(corpus=str(corpus), vocab_size=tok.vocab_size, units=len(units), cache_hit=hit,
                seconds=round(time.time() - t0, 2), cache=str(cache))
    return Data(tok, train, val, table, units, info["words"], len(train), key, cache, info)

# ----------------------------------------------------------------------------- packing

class Batches:
    """Packed training batches. The flat token array is cut into contiguous blocks of block_size; each epoch
    visits every block once in a seeded random order. next(batch_tokens, seq_len) takes batch_tokens //
    block_size blocks and splits each into block_size // seq_len rows, so changing seq_len mid-run keeps the
    data order and the tokens per batch. Example: 1024 tokens, block 256 -> 4 blocks; next(512, 64) ->
    (8, 64): rows 0-3 are one block, rows 4-7 another; after two calls epoch == 1."""

    def __init__(self, tokens, block_size=256, seed=0):
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.n_blocks = len(tokens) // block_size  # the tail shorter than a block is dropped
        if self.n_blocks == 0:
            raise DataError(f"the corpus has {len(tokens)} tokens, fewer than one block of {block_size}")
        self.epoch, self.pos, self._perm = 0, 0, None

    def _order(self):
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n_blocks))
        return self._perm[1]

    def next(self, batch_tokens, seq_len):
        bs = self.block_size
        if seq_len < 1 or bs % seq_len or batch_tokens < bs or batch_tokens % bs:
            raise DataError(f"need seq_len dividing block_size {bs} and batch_tokens a multiple of it, "
                            f"got seq_len {seq_len}, batch_tokens {batch_tokens}")
        need, picks = batch_tokens // bs, []
        while need:  # may run over into the next epoch
            take = self._order()[self.pos:self.pos + need]
            picks.append(take)
            self.pos, need = self.pos + len(take), need - len(take)
            if self.pos == self.n_blocks:
                self.epoch, self.pos = self.epoch + 1, 0
        idx = np.concatenate(picks)
        rows = np.asarray(self.tokens[(idx[:, None] * bs + np.arange(bs)).ravel()], dtype=np.int64)
        return torch.from_numpy(rows).view(-1, seq_len)

    def state_dict(self):
        return {"seed": self.seed, "block_size": self.block_size, "n_blocks": self.n_blocks,
                "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d):
        if (d["block_size"], d["n_blocks"]) != (self.block_size, self.n_blocks):
            raise DataError(f"batch state is for {d['n_blocks']} blocks of {d['block_size']}, "
                            f"but this data has {self.n_blocks} blocks of {self.block_size}")
        self.seed, self.epoch, self.pos = int(d["seed"]), int(d["epoch"]), int(d["pos"])

# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = ArgumentParser(prog="data.py", description="Prepare a corpus: tokenizer, cached tokens, sub-token units.")
    p.add_argument("--corpus", required=True, help=f"a file, a folder, or one of {', '.join(KNOWN)}")
    p.add_argument("--data-dir", default="data", help="where downloads and caches go (default: data)")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        d = prepare(args.corpus, args.data_dir, args.vocab_size, args.quiet)
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 1
    i = d.info
    print(f"corpus {i['corpus']}: {len(i['files'])} files, {i['lines']:,} lines, {i['words']:,} words, "
          f"{i['tokens']:,} tokens (train; val {i['val_tokens']:,})\n"
          f"tokens/word {i['tokens_per_word']:.3f} (without [CLS]/[SEP]), vocab {i['vocab_size']:,}, "
          f"sub-token units {i['units']:,} (max {d.nhot_table.shape[1]} per token)\n"
          f"{i['seconds']:.1f} s ({'cache hit' if i['cache_hit'] else 'built'}), cache {i['cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
