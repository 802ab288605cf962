"""
Tests for amlm: offline, fast, tiny shapes, the built-in synthetic corpus; never data from outside this repository, never the network.
Run: python -m pytest -q test_amlm.py   (speed targets live in the README and benchmarks, not here)
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall badly when cores are shared
import ast, hashlib, json, math, pickle, random, re, shutil, signal, socket, subprocess, sys, time, urllib.error, zipfile
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import tokenizer
import train
from amlm import AMLM, METRICS, STATISTICS, mask_rate
from data import Batches
from lib import compare, estimate, fast, optim, progress
from lib.errors import DataError, UserError
from lib.fast import FastMaskedLM, RotaryQKV, LinearCrossEntropy, NHotSum, dropout, dropout_add, dropout_mask
from model import MaskedLM, ModelConfig, apply_rope, rope_tables
from tokenizer import CLS, SEP, MASK, FIRST_BYTE, FIRST_CHAR, Tokenizer

# -----------------------------------------------------------------------------
# data.py: corpus, tokenizer, sub-token table, cache, packing

@pytest.fixture(scope="module")
def bpe_tok():
    return Tokenizer.train(data.synthetic_text(2000), 600)


def _normalised(s):  # the documented normalisation of decode(encode(s))
    return " ".join(s.replace("▁", " ").split())


def _write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _corpus_lines(n, seed=0):
    rng = random.Random(seed)
    words = "the dog cat walked jumped happiness kindness reality a big small house".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) + "." for _ in range(n)) + "\n"


# ----------------------------------------------------------------------------- tokenizer

def test_pre_tokenize_marks_word_starts():
    assert tokenizer.pre_tokenize("I walked, (walked) 42x") == ["▁I", "▁walked", ",", "▁(", "walked", ")", "▁42", "x"]
    assert tokenizer.pre_tokenize("didn't  stop...\n\tnow") == ["▁didn't", "▁stop", "...", "▁now"]
    assert tokenizer.pre_tokenize("") == [] and tokenizer.pre_tokenize(" \n ") == []


@pytest.mark.parametrize("s", [
    "", "a", "x", "Z", " ", "é", "🦊", "日本語のテキスト", "naïve café — “quoted” 🦊🦊!", "a\u2028b\u3000c\xa0d\x1ce",
    "tab\tand\nnewline  runs  ", "literal ▁ marker", "\0\x99 ctrl", "don't 'quote' 3.14 a_b __init__"])
def test_roundtrip(bpe_tok, s):
    assert bpe_tok.decode(bpe_tok.encode(s)) == _normalised(s)


def test_roundtrip_long_line_and_fuzz(bpe_tok):
    long = ("The happiness of the farmer 🦊 walked, " * 400).strip()
    assert len(long) > 10_000 and bpe_tok.decode(bpe_tok.encode(long)) == long
    rng = random.Random(1)
    alphabet = "ab cdeé🦊.,'’_ \t\n\u2028\u00a0▁1日-"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert bpe_tok.decode(bpe_tok.encode(s)) == _normalised(s), repr(s)


def test_unknown_characters_fall_back_to_bytes(bpe_tok):
    ids = bpe_tok.encode("🦊")
    assert ids[1:] == [FIRST_BYTE + b for b in "🦊".encode()] and bpe_tok.tokens[ids[0]] == "▁"
    assert data.UNK not in ids
    assert "\ufffd" in bpe_tok.decode(bpe_tok.encode("\ud800"))  # a lone surrogate: replaced, no crash
    assert bpe_tok.decode([FIRST_BYTE + 0xFF]) == "\ufffd"    # invalid UTF-8 bytes decode with replacement


def test_known_answer_merges():
    t = Tokenizer.train({"abab": 3, "ab": 1}, 266)
    assert t.alphabet == ["▁", "a", "b"] and t.vocab_size == 266
    assert t.merges == [(262, 263), (264, 264)] and t.tokens[-2:] == ["ab", "abab"]
    assert t.encode("abab ab") == [261, 265, 261, 264]  # "▁abab" -> ▁ + abab
    # ties break on the smallest ids (here: alphabet order by count, then character), not on dict order
    assert Tokenizer.train({"cd": 2, "ab": 2}, 268).tokens[-2:] == ["ab", "cd"]
    assert Tokenizer.train({"ab": 2, "cd": 2}, 268).tokens[-2:] == ["ab", "cd"]


def test_merge_handles_overlaps():
    assert tokenizer.merge([1, 1, 1], (1, 1), 9) == [9, 1]
    t = Tokenizer.train({"aaaa": 5}, FIRST_CHAR + 2 + 2)  # alphabet ▁ a, then aa, aaaa
    assert t.tokens[-2:] == ["aa", "aaaa"]


def test_long_pre_tokens_are_cut_before_bpe():
    # one 401-character word: without the cap, BPE would grow tokens of 128 and 256 characters out of it
    word = "▁" + "ab" * 200
    t = Tokenizer.train({word: 3, "▁cd": 2}, FIRST_CHAR + 5 + 12)
    assert max(len(tok) for tok in t.tokens) <= data.MAX_PRETOKEN
    assert "".join(tokenizer.chunks(word)) == word and [len(c) for c in tokenizer.chunks(word)] == [64] * 6 + [17]
    fresh = Tokenizer.from_json(t.to_json())  # empty cache: the cut happens in encoding too
    ids = fresh.encode(word[1:] + " cd")
    assert ids == [i for c in tokenizer.chunks(word) for i in fresh._bpe(c)] + fresh.encode("cd")
    assert fresh.decode(ids) == word[1:] + " cd" and t.encode(word[1:]) == fresh.encode(word[1:])


def test_training_is_deterministic_and_order_free():
    text = data.synthetic_text(500, seed=3)
    counts = Counter(tokenizer.pre_tokenize(text))
    a, b = Tokenizer.train(text, 500), Tokenizer.train(dict(reversed(list(counts.items()))), 500)
    assert a.to_json() == b.to_json() and a.vocab_size == 500


def test_training_cache_equals_fresh_encoding(bpe_tok):
    fresh = Tokenizer.from_json(bpe_tok.to_json())  # empty cache: pure merge-rank encoding
    text = data.synthetic_text(300, seed=7) + " Zebra 🦊 unseenword"
    assert fresh.encode(text) == bpe_tok.encode(text)


def test_encode_words_groups_encode(bpe_tok):
    s = "The happiness of the dogs walked, (quickly) 🦊!"
    words = bpe_tok.encode_words(s)
    assert len(words) == len(tokenizer.pre_tokenize(s)) and sum(words, []) == bpe_tok.encode(s)
    assert [bpe_tok.decode(w) for w in words][:2] == ["The", "happiness"]


def test_save_load_roundtrip(bpe_tok, tmp_path):
    bpe_tok.save(tmp_path / "bpe_tok.json")
    t2 = Tokenizer.load(tmp_path / "bpe_tok.json")
    assert t2.tokens == bpe_tok.tokens and t2.vocab_size == bpe_tok.vocab_size
    s = "The kindness of a baby 🦊."
    assert t2.encode(s) == bpe_tok.encode(s)
    assert json.loads((tmp_path / "bpe_tok.json").read_text())["version"] == data.TOKENIZER_VERSION


@pytest.mark.parametrize("bad,msg", [("", "not valid JSON"), ("{", "not valid JSON"), ("[]", "not a JSON object"),
                                     ('{"format": "amlm-bpe"}', "version is None"), ("not json at all", "not valid JSON")])
def test_corrupted_tokenizer_json(bpe_tok, tmp_path, bad, msg):
    (tmp_path / "t.json").write_text(bad)
    with pytest.raises(DataError, match=f"t.json: not an amlm tokenizer of this version: {msg}"):
        Tokenizer.load(tmp_path / "t.json")


@pytest.mark.parametrize("key,value,msg", [("merges", [[10**6, 1]], "merge 0 is not a pair of earlier ids"),
                                           ("version", 99, "version is 99"), ("vocab_size", 7, "vocab_size 7"),
                                           ("alphabet", ["a", "▁"], "starting with ▁"),
                                           ("alphabet", ["▁", "ab"], "not one character")])
def test_tampered_tokenizer_json(bpe_tok, key, value, msg):
    d = json.loads(bpe_tok.to_json())
    d[key] = value
    with pytest.raises(DataError, match=msg):
        Tokenizer.from_json(json.dumps(d))


def test_simple_bpe_learns_the_fast_trainers_merges():
    # the reference loop and the heap-and-index trainer agree merge for merge, ties included: the corpus has
    # many equal counts (a, b and c, d occur equally often) and overlapping pairs (aaaa)
    counts = Counter(tokenizer.pre_tokenize(data.synthetic_text(300, seed=5)))
    counts.update({"abab": 3, "cdcd": 3, "aaaa": 4, "ab": 1, "cd": 1, "xyxyx": 2})
    chars = sorted({ch for w in counts for ch in w})
    words = [[chars.index(ch) for ch in w] for w in counts]
    simple = tokenizer.learn_merges_simply(words, list(counts.values()), 1000, len(chars))  # runs out at 347
    fast = tokenizer.learn_merges([list(w) for w in words], list(counts.values()), 1000, len(chars))
    assert len(simple) == 347 and simple == fast
    ab = [[0, 1, 0, 1]] * 3 + [[0, 1]]  # the docstring's example
    assert tokenizer.learn_merges_simply(ab, [1] * 4, 5, 2) == [(0, 1), (2, 2)] == tokenizer.learn_merges(ab, [1] * 4, 5, 2)


def test_rare_characters_use_bytes():
    t = Tokenizer.train("ab ab ab ab ab ab q", 270)  # "q" seen once: not in the alphabet
    assert "q" not in t.alphabet and "a" in t.alphabet
    assert t.encode("q") == [FIRST_CHAR, FIRST_BYTE + ord("q")] and t.decode(t.encode("q ab")) == "q ab"


def test_vocab_smaller_than_alphabet():
    with pytest.raises(DataError, match="vocab size 100 is smaller"):
        Tokenizer.train("some text with letters " * 3, 100)


# ----------------------------------------------------------------------------- sub-token table

def test_subtoken_units_worked_example():
    assert tokenizer.subtoken_units("▁walked") == ["<", "w", "a", "l", "k", "e", "d", "<w", "wa", "al", "lk", "ke", "ed",
                                              "d>", "<wa", "wal", "alk", "lke", "ked", "ed>"]
    assert tokenizer.subtoken_units("ness") == ["n", "e", "s", "ne", "es", "ss", "s>", "nes", "ess", "ss>"]
    assert "ed>" not in tokenizer.subtoken_units("▁edge")  # inner "ed" differs from suffix "ed>"


def test_subtoken_table(bpe_tok):
    table, units = bpe_tok.subtoken_table()
    assert table.dtype == torch.long and table.shape[0] == bpe_tok.vocab_size
    assert table[:FIRST_CHAR].eq(-1).all()                  # specials and bytes: no units
    assert table.max() < len(units) and table.min() >= -1
    width = (table >= 0).sum(1)
    assert table.shape[1] == width.max()
    for row, w in zip(table, width):                        # padding only at the end of each row
        assert row[:w].ge(0).all() and row[w:].eq(-1).all()
    df = Counter(table[table >= 0].tolist())
    assert min(df.values()) >= 2 and len(df) == len(units)  # every unit is shared by >= 2 entries
    counts = [df[i] for i in range(len(units))]
    assert counts == sorted(counts, reverse=True)           # most frequent first
    i = bpe_tok.tokens.index("▁walked")
    names = [units[u] for u in table[i].tolist() if u >= 0]
    assert set(names) <= set(tokenizer.subtoken_units("▁walked")) and {"<", "w", "ed>", "d>"} <= set(names)
    assert "▁walked" not in units


def test_subtoken_table_cap(bpe_tok):
    table, units = bpe_tok.subtoken_table(max_units=10)
    assert len(units) == 10 and table.max() == 9
    t1, u1 = bpe_tok.subtoken_table(n=1)
    assert all(len(u) == 1 for u in u1)


def test_subtoken_sum_weights_count_units_after_the_filter():
    # the toy's vocabulary (toy_amlm.py part 4): k counts the units kept by the filter, not all 20 of each word
    words = ["▁walked", "▁talked", "▁jumped"]
    table, units = Tokenizer.subtoken_table(SimpleNamespace(tokens=["x"] * FIRST_CHAR + words))
    assert (table >= 0).sum(1)[FIRST_CHAR:].tolist() == [15, 15, 6] and table[:FIRST_CHAR].eq(-1).all()
    assert [units[u] for u in table[-1].tolist() if u >= 0] == ["<", "e", "d", "ed", "d>", "ed>"]
    torch.manual_seed(0)
    m = MaskedLM(ModelConfig(vocab_size=FIRST_CHAR + 3, n_layer=1, n_head=1, d_model=8, d_ff=8), nhot_table=table)
    E = m.embedding_matrix()
    for i, k in zip(range(FIRST_CHAR, FIRST_CHAR + 3), (15, 15, 6)):
        assert torch.allclose(m.nhot_w[i][m.nhot_w[i] > 0], torch.full((k,), k ** -0.5))
        expect = m.tok.weight[i] + m.sub.weight[table[i][table[i] >= 0]].sum(0) / math.sqrt(k)
        assert torch.allclose(E[i], expect, atol=1e-6)
    assert torch.equal(E[:FIRST_CHAR], m.tok.weight[:FIRST_CHAR])  # no units: the token's own vector


def test_walkthrough_points_at_the_lines_of_train_py():
    # docs/walkthrough.md's table names train.py's code with its line numbers: each must still be on that line
    lines = (Path(HERE) / "train.py").read_text().splitlines()
    cited = re.findall(r"`([^`]+)`, lines? (\d+)(?:-(\d+))?", (Path(HERE) / "docs" / "walkthrough.md").read_text())
    assert len(cited) >= 6
    for code, first, last in cited:
        head = re.split(r"\.\.\.|\(", code)[0].strip()  # "amlm.mask(x, ...)" -> "amlm.mask"
        span = lines[int(first) - 1:int(last or first)]
        assert any(head in line for line in span), f"docs/walkthrough.md: {code!r} is not on line(s) {first}-{last} of train.py"

def test_toy_matches_the_real_code(capsys):
    # toy_amlm.py (plain loops, torch only) must print what amlm.py, tokenizer.py and model.py compute
    import toy_amlm
    with torch.random.fork_rng():
        toy_amlm.main()
    out = capsys.readouterr().out
    num = lambda pattern: [float(x) for x in re.search(pattern, out).groups()]
    am = AMLM(4, special_ids=[0], mask_id=1, rate=0.15, ema=0.2, update_every=1)  # part 2: the worked example
    am.correct[2], am.total[2], am.total[3] = 9, 9, 9
    am.step(rate=0.15)
    assert num(r"A: w 0.15 -> ([\d.]+) -> rescaled ([\d.]+)") == [0.036, round(am.weights[2].item(), 4)]
    assert num(r"B: w 0.15 -> ([\d.]+) -> rescaled ([\d.]+)") == [0.144, round(am.weights[3].item(), 4)]
    am = AMLM(4, special_ids=[0], mask_id=1, rate=0.40, ema=0.2, update_every=1)  # part 2: the floored type
    am.weights = torch.tensor([0.0, 0.0, 0.01, 0.19])
    am.correct[2] = am.total[2] = 10**6
    am.step(rate=0.10)
    assert num(r"C: .* floored ([\d.]+) -> rescaled ([\d.]+)") == [0.005, round(am.weights[2].item(), 4)]
    assert num(r"D: -> ([\d.]+) -> rescaled ([\d.]+)")[1] == round(am.weights[3].item(), 4)
    am = make(8, rate=0.5)  # part 3: the budgeted probabilities
    am.weights[5], am.weights[6] = 1.0, 0.1
    pi = am.probabilities(torch.tensor([[CLS, 5, 6, 6, SEP]]))[0]
    assert num(r"pi = " + " ".join([r"([\d.]+)"] * 5)) == [round(x, 2) for x in pi.tolist()]
    assert abs(num(r"mean ([\d.]+)")[0] - pi.sum().item()) < 0.1  # 1000 draws: 4 standard errors
    words = ["▁walked", "▁talked", "▁jumped"]  # part 4: N-hot units, kept and weighted as the real table does
    table, units = Tokenizer.subtoken_table(SimpleNamespace(tokens=["x"] * FIRST_CHAR + words))
    for w, row in zip(words, table[FIRST_CHAR:]):
        kept = [units[u] for u in row.tolist() if u >= 0]
        line = re.search(rf"{w}: (\d+) units, (\d+) kept, k = \d+, each weighs 1/sqrt\(k\) = ([\d.]+): (.*)", out)
        assert int(line[1]) == len(tokenizer.subtoken_units(w)) and int(line[2]) == len(kept)
        assert float(line[3]) == round(len(kept) ** -0.5, 4) and line[4].split() == kept
    easy, hard = zip(*[map(float, m) for m in re.findall(r"w\(e\) ([\d.]+)  w\(r0\) ([\d.]+)", out)])
    assert len(easy) == 4 and easy[-1] < 0.15 < hard[-1]  # part 5: the easy type's weight fell, a hard one's rose
    # the toy's loop version of the update and of the probabilities, on random numbers, against the real ones
    g = torch.Generator().manual_seed(0)
    am = AMLM(9, special_ids=[0], mask_id=1, rate=0.3, update_every=1)
    am.weights[2:] = torch.rand(7, generator=g) * 0.3 + 0.001
    am.total[2:] = torch.randint(0, 20, (7,), generator=g)
    am.correct[2:] = (am.total[2:] * torch.rand(7, generator=g)).long()
    ids = range(2, 9)
    _, after = toy_amlm.update({t: am.weights[t].item() for t in ids}, {t: am.correct[t].item() for t in ids},
                               {t: am.total[t].item() for t in ids}, 0.2)
    am.update(rate=0.2)
    assert torch.allclose(torch.tensor([after[t] for t in ids]), am.weights[2:])
    x = batch(9, B=4, T=12, seed=1)
    x[0, 1:-1], x[0, 3] = 3, 8
    am.weights[8] = 5.0  # one heavy position in a row of light ones: capped at 1
    pi = am.probabilities(x, 0.3)
    assert torch.allclose(torch.tensor([toy_amlm.probabilities(am.weights[r].tolist(), 0.3) for r in x]), pi)
    assert pi[0, 3] == 1.0


# ----------------------------------------------------------------------------- corpus

def test_find_files_dir(tmp_path):
    for name in ["b.txt", "a/c.train", "a/skip.md", ".hidden.txt", "__MACOSX/a/._c.train"]:
        _write_text(tmp_path / name, "x\n")
    assert [p.relative_to(tmp_path).as_posix() for p in data.find_files(tmp_path)] == ["a/c.train", "b.txt"]


def test_prepare_path_file_and_cache(tmp_path):
    f = _write_text(tmp_path / "corpus.txt", _corpus_lines(400))
    before = sorted(os.listdir(tmp_path))
    d = data.prepare(str(f), tmp_path / "d", 400, quiet=True)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["d"])  # nothing written next to the corpus
    assert d.train.dtype == np.uint16 and isinstance(d.train, np.memmap)
    assert d.train[0] == CLS and d.train[-1] == SEP
    assert (d.train == CLS).sum() == (d.train == SEP).sum() == d.info["lines"] == 400 - 3
    assert d.info["val_lines"] == 3  # lines 0, 150, 300
    assert d.tokenizer.decode(d.val[: list(d.val).index(SEP)]) == _corpus_lines(400).splitlines()[0]
    assert d.n_train_tokens == len(d.train) and d.n_train_words == sum(
        len(line.split()) for k, line in enumerate(_corpus_lines(400).splitlines()) if k % 150)
    assert d.nhot_table.shape[0] == d.tokenizer.vocab_size and d.cache_dir.parent == tmp_path / "d" / "cache"
    d2 = data.prepare(str(f), tmp_path / "d", 400, quiet=True)
    assert d2.info["cache_hit"] and not d.info["cache_hit"] and d2.key == d.key
    assert np.array_equal(d.train, d2.train) and d2.tokenizer.tokens == d.tokenizer.tokens
    assert data.prepare(str(f), tmp_path / "d", 420, quiet=True).key != d.key  # tokenizer settings in the key
    os.utime(f, ns=(1, 1))
    assert data.prepare(str(f), tmp_path / "d", 400, quiet=True).key != d.key  # file mtime in the key


def test_prepare_path_dir_reads_all_files(tmp_path):
    _write_text(tmp_path / "c" / "a.train", _corpus_lines(200, 1))
    _write_text(tmp_path / "c" / "sub" / "b.txt", "Zebra zebras zebra.\n" * 50)
    _write_text(tmp_path / "c" / "README.md", "ignored Qqqq\n" * 50)
    d = data.prepare(str(tmp_path / "c"), tmp_path / "d", 400, quiet=True)
    text = d.tokenizer.decode(d.train)
    assert "Zebra zebras zebra." in text and "Qqqq" not in text and len(d.info["files"]) == 2


def test_half_written_cache_is_not_trusted(tmp_path):
    f = _write_text(tmp_path / "c.txt", _corpus_lines(300))
    key = data.cache_key([f], 400)
    broken = _write_text(tmp_path / "d" / "cache" / key / "train.npy", "garbage")  # no meta.json: incomplete
    _write_text(tmp_path / "d" / "cache" / f"{key}.tmp999" / "train.npy", "garbage")
    d = data.prepare(str(f), tmp_path / "d", 400, quiet=True)
    assert d.key == key and not d.info["cache_hit"] and broken.stat().st_size > 100 and d.train[0] == CLS


@pytest.mark.parametrize("corpus", ["no/such/file.txt", "babylm_1B", "synthetik"])
def test_missing_path_or_unknown_name(tmp_path, corpus):
    with pytest.raises(DataError, match="unknown corpus.*babylm_10M, babylm_100M, synthetic"):
        data.prepare(corpus, tmp_path / "d", 400, quiet=True)


def test_empty_corpus(tmp_path):
    _write_text(tmp_path / "empty.txt", "  \n\n\t\n")
    with pytest.raises(DataError, match="holds no text"):
        data.prepare(str(tmp_path / "empty.txt"), tmp_path / "d", 400, quiet=True)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no \\*.train or \\*.txt"):
        data.prepare(str(tmp_path / "emptydir"), tmp_path / "d", 400, quiet=True)


def test_unwritable_data_dir(tmp_path):
    _write_text(tmp_path / "c.txt", _corpus_lines(50))
    _write_text(tmp_path / "afile", "x")
    with pytest.raises(DataError, match="not writable"):
        data.prepare(str(tmp_path / "c.txt"), tmp_path / "afile" / "data", 400, quiet=True)


def test_synthetic_corpus(tmp_path):
    text = data.synthetic_text()
    assert text == data.synthetic_text() and 200_000 < len(text.split()) < 500_000
    words = set(text.replace(".", " ").replace("?", " ").split())
    assert {"walked", "chased", "happiness", "kindness", "reality", "activity", "babies", "happily"} <= words
    d = data.prepare("synthetic", tmp_path / "d", 500, quiet=True)
    assert (tmp_path / "d" / "synthetic" / "synthetic.train").exists() and d.info["words"] > 200_000
    assert 1.0 <= d.info["tokens_per_word"] < 2


def _make_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


@pytest.mark.parametrize("evil", ["../evil.train", "ok/../../evil.train", "/abs/evil.train"])
def test_safe_extract_refuses_escaping_members(tmp_path, evil):
    z = _make_zip(tmp_path / "x.zip", {"train/a.train": "hi\n", evil: "pwned\n"})
    with pytest.raises(DataError, match="escapes"):
        data.safe_extract(z, tmp_path / "out" / "target")
    assert not (tmp_path / "evil.train").exists() and not (tmp_path / "out" / "evil.train").exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # no partial folder


def test_safe_extract_bad_zip(tmp_path):
    _write_text(tmp_path / "x.zip", "not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        data.safe_extract(tmp_path / "x.zip", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_download_babylm_from_local_zip(tmp_path, monkeypatch, capsys):
    z = _make_zip(tmp_path / "train_10M.zip", {"train_10M/childes.train": _corpus_lines(300),
                                              "__MACOSX/train_10M/._childes.train": "\x00junk"})
    monkeypatch.setitem(data.DOWNLOADS, "babylm_10M", (z.as_uri(), "0" * 32))
    d = data.prepare("babylm_10M", tmp_path / "d", 400, quiet=True)
    err = capsys.readouterr().err
    assert "WARNING" in err and "expected " + "0" * 32 in err
    assert [p.name for p in data.find_files(tmp_path / "d" / "babylm_10M")] == ["childes.train"]
    assert not (tmp_path / "d" / "babylm_10M.zip").exists() and not (tmp_path / "d" / "babylm_10M.zip.part").exists()
    assert d.info["lines"] == 298
    # second call: found on disk, no download (a failing opener would raise)
    monkeypatch.setitem(data.DOWNLOADS, "babylm_10M", ("file:///nonexistent/x.zip", None))
    assert data.prepare("babylm_10M", tmp_path / "d", 400, quiet=True).info["cache_hit"]


def test_download_md5_match_is_quiet(tmp_path, capsys):
    z = _make_zip(tmp_path / "a.zip", {"a.train": "x\n"})
    import hashlib
    data.download(z.as_uri(), tmp_path / "b.zip", hashlib.md5(z.read_bytes()).hexdigest(), quiet=True)
    assert (tmp_path / "b.zip").read_bytes() == z.read_bytes() and "WARNING" not in capsys.readouterr().err


def test_offline_download_gives_one_clear_sentence(tmp_path):
    def offline(url):
        raise urllib.error.URLError("no network")
    with pytest.raises(DataError, match="put the BabyLM \\*.train files into") as e:
        data.resolve_corpus("babylm_10M", tmp_path / "d", quiet=True, opener=offline)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "d" / "babylm_10M").exists() and not list((tmp_path / "d").glob("*.part"))


def test_interrupted_download_leaves_nothing(tmp_path):
    class Broken:  # a response that dies mid-transfer
        headers = {"Content-Length": "100"}
        def __init__(self):
            self.n = 0
        def __enter__(self):
            return self
        def __exit__(self, *a):
            return False
        def read(self, size):
            self.n += 1
            if self.n > 1:
                raise ConnectionResetError("connection reset")
            return b"PK" * 10
    with pytest.raises(DataError, match="connection reset"):
        data.resolve_corpus("babylm_10M", tmp_path / "d", quiet=True, opener=lambda url: Broken())
    assert sorted(os.listdir(tmp_path / "d")) == []


def test_babylm_100m_missing_says_where(tmp_path):
    with pytest.raises(DataError, match="osf.io"):
        data.resolve_corpus("babylm_100M", tmp_path / "d", quiet=True)


# ----------------------------------------------------------------------------- packing

def test_batches_shapes_contiguous_rows_and_epoch_coverage():
    toks = np.arange(4096 + 100)  # 16 blocks of 256, a 100-token tail is dropped
    b = Batches(toks, block_size=256, seed=0)
    seen = []
    for _ in range(4):
        x = b.next(1024, 64)
        assert x.shape == (16, 64) and x.dtype == torch.long
        for row in x:  # each row is a contiguous slice starting on a seq_len boundary
            assert row[0] % 64 == 0 and torch.equal(row, torch.arange(row[0], row[0] + 64))
        seen.append(x.flatten())
    assert b.epoch == 1 and b.pos == 0
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(4096))  # nothing lost or duplicated
    nxt = b.next(1024, 64)
    assert not torch.equal(nxt, seen[0])  # a new permutation each epoch


def test_batches_seq_len_change_keeps_order():
    toks = np.arange(256 * 12)
    a, b = Batches(toks, 256, seed=5), Batches(toks, 256, seed=5)
    xa = torch.cat([a.next(512, 64).flatten(), a.next(512, 256).flatten()])
    xb = torch.cat([b.next(512, 256).flatten(), b.next(512, 256).flatten()])
    assert torch.equal(xa, xb)
    assert not torch.equal(Batches(toks, 256, seed=6).next(512, 256), Batches(toks, 256, seed=5).next(512, 256))


def test_batches_state_restore_exact():
    toks = np.arange(256 * 10, dtype=np.uint16)
    b = Batches(toks, 256, seed=1)
    for _ in range(7):  # crosses an epoch boundary mid-batch (3 blocks per batch, 10 per epoch)
        b.next(768, 128)
    state = json.loads(json.dumps(b.state_dict()))  # plain ints only
    expect = [b.next(768, 128) for _ in range(3)]
    c = Batches(toks, 256, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(e, c.next(768, 128)) for e in expect)
    with pytest.raises(DataError):
        Batches(np.arange(256 * 11), 256).load_state_dict(state)


def test_batches_bad_input():
    with pytest.raises(DataError, match="fewer than one block"):
        Batches(np.arange(100), 256)
    b = Batches(np.arange(256 * 4), 256)
    for bt, sl in [(512, 100), (300, 64), (128, 64), (512, 0)]:
        with pytest.raises(DataError):
            b.next(bt, sl)


# ----------------------------------------------------------------------------- CLI

def test_cli_summary_and_errors(tmp_path, capsys):
    f = _write_text(tmp_path / "c.txt", _corpus_lines(300))
    assert data.main(["--corpus", str(f), "--data-dir", str(tmp_path / "d"), "--vocab-size", "400", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in ["1 files", "words", "tokens/word", "vocab", "sub-token units", "cache"])
    for args in [["--corpus", str(tmp_path / "missing.txt")], ["--corpus", str(f), "--vocab-size", "10"]]:
        assert data.main(args + ["--data-dir", str(tmp_path / "d"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("data.py: error: ") and err.count("\n") == 1


# -----------------------------------------------------------------------------
# model.py: the encoder and its N-hot embedding; train.py: the loop, checkpoints, resume

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# model

def tiny_model(nhot=True, V=300, dropout=0.0, seed=0, fast=True):
    torch.manual_seed(seed)
    table = None
    if nhot:
        table = torch.randint(0, 50, (V, 6), generator=torch.Generator().manual_seed(1))
        table[:, 4:] = -1
        table[:5] = -1  # specials have no units
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=64, dropout=dropout)
    return (FastMaskedLM if fast else MaskedLM)(cfg, nhot_table=table)

def masked_batch(V=300, B=4, T=16, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, V, (B, T), generator=g)
    sel = torch.rand(B, T, generator=g) < p
    sel[:, 0] = True  # at least one target per row
    return torch.where(sel, 4, x), torch.where(sel, x, -100)

def test_shapes_both_modes():
    m = tiny_model()
    inp, lab = masked_batch()
    logits, loss = m(inp, labels=lab)
    assert logits.shape == (int((lab != -100).sum()), 300) and loss.dim() == 0
    logits, loss = m(inp)
    assert logits.shape == (4, 16, 300) and loss is None

@pytest.mark.parametrize("fast", [True, False])
def test_initial_loss_is_uniform_guess(fast):
    for nhot in (False, True):
        _, loss = tiny_model(nhot=nhot, fast=fast)(*masked_batch())
        assert abs(loss.item() - math.log(300)) < 0.1 * math.log(300)

@pytest.mark.parametrize("fast", [True, False])
def test_a_batch_without_targets_has_loss_zero_and_finite_gradients(fast):
    # a micro-batch can draw no target at all: its loss must not be nan (train.py would stop the run)
    m = tiny_model(fast=fast)
    x, labels = masked_batch()
    logits, loss = m(x, labels=torch.full_like(labels, -100))
    loss.backward()
    assert logits.shape[0] == 0 and loss.item() == 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)

def test_tied_weights_share_storage_and_nhot_changes_matrix():
    plain = tiny_model(nhot=False)
    assert plain.embedding_matrix().data_ptr() == plain.tok.weight.data_ptr()
    assert not any(p.shape == (300, 32) for n, p in plain.named_parameters() if n != "tok.weight")  # no 2nd output matrix
    m = tiny_model(nhot=True)
    E = m.embedding_matrix()
    assert not torch.allclose(E, m.tok.weight)
    assert torch.equal(E[:5], m.tok.weight[:5])  # specials have no units
    # token 7's composed row is its own vector plus its units' vectors / sqrt(k)
    units = m.nhot_ids[7][m.nhot_w[7] > 0]
    expect = m.tok.weight[7] + m.sub.weight[units].sum(0) / math.sqrt(len(units))
    assert torch.allclose(E[7], expect, atol=1e-6)

@pytest.mark.parametrize("fast", [True, False])
def test_padding_does_not_leak(fast):
    m = tiny_model(fast=fast).eval()
    x, _ = masked_batch()
    mask = torch.ones_like(x)
    mask[:, 12:] = 0
    y = x.clone()
    y[:, 12:] = torch.randint(5, 300, (4, 4))  # change only padded tokens
    a, _ = m(x, attention_mask=mask)
    b, _ = m(y, attention_mask=mask)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    c, _ = m(y)  # without the mask the change does leak: the check above can fail
    assert not torch.allclose(a[:, :12], c[:, :12], atol=1e-5)

def test_tied_gradient_is_dense_and_counts_both_uses():
    # E is looked up (a sparse gradient: only the rows in the batch) and scores every position (a dense one);
    # the parameter must get their sum, as a dense tensor AdamW can use. Checked by central differences.
    for nhot in (False, True):
        m = tiny_model(nhot=nhot).double()
        inp, lab = masked_batch()
        _, loss = m(inp, labels=lab)
        loss.backward()
        g = m.tok.weight.grad
        assert g.layout == torch.strided
        w, eps = m.tok.weight.data, 1e-6
        for row in (4, int(inp[0, 1]), int(lab[0, 0])):  # the mask id (both uses), an input, a target
            w[row, 3] += eps
            up = m(inp, labels=lab)[1].item()
            w[row, 3] -= 2 * eps
            down = m(inp, labels=lab)[1].item()
            w[row, 3] += eps
            assert abs((up - down) / (2 * eps) - g[row, 3].item()) < 1e-6

@pytest.mark.parametrize("fast", [True, False])
def test_masked_logits_equal_full_rows(fast):
    m = tiny_model(fast=fast).eval()
    inp, lab = masked_batch()
    part, _ = m(inp, labels=lab)
    full, _ = m(inp)
    assert torch.allclose(part, full[lab != -100], atol=1e-5)

def test_targets_only_path_has_the_full_paths_loss_and_gradients():
    # with labels, the last block runs its projection and MLP only on target rows (plus pad rows that repeat
    # the first target); loss and every gradient must equal cross-entropy on the full (B, T, V) logits
    m = tiny_model(nhot=True).double()
    inp, lab = masked_batch()
    _, loss = m(inp, labels=lab)
    got = torch.autograd.grad(loss, list(m.parameters()))
    full, _ = m(inp)
    want_loss = F.cross_entropy(full.flatten(0, 1), lab.flatten())
    want = torch.autograd.grad(want_loss, list(m.parameters()))
    assert abs(loss.item() - want_loss.item()) < 1e-12
    for (name, _), g, w in zip(m.named_parameters(), got, want):
        assert torch.allclose(g, w, atol=1e-12), name
    # a fully padded first sequence (NaN rows: nothing to attend to) without targets leaves the loss finite
    mask = torch.ones_like(inp)
    mask[0], lab[0] = 0, -100
    assert torch.isfinite(m(inp, labels=lab, attention_mask=mask)[1])

@pytest.mark.parametrize("fast", [True, False])
def test_bf16_agrees_with_fp32(fast):
    m = tiny_model(fast=fast).eval()
    inp, lab = masked_batch()
    a, _ = m(inp, labels=lab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b, _ = m(inp, labels=lab)
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max() + 0.05

@pytest.mark.parametrize("fast", [True, False])
def test_overfits_one_batch(fast):
    m = tiny_model(dropout=0.0, fast=fast)
    inp, lab = masked_batch(B=2, T=12)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = m(inp, labels=lab)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05

def test_nhot_flat_form_follows_a_loaded_table():
    # the pad-free table fast.NHotSum uses is derived state: a state-dict load must rebuild it
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    b.nhot_ids.zero_()  # b's own table differs from a's: every unit is unit 0
    assert not torch.equal(b.embedding_matrix(), a.embedding_matrix())
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.embedding_matrix(), a.embedding_matrix())  # rebuilt on first use after the load
    fa, fb = a._nhot_flat[3], b._nhot_flat[3]
    assert all(torch.equal(x, y) for bag_a, bag_b in zip(fa, fb) for x, y in zip(bag_a, bag_b))
    (ids, offsets, _), _ = fa
    present = a.nhot_w[7] > 0
    assert torch.equal(ids[offsets[7]:offsets[8]], a.nhot_ids[7][present])  # token 7's units, in order
    assert set(a.state_dict()) == set(tiny_model().state_dict())  # not saved: checkpoints keep the padded table
    # the docstring's example
    (ids, offsets, _), (t_ids, t_offsets, _) = fast.flatten_nhot(torch.tensor([[3, 5, 0], [5, 0, 0]]),
                                                                 torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 6)
    assert ids.tolist() == [3, 5, 5] and offsets.tolist() == [0, 2]
    assert t_ids.tolist() == [0, 0, 1] and t_offsets.tolist() == [0, 0, 0, 0, 1, 1]


def test_fast_and_plain_paths_agree():
    # fast.py's FastMaskedLM against model.py's MaskedLM with the same weights and batch, dropout 0, fp32: loss, the
    # masked rows' logits, full logits and every parameter's gradient agree to 1e-5 (relative to each tensor's
    # largest entry); the fast path's embedding gradient arrives dense like the plain one; the state_dicts are one
    m = tiny_model(nhot=True)
    plain = MaskedLM(m.config)
    plain.load_state_dict(m.state_dict())
    assert m.state_dict().keys() == plain.state_dict().keys()
    inp, lab = masked_batch(B=6, T=24)
    mask = torch.ones_like(inp)
    mask[1, 18:] = 0
    lab[1, 18:] = -100
    out = {}
    for name, net in (("fast", m), ("plain", plain)):
        logits, loss = net(inp, labels=lab, attention_mask=mask)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        out[name] = logits, loss, grads, net(inp, attention_mask=mask)[0]
    (lf, sf, gf, ff), (lp, sp, gp, fp) = out["fast"], out["plain"]
    close = lambda a, b: (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert abs(sf.item() - sp.item()) < 1e-5 and close(lf, lp) and close(ff, fp) and close(lf, fp[lab != -100])
    for (name, _), a, b in zip(m.named_parameters(), gf, gp):
        assert a.layout == torch.strided and close(a, b), name
    # no custom autograd.Function on the plain path: its graph holds library nodes only
    _, loss = plain(inp, labels=lab)
    seen, todo = set(), [loss.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
    assert not any("BackwardCFunction" in type(f).__name__ for f in seen) and len(seen) > 20

def test_model_py_stands_alone():
    # the plain model imports only torch and the standard library; no module of the project imports another in a
    # circle (lib/fast.py builds on model.py, never the other way round); lib/ and tools/ never import a command;
    # the top level holds at most 10 .py files, the core among them
    files = sorted(Path(HERE).glob("*.py")) + sorted(Path(HERE).glob("lib/*.py")) + sorted(Path(HERE).glob("tools/*.py"))
    name = lambda p: ".".join(p.relative_to(HERE).with_suffix("").parts)
    ours = {name(p) for p in files}
    def imports(p):  # every import statement, in functions too: "from lib import ddp" -> {"lib", "lib.ddp"}
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return found
    assert {m.split(".")[0] for m in imports(Path(HERE) / "model.py")} <= {"math", "dataclasses", "torch"}
    graph = {name(p): {m for m in imports(p) if m in ours} for p in files if p.stem != "test_amlm"}
    assert graph["lib.fast"] >= {"model"} and graph["train"] >= {"amlm", "lib.ddp", "lib.fast"}  # the parser sees them
    commands = {"train", "evaluate", "export"}
    assert not [(m, graph[m] & commands) for m in graph if m.startswith(("lib.", "tools.")) and graph[m] & commands]
    top = {p.name for p in Path(HERE).glob("*.py")}
    assert len(top) <= 10 and {"amlm.py", "model.py", "data.py", "train.py", "test_amlm.py"} <= top
    def reach(start, seen):
        for m in graph.get(start, ()):
            if m not in seen:
                seen.add(m)
                reach(m, seen)
        return seen
    assert not [m for m in graph if m in reach(m, set())], "a circular import"

def test_nhot_sum_backward_is_the_transposed_bag():
    # the docstring's example: N = [[1, 1], [0, 1]], g = [[1], [2]] -> gradient N^T g = [[1], [3]]
    bag = torch.tensor([0, 1, 1]), torch.tensor([0, 2]), torch.ones(3, dtype=torch.float64)
    bag_t = torch.tensor([0, 0, 1]), torch.tensor([0, 1]), torch.ones(3, dtype=torch.float64)
    W = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    NHotSum.apply(W, bag, bag_t).backward(torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    assert W.grad.flatten().tolist() == [1.0, 3.0]
    # a model's table against the library's backward, with tokens without units and a unit no token uses
    m = tiny_model().double()
    m.nhot_ids[m.nhot_ids == m.config.n_units - 1] = 0  # the last unit: its gradient row must still be there
    m.nhot_w.mul_(torch.rand(len(m.nhot_w), 1, dtype=m.nhot_w.dtype) + 0.5)  # unequal weights per token
    fwd, bwd = fast.flatten_nhot(m.nhot_ids, m.nhot_w, m.config.n_units)
    W = m.sub.weight.detach().clone().requires_grad_()
    g = torch.randn(300, 32, dtype=torch.float64)
    ours, = torch.autograd.grad(NHotSum.apply(W, fwd, bwd), W, g)
    lib, = torch.autograd.grad(F.embedding_bag(fwd[0], W, fwd[1], per_sample_weights=fwd[2], mode="sum"), W, g)
    assert torch.allclose(ours, lib, atol=1e-12) and ours.abs().sum() > 0

def test_rotary_qkv_matches_slice_rope_transpose():
    # the fused function must be exactly the plain maths: split, rotate q and k, scale q, transpose
    torch.manual_seed(0)
    B, T, nh, hd = 2, 5, 3, 8
    qkv = torch.randn(B, T, 3 * nh, hd, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(T, hd, "cpu"))
    x = qkv.transpose(1, 2)  # (B, 3nh, T, hd)
    want = (apply_rope(x[:, :nh], cos, sin) * hd ** -0.5, apply_rope(x[:, nh:2 * nh], cos, sin), x[:, 2 * nh:])
    got = RotaryQKV.apply(qkv, cos, sin, hd ** -0.5)
    for g, w in zip(got, want):
        assert g.is_contiguous() and torch.allclose(g, w, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: RotaryQKV.apply(t, cos, sin, hd ** -0.5), (qkv,))
    # rotation keeps lengths: position t turns each channel pair by t * inv_freq
    assert torch.allclose(got[1].norm(dim=-1), x[:, nh:2 * nh].norm(dim=-1))

def test_linear_cross_entropy_matches_library_and_ignores_minus_100():
    # the fused head must be F.linear + F.cross_entropy: logits, loss and all three gradients, in every dtype;
    # V = 5000 spans three 2048-column slices of the backward, the last one partial
    torch.manual_seed(0)
    y = torch.tensor([3, -100, 2100, 0, -100, 4999])  # targets in the first and in the last slice
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        h, E, b = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((6, 8), (5000, 8), (5000,)))
        logits, loss = LinearCrossEntropy.apply(h, E, b, y)
        grads = torch.autograd.grad(loss, (h, E, b))
        ref = F.linear(h, E, b)
        ref_loss = F.cross_entropy(ref, y)
        ref_grads = torch.autograd.grad(ref_loss, (h, E, b))
        assert torch.allclose(logits, ref, atol=tol) and abs(loss.item() - ref_loss.item()) < tol
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype and torch.allclose(g, r, rtol=tol, atol=tol)
        assert (grads[0][1] == 0).all() and (grads[0][4] == 0).all()  # ignored rows get no gradient
    # under bf16 autocast it computes what autocast's F.linear would (up to one more bf16 rounding: the bias is
    # added after the product), and reduces in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = LinearCrossEntropy.apply(h.float(), E.float(), b.float(), y)
        ref = F.linear(h.float(), E.float(), b.float())
    assert logits.dtype == torch.bfloat16 and torch.allclose(logits.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert abs(loss.item() - F.cross_entropy(logits.float(), y).item()) < 1e-4  # the loss of the logits it returns
    for g, r in zip(torch.autograd.grad(loss, (h, E, b)), ref_grads):  # bf16 gradients, close to the fp32 ones
        assert g.dtype == torch.float32 and (g - r).abs().max() < 0.03 * r.abs().max()
    # a loss on the logits themselves is differentiated too (set_materialize_grads must not lose it)
    h, E, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 2), (2100, 2), (2100,)))
    y = torch.tensor([5, -100, 2099])
    assert torch.autograd.gradcheck(lambda h: LinearCrossEntropy.apply(h, E, b, y)[0].sin().sum(), (h,))
    assert torch.autograd.gradcheck(lambda h: sum(LinearCrossEntropy.apply(h, E, b, y)[i].sum() for i in (0, 1)), (h,))
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)  # the docstring's worked example
    E = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    _, loss = LinearCrossEntropy.apply(h, E, b, torch.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(4 / 3))
    assert torch.allclose(h.grad, torch.tensor([[-0.25 * math.log(3), 0.0]]))
    assert torch.allclose(E.grad, torch.tensor([[0.25, 0.0], [-0.25, 0.0]])) and torch.allclose(b.grad, torch.tensor([0.25, -0.25]))

def test_dropout_mask_rate_scale_and_seed():
    x = torch.ones(1000, 1000)
    torch.manual_seed(1)
    y = dropout(x, 0.1, True)
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs((y == 0).float().mean().item() - 0.1) < 0.002  # 1e6 draws: sd of the rate is 0.0003
    assert abs((dropout_mask(x, 0.5) > 0).float().mean().item() - 0.5) < 0.002
    assert (dropout_mask(x, 0.0) == 1).all()
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.1, True), y)  # the global RNG drives it, so checkpoints resume it
    assert dropout(x, 0.1, False) is x
    # the residual form: x + dropout(y), gradient through the same mask
    a = torch.zeros(300, 300, requires_grad=True)
    b = torch.ones(300, 300, requires_grad=True)
    out = dropout_add(a, b, 0.25, True)
    out.sum().backward()
    assert torch.equal(b.grad, out.detach()) and (a.grad == 1).all()
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01

# -----------------------------------------------------------------------------
# train.py

def test_lr_schedule_endpoints():
    assert train.lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)  # warmup is non-zero at step 0
    assert train.lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert train.lr_at(99, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert train.seq_len_at(0, 10, [64, 256]) == 64 and train.seq_len_at(5, 10, [64, 256]) == 256
    assert train.milestones_words()[:11] == [m * 10**6 for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20)]

SMALL = ["--corpus", "synthetic", "--size", "tiny", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--d-ff", "64",
         "--vocab-size", "400", "--batch-tokens", "512", "--seq-len", "16,32", "--amlm-update-every", "5", "--eval-every", "0",
         "--eval-tokens", "2048", "--dtype", "fp32"]

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))

def run(args, data_dir, out):
    train.main(SMALL + ["--data-dir", data_dir, "--out", str(out)] + args)
    return torch.load(os.path.join(out, "latest.pt"), weights_only=True)

def test_resume_is_bit_identical(data_dir, tmp_path):
    straight = run(["--max-steps", "24"], data_dir, tmp_path / "a")
    run(["--max-steps", "24", "--stop-after", "12"], data_dir, tmp_path / "b")
    half = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert half["step"] == 12
    train.main(["--resume", str(tmp_path / "b"), "--data-dir", data_dir])
    resumed = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert resumed["step"] == 24
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert torch.equal(straight["amlm"]["weights"], resumed["amlm"]["weights"])

def test_loss_goes_down_and_files_appear(data_dir, tmp_path):
    run(["--max-steps", "60", "--lr", "3e-3"], data_dir, tmp_path)
    s = json.load(open(tmp_path / "summary.json"))
    assert s["steps"] == 60 and s["tokens_per_second"] > 0
    log = open(tmp_path / "log.txt").read()
    first = float(log.split("step 10/60: loss ")[1].split(",")[0])
    assert s["train_loss"] < first - 0.3
    rows = open(tmp_path / "amlm.csv").read().splitlines()
    assert len(rows) == 1 + 60 // 5

def test_milestone_checkpoints(data_dir, tmp_path):
    # the synthetic corpus has ~0.4 words per token at this vocabulary: 1 M words after ~150 steps of 16k tokens
    run(["--max-steps", "200", "--batch-tokens", "16384", "--seq-len", "32"], data_dir, tmp_path)
    s = json.load(open(tmp_path / "summary.json"))
    assert s["words_seen"] >= 10**6
    ck = torch.load(tmp_path / "ckpt_1M.pt", weights_only=True)
    assert 10**6 <= ck["words_seen"] < 10**6 + 16384
    assert not (tmp_path / f"ckpt_{s['words_seen'] // 10**6 + 1}M.pt").exists()
    model, tok, _ = evaluate.load_checkpoint(str(tmp_path / "ckpt_1M.pt"))
    assert model.config.vocab_size == tok.vocab_size

def test_bad_checkpoints_are_refused(data_dir, tmp_path, capsys):
    (tmp_path / "latest.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="cannot resume"):
        train.main(["--resume", str(tmp_path), "--data-dir", data_dir])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "latest.pt")
    with pytest.raises(SystemExit, match="cannot resume"):
        train.main(["--resume", str(tmp_path), "--data-dir", data_dir])
    ck = run(["--max-steps", "2"], data_dir, tmp_path / "a")  # a real run, then a different shape
    ck["config"]["d_model"] = 64
    torch.save(ck, tmp_path / "a" / "latest.pt")
    with pytest.raises(SystemExit, match="does not match this version of model.py"):
        train.main(["--resume", str(tmp_path / "a"), "--data-dir", data_dir])
    with pytest.raises(UserError):
        evaluate.load_checkpoint(str(tmp_path / "latest.pt"))

def test_ctrl_c_saves_latest(data_dir, tmp_path):
    cmd = [sys.executable, os.path.join(HERE, "train.py")] + SMALL + ["--data-dir", data_dir, "--out", str(tmp_path),
                                                                    "--max-steps", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
    # wait until the child has taken the lock and trained 10 steps; the limit only guards against a hang,
    # since a loaded machine can take minutes just to import torch in the child
    log, deadline = tmp_path / "log.txt", time.time() + 600
    while not (log.exists() and "step 10/" in log.read_text()):
        assert p.poll() is None, p.communicate()[0]
        if time.time() > deadline:
            p.kill()  # do not leave a 100,000-step run behind
            pytest.fail("train.py did not reach step 10 in 10 minutes")
        time.sleep(0.2)
    with pytest.raises(SystemExit, match="is in use by another train.py"):  # a second run on the same folder
        train.main(SMALL + ["--data-dir", data_dir, "--out", str(tmp_path), "--overwrite"])
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    assert "Traceback" not in out
    assert f"stopping: the step in progress ends, then {tmp_path}/latest.pt is saved" in out  # said at once
    ck = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ck["step"] >= 10 and not (tmp_path / "train.lock").exists()


def test_lamb_follows_the_published_update():
    # the docstring's worked example: w [3, 4], gradient [1, 0]: trust ratio 5, one step of lr 0.1 * 5 = 0.5
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([1.0, 0.0])
    optim.Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=1e-9).step()
    assert torch.allclose(w.data, torch.tensor([2.5, 4.0]))
    # You et al. 2020, Algorithm 2, written out in numpy for two tensors over three steps, with weight decay
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in ws]
    opt = optim.Lamb(params, lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    ms, vs = [np.zeros_like(x) for x in ws], [np.zeros_like(x) for x in ws]
    for t in range(1, 4):
        grads = [rng.normal(size=x.shape) for x in ws]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
        for i, g in enumerate(grads):
            ms[i] = 0.9 * ms[i] + 0.1 * g
            vs[i] = 0.98 * vs[i] + 0.02 * g * g
            r = (ms[i] / (1 - 0.9 ** t)) / (np.sqrt(vs[i] / (1 - 0.98 ** t)) + 1e-6) + 0.1 * ws[i]
            ws[i] = ws[i] - 0.01 * np.linalg.norm(ws[i]) / np.linalg.norm(r) * r
    for p, x in zip(params, ws):
        assert np.allclose(p.detach().numpy(), x, atol=1e-12)

def test_train_with_lamb_resumes_exactly(data_dir, tmp_path):
    straight = run(["--optimizer", "lamb", "--max-steps", "8"], data_dir, tmp_path / "a")
    run(["--optimizer", "lamb", "--max-steps", "8", "--stop-after", "4"], data_dir, tmp_path / "b")
    train.main(["--resume", str(tmp_path / "b"), "--data-dir", data_dir])
    resumed = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())
    assert straight["optimizer"]["state"][0]["step"] == 8

# -----------------------------------------------------------------------------
# a finished run stays finished; no value of summary.json is lost; a NaN, an empty corpus, 0 steps

def test_resume_of_a_finished_run_changes_no_byte(data_dir, tmp_path, capsys):
    run(["--max-steps", "2"], data_dir, tmp_path / "a")
    capsys.readouterr()
    before = hashes(tmp_path / "a")
    assert train.main(["--resume", str(tmp_path / "a"), "--data-dir", data_dir]) is None  # exit 0
    assert "already finished at step 2; nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is at step 2, past the 1 steps that --max-steps 1 give"):
        train.main(["--resume", str(tmp_path / "a"), "--data-dir", data_dir, "--max-steps", "1"])
    assert hashes(tmp_path / "a") == before

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_resume_of_a_gpu_run_without_a_gpu_says_how_to_go_on(data_dir, tmp_path, monkeypatch, capsys):
    run(["--max-steps", "2"], data_dir, tmp_path / "a")
    load = train.load_resume
    monkeypatch.setattr(train, "load_resume", lambda d: (r := load(d)) and {**r, "args": {**r["args"], "device": "cuda"}})
    with pytest.raises(SystemExit):  # as if saved on a GPU
        train.parse_args(["--resume", str(tmp_path / "a")])
    assert f"no CUDA GPU is available; to continue the run in {tmp_path / 'a'} here, add --device cpu" in capsys.readouterr().err
    assert train.parse_args(["--resume", str(tmp_path / "a"), "--device", "cpu"])[0].device == "cpu"

def test_summary_keeps_the_values_a_later_sitting_does_not_know(data_dir, tmp_path):
    run(["--max-steps", "2"], data_dir, tmp_path / "a")
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    train.main(["--resume", str(tmp_path / "a"), "--data-dir", data_dir, "--max-steps", "4", "--stop-after", "1"])
    later = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert later["steps"] == 3 and first["val_loss"] is not None and later["val_loss"] == first["val_loss"]

def test_nan_before_the_first_save_leaves_a_folder_the_same_command_starts_in(data_dir, tmp_path):
    argv = SMALL + ["--data-dir", data_dir, "--out", str(tmp_path / "n"), "--max-steps", "30", "--lr", "1e6"]
    for _ in range(2):  # the second time it must say the same, not "holds files of an earlier run"
        with pytest.raises(SystemExit, match=r"the loss is nan; stopping. Nothing was saved.*--lr 1000000.0"):
            train.main(argv)
        assert not (tmp_path / "n").exists()

def test_overwrite_that_cannot_start_keeps_the_old_run(data_dir, tmp_path):
    run(["--max-steps", "2"], data_dir, tmp_path / "a")
    before = hashes(tmp_path / "a")
    for bad in (["--corpus", str(tmp_path / "no_such_corpus")], ["--max-steps", "0", "--epochs", "1e-9"]):
        with pytest.raises(SystemExit):
            train.main(SMALL + ["--data-dir", data_dir, "--out", str(tmp_path / "a"), "--overwrite"] +
                       [x for x in bad if x != "--max-steps" and x != "0"])
        assert hashes(tmp_path / "a") == before

def test_uniform_masking_alone_is_standard_mlm_at_a_constant_15_percent():
    args = train.parse_args(SMALL + ["--masking", "uniform"])[0]
    assert (args.mask_rate_start, args.mask_rate_end) == (0.15, 0.15)
    args = train.parse_args(SMALL + ["--masking", "hard"])[0]
    assert (args.mask_rate_start, args.mask_rate_end) == (0.40, 0.15)
    args = train.parse_args(SMALL + ["--masking", "uniform", "--mask-rate-start", "0.3"])[0]
    assert (args.mask_rate_start, args.mask_rate_end) == (0.3, 0.15)

@pytest.mark.parametrize("args, msg", [(["--corpus", ""], "--corpus is empty"),
                                       (["--epochs", "1e-9"], "is 0 steps of 512 tokens on this corpus"),
                                       (["--corpus", "no/such/corpus"], "unknown corpus")])
def test_refusals_leave_no_folder_behind(args, msg, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # run from another folder: no out/ or data/ left here
    with pytest.raises(SystemExit) as e:
        train.main([a for a in SMALL + ["--data-dir", data_dir] if a != "--max-steps"] + args)
    assert e.value.code != 0 and msg in str(e.value.code) + capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

def test_a_corpus_folder_never_feeds_train_py_outputs(data_dir, tmp_path):
    corpus = tmp_path / "c"
    _write_text(corpus / "text.txt", _corpus_lines(300))
    run(["--max-steps", "1"], data_dir, corpus / "run")  # a run folder inside the corpus folder
    (corpus / "log.txt").write_text((corpus / "run" / "log.txt").read_text())  # a log moved out of its run
    (corpus / "notes.txt").write_text("a user's own notes .\n")
    assert data.find_files(corpus) == [corpus / "notes.txt", corpus / "text.txt"]

# -----------------------------------------------------------------------------
# train.py under torchrun: the same run on 1 or 2 processes, with or without gradient accumulation

DDP = ["--dropout", "0", "--amlm-update-every", "3", "--max-steps", "10"]  # fp32 (SMALL), no dropout: comparable

def torchrun(args, data_dir, out):
    """train.py on two CPU processes (gloo), launched as a user would."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train.py")] + SMALL + DDP + ["--data-dir", data_dir, "--out", str(out)] + args
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return torch.load(out / "latest.pt", weights_only=True)

def assert_same_run(a, b, tol):
    assert a["step"] == b["step"] and a["batches"] == b["batches"]  # the same global data position
    for k, v in a["model"].items():
        assert (v - b["model"][k]).abs().max() <= tol, k

def test_torchrun_and_grad_accum_give_the_single_process_run(data_dir, tmp_path):
    # 2 processes x 1 micro-step, and 1 process x 2 micro-steps, against 1 process x 1: every row gets the same
    # mask (drawn on the global batch everywhere), and the loss is the mean over the global batch's targets, so the
    # final parameters agree to float rounding (1e-5: the summation order of the gradients differs)
    one = run(DDP, data_dir, tmp_path / "one")
    two = torchrun([], data_dir, tmp_path / "two")
    acc = run(DDP + ["--grad-accum", "2"], data_dir, tmp_path / "acc")
    assert_same_run(one, two, 1e-5)
    assert_same_run(one, acc, 1e-5)
    # AMLM.all_reduce summed the statistics before each of the 3 updates: both processes held the same weights
    digests = [r["amlm_weights"] for r in two["rng"]["ranks"]]
    assert len(digests) == 2 and digests[0] == digests[1] and two["amlm"]["updates"] == 3
    assert json.load(open(tmp_path / "two" / "summary.json"))["processes"] == 2
    assert not (tmp_path / "two" / "log.txt").read_text().count("done:") > 1  # one writer: rank 0
    # resuming under torchrun is bit-exact; resuming the same checkpoint on one process continues the same run
    torchrun(["--stop-after", "5"], data_dir, tmp_path / "half")
    shutil.copytree(tmp_path / "half", tmp_path / "half1")
    assert_same_run(two, torchrun(["--resume", str(tmp_path / "half")], data_dir, tmp_path / "half"), 0.0)
    train.main(["--resume", str(tmp_path / "half1"), "--data-dir", data_dir])
    assert_same_run(two, torch.load(tmp_path / "half1" / "latest.pt", weights_only=True), 1e-5)

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_compile_on_a_cpu_is_allowed_with_a_note(capsys):
    args, _, _ = train.parse_args(SMALL + ["--compile", "--no-fast"])
    assert args.compile and not args.fast and args.device == "cpu"
    assert "note: --compile on a CPU" in capsys.readouterr().err

def test_batches_that_do_not_split_are_refused(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        train.main(SMALL + ["--grad-accum", "3"])  # 512 tokens = 16 sequences of 32: not 3 micro-steps
    assert "do not split evenly over 1 process(es) x --grad-accum 3" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(SystemExit):
        train.main(SMALL)
    assert "over 5 process(es)" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# amlm.py: budgets, update formulas, sampling proportions, resume

PAD, CLS, SEP, MASK = 0, 1, 2, 4
SPECIALS = [PAD, CLS, SEP, MASK]


def make(V=50, **kw):
    return AMLM(V, special_ids=[PAD, CLS, SEP], mask_id=MASK, **kw)


def batch(V, B=8, T=32, seed=0, pad_from=None):
    """Random normal tokens framed by [CLS] ... [SEP]; rows padded from column pad_from[i] on if given."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.tensor([i for i in range(V) if i not in SPECIALS])
    x = normal[torch.randint(len(normal), (B, T), generator=g)]
    x[:, 0], x[:, -1] = CLS, SEP
    if pad_from is not None:
        for i, n in enumerate(pad_from):
            x[i, n:] = PAD
    return x


def n_maskable(x):
    return (~torch.isin(x, torch.tensor(SPECIALS))).sum(1)


# -----------------------------------------------------------------------------
# probabilities

@pytest.mark.parametrize("rate", [0.15, 0.4, 0.9])
def test_probabilities_budget_cap_and_specials(rate):
    V = 40
    am = make(V)
    am.weights = torch.where(am.maskable, torch.rand(V, generator=torch.Generator().manual_seed(1)) + 0.01, 0.0)
    am.weights[7] = 500.0  # a rare heavy type: its uncapped share would exceed 1
    x = batch(V, pad_from=[32, 20, 10, 3, 2, 32, 32, 32])
    x[0, 5] = 7
    pi = am.probabilities(x, rate)
    assert torch.allclose(pi.sum(1), rate * n_maskable(x).float(), atol=1e-4)
    assert pi.max() <= 1.0 and pi.min() >= 0.0
    assert pi[0, 5] == 1.0  # the cap was actually needed and applied
    assert (pi[torch.isin(x, torch.tensor(SPECIALS))] == 0).all()


def test_probabilities_worked_example():
    am = make(8, rate=0.5)
    am.weights[5], am.weights[6] = 1.0, 0.1
    pi = am.probabilities(torch.tensor([[CLS, 5, 6, 6, SEP]]))
    assert torch.allclose(pi, torch.tensor([[0, 1, 0.25, 0.25, 0]]))


def test_probabilities_proportional_to_weight_when_uncapped():
    am = make(10, rate=0.2)
    am.weights[5], am.weights[6] = 0.3, 0.1
    pi = am.probabilities(torch.tensor([[CLS, 5, 6, 6, 6, SEP]]))
    assert torch.allclose(pi[0, 1:5], torch.tensor([0.8 * 3 / 6, 0.8 / 6, 0.8 / 6, 0.8 / 6]))


# -----------------------------------------------------------------------------
# mask

def test_mask_empirical_rate_and_marginals_match():
    V, rate = 30, 0.25
    am = make(V, rate=rate)
    am.weights = torch.where(am.maskable, torch.linspace(0.01, 2, V), 0.0)
    x = batch(V, B=16, T=32, pad_from=[32] * 8 + [12] * 8)
    g = torch.Generator().manual_seed(0)
    hits = sum((am.mask(x, generator=g)[1] != -100).float() for _ in range(1500)) / 1500
    assert abs(hits.sum() / n_maskable(x).sum() - rate) < 0.005
    assert (hits - am.probabilities(x)).abs().max() < 0.06  # per position, ~4 standard errors


def test_mask_specials_never_selected_and_never_drawn():
    V = 20
    am = make(V, rate=0.9)
    x = batch(V, B=16, T=16, pad_from=[8] * 16)
    g = torch.Generator().manual_seed(0)
    special = torch.isin(x, torch.tensor(SPECIALS))
    for _ in range(50):
        inputs, labels = am.mask(x, generator=g)
        assert (labels[special] == -100).all() and (inputs[special] == x[special]).all()
        changed = labels != -100
        assert not torch.isin(inputs[changed], torch.tensor([PAD, CLS, SEP])).any()


def test_mask_80_10_10_split():
    V = 2000  # large, so a random replacement almost never equals the original
    am = make(V, rate=0.5)
    x = batch(V, B=32, T=64)
    g = torch.Generator().manual_seed(0)
    n = masked = rand = kept = 0
    for _ in range(20):
        inputs, labels = am.mask(x, generator=g)
        sel = labels != -100
        assert (labels[sel] == x[sel]).all()
        n += sel.sum()
        masked += (inputs[sel] == MASK).sum()
        kept += (inputs[sel] == x[sel]).sum()
        rand += ((inputs[sel] != MASK) & (inputs[sel] != x[sel])).sum()
    assert abs(masked / n - 0.8) < 0.01 and abs(rand / n - 0.1) < 0.01 and abs(kept / n - 0.1) < 0.01


def test_mask_same_generator_seed_same_masks():
    am = make(30)
    x = batch(30)
    a = am.mask(x, generator=torch.Generator().manual_seed(3))
    b = am.mask(x, generator=torch.Generator().manual_seed(3))
    c = am.mask(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


# -----------------------------------------------------------------------------
# update

def test_update_worked_example():
    # V=4: specials 0 and 1 ([MASK]); types 2 (A, always right) and 3 (B, always wrong), 9 times each
    am = AMLM(4, special_ids=[0], mask_id=1, rate=0.15, ema=0.2, update_every=1)
    am.correct[2], am.total[2], am.total[3] = 9, 9, 9
    am.step()
    assert torch.allclose(am.weights, torch.tensor([0, 0, 0.06, 0.24]))
    assert am.total.sum() == 0 and am.correct.sum() == 0 and am.updates == 1


def test_update_clamp_then_renormalise():
    am = AMLM(4, special_ids=[0], mask_id=1, rate=0.15, ema=0.0, min_weight=0.01, update_every=1)
    am.correct[2], am.total[2], am.total[3] = 9, 9, 9  # q = 0.0075 (below the floor) and 0.1425
    am.update()
    a, b = 0.01, 0.1425
    assert torch.allclose(am.weights[2:], torch.tensor([a, b]) * 0.15 / ((a + b) / 2))


def test_mastery_hard_on_handmade_stats():
    am = make(10)
    am.correct[5], am.total[5] = 3, 4
    am.correct[6], am.total[6] = 0, 9
    s = am.mastery()
    assert s[5].item() == pytest.approx(0.7) and s[6].item() == pytest.approx(0.05) and s[7].item() == 0.5


def test_mastery_soft_on_handmade_stats():
    V = 8  # normal types 3, 5, 6, 7; with the ln V pseudo-observation added at scoring time
    am = make(V, metric="soft")
    am.ce_sum[5], am.ce_count[5] = 0.3, 3   # easy
    am.ce_sum[6], am.ce_count[6] = 30.0, 2  # very hard
    means = {t: (am.ce_sum[t].item() + math.log(V)) / (am.ce_count[t].item() + 1) for t in (3, 5, 6, 7)}
    lo, hi = min(means.values()), max(means.values())
    s = am.mastery()
    for t, m in means.items():
        assert s[t].item() == pytest.approx(1 - (m - lo) / (hi - lo), abs=1e-6)
    assert s[5] == 1 and s[6] == 0 and 0 < s[3] < 1  # unseen types sit in between, near the hard end


def logits_for(labels, right):
    """(n_labelled, V) logits predicting the label where `right(label)` is true, else another token."""
    y = labels[labels != -100]
    pred = torch.where(right(y), y, (y + 1) % 20 + 5 * ((y + 1) % 20 < 5))
    return 10 * torch.nn.functional.one_hot(pred, 20).float()


ADAPTIVE = [name for name, metric in METRICS.items() if metric.mastery is not None]  # every metric but uniform


@pytest.mark.parametrize("metric", ADAPTIVE)
def test_metric_always_right_type_ends_below_never_right(metric):
    am = make(20, rate=0.3, metric=metric, update_every=1)
    x = batch(20, B=4, T=16)
    x[:, 1:8], x[:, 8:15] = 6, 9
    inputs, labels = am.mask(x, generator=torch.Generator().manual_seed(0))
    am.observe(labels, logits_for(labels, lambda y: y == 6), inputs)
    am.step()
    assert am.weights[6] < am.rate < am.weights[9]


@pytest.mark.parametrize("metric", ADAPTIVE)
def test_metric_keeps_its_own_statistics_and_a_mastery_in_range(metric):
    # a metric is one METRICS entry: its statistics exist on every instance and in every checkpoint, observe adds to
    # them and to no others, mastery is (V,) in [0, 1], and train.py offers the name
    entry = METRICS[metric]
    am = make(20, rate=0.3, metric=metric)
    assert entry.stats and set(entry.stats) <= set(STATISTICS) and set(STATISTICS) <= set(am.state_dict())
    x = batch(20, B=4, T=16)
    inputs, labels = am.mask(x, generator=torch.Generator().manual_seed(0))
    am.observe(labels, logits_for(labels, lambda y: y % 2 == 0), inputs)
    assert {name for name, t in am.stats().items() if t.abs().sum() > 0} == set(entry.stats)
    s = am.mastery()
    assert s.shape == (20,) and s.min() >= 0 and s.max() <= 1 and entry.fit(am.stats())["observed"] > 0
    assert train.get_parser().parse_args(["--masking", metric]).masking == metric


def test_observe_soft_counts_only_mask_positions_with_inputs():
    am = make(20, metric="soft")
    labels = torch.tensor([[-100, 6, 7, 8]])
    inputs = torch.tensor([[CLS, MASK, 7, 12]])  # 7 kept, 8 replaced: not counted
    am.observe(labels, torch.zeros(3, 20), inputs)
    assert am.ce_count.tolist() == [0] * 6 + [1] + [0] * 13
    assert am.ce_sum[6].item() == pytest.approx(math.log(20))
    am.observe(labels, torch.zeros(1, 4, 20))  # no inputs, full (B, T, V) logits: every labelled position
    assert am.ce_count[6:9].tolist() == [2, 1, 1]


def test_observe_hard_counts_docstring_example():
    am = make(20)
    logits = torch.zeros(2, 20)
    logits[0, 7], logits[1, 3] = 5.0, 5.0  # right on the 7, wrong on the 9
    am.observe(torch.tensor([[-100, 7, -100, 9]]), logits)
    assert am.total[7] == am.correct[7] == am.total[9] == 1 and am.correct[9] == 0 and am.total.sum() == 2
    am.observe(torch.full((2, 3), -100), torch.zeros(0, 20))  # nothing selected: no-op, no error
    assert am.total.sum() == 2


def test_observe_rejects_mismatched_logits():
    am = make(20)
    with pytest.raises(ValueError):
        am.observe(torch.tensor([[-100, 6, 7]]), torch.zeros(3, 20))


def test_update_weights_follow_the_decaying_rate_and_keep_the_budget():
    V = 60
    am = make(V, rate=0.4, update_every=2, metric="hard")
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        x = batch(V, seed=step)
        rate = mask_rate(step, 20, 0.4, 0.15)
        inputs, labels = am.mask(x, rate=rate, generator=g)
        assert torch.allclose(am.probabilities(x, rate).sum(1), rate * n_maskable(x).float(), atol=1e-4)
        am.observe(labels, torch.randn(int((labels != -100).sum()), V, generator=g), inputs)
        am.step(rate)
        scale = rate if step % 2 == 1 else am.rate  # updates at odd steps rescale to that step's rate
        assert am.rate == pytest.approx(scale) and am.weights[am.maskable].mean().item() == pytest.approx(scale, rel=1e-5)
        assert (am.weights[~am.maskable] == 0).all() and am.weights[am.maskable].min() >= am.min_weight * 0.999
    assert am.updates == 10 and am.weights[am.maskable].std() > 0


def test_update_floor_is_relative_to_the_current_rate():
    # the docstring example: at p = 0.10 a learned type at w = 0.01 falls to 0.002 and is floored to 0.005
    am = AMLM(4, special_ids=[0], mask_id=1, rate=0.40, ema=0.2, update_every=1)
    am.weights = torch.tensor([0.0, 0.0, 0.01, 0.19])
    am.correct[2] = am.total[2] = 10**6  # type 2: always right, q = 0.1 * 0.5 / (10**6 + 1); type 3: unseen, score 0.5
    am.step(rate=0.10)
    w2, w3 = 0.005, 0.2 * 0.19 + 0.8 * 0.10 * 0.5
    assert torch.allclose(am.weights[2:], torch.tensor([w2, w3]) * 0.10 / ((w2 + w3) / 2))
    assert am.rate == 0.10 and am.weights[2:].mean().item() == pytest.approx(0.10)
    # the floor's share of the mean grows as the rate decays: 1/80 of 0.40, but 1/20 of 0.10
    assert am.weights[2] / am.weights[2:].mean() > 0.005 / 0.10


def test_update_uniform_never_changes_weights():
    V = 30
    am = make(V, metric="uniform", update_every=1)
    before = am.weights.clone()
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        inputs, labels = am.mask(batch(V, seed=step), generator=g)
        am.observe(labels, torch.randn(int((labels != -100).sum()), V, generator=g), inputs)
        am.step()
    assert torch.equal(am.weights, before) and am.updates == 5
    with pytest.raises(ValueError):  # uniform keeps no statistics: no other metric's code runs in its place
        am.mastery()


# -----------------------------------------------------------------------------
# resume, schedule, diagnostics, validation

@pytest.mark.parametrize("metric", ["hard", "soft"])
def test_state_dict_round_trip_gives_identical_future(metric):
    V = 30

    def train(am, steps, g):
        out = []
        for step in range(steps):
            inputs, labels = am.mask(batch(V, seed=step), generator=g)
            am.observe(labels, torch.randn(int((labels != -100).sum()), V, generator=g), inputs)
            am.step()
            out.append(labels)
        return out

    a = make(V, metric=metric, update_every=3)
    train(a, 4, torch.Generator().manual_seed(0))  # mid-window: statistics are non-empty
    b = make(V, metric=metric, update_every=3)
    b.load_state_dict(a.state_dict())
    la, lb = train(a, 5, torch.Generator().manual_seed(9)), train(b, 5, torch.Generator().manual_seed(9))
    assert all(torch.equal(p, q) for p, q in zip(la, lb))
    assert torch.equal(a.weights, b.weights) and a.steps == b.steps == 9 and a.updates == b.updates == 3
    with pytest.raises(ValueError):
        make(V, metric="uniform").load_state_dict(a.state_dict())


def test_state_without_a_rate_takes_its_weights_mean():
    # a state without a "rate" is at the scale of its weights: their mean over the normal types
    am = make(20, rate=0.4)
    sd = am.state_dict()
    assert sd["rate"] == 0.4
    del sd["rate"]
    other = make(20, rate=0.4)
    other.rate = 0.2
    other.load_state_dict(sd)
    assert other.rate == pytest.approx(0.4)
    sd["weights"] = sd["weights"] * 0.75  # weights at another scale: the rate is their mean, not the instance's
    other.load_state_dict(sd)
    assert other.rate == pytest.approx(0.3)


def test_schedule_mask_rate():
    assert mask_rate(0, 100, 0.4, 0.15) == pytest.approx(0.4)
    assert mask_rate(50, 100, 0.4, 0.15) == pytest.approx(0.275)
    assert mask_rate(100, 100, 0.4, 0.15) == pytest.approx(0.15)
    assert mask_rate(500, 100, 0.4, 0.15) == pytest.approx(0.15)
    assert mask_rate(37, 100, 0.15, 0.15) == 0.15


def test_diagnostics_flat_row():
    V = 40
    freq = torch.arange(V, 0, -1).float()  # id 0 most frequent ... the normal types rank 5, 3, 6, 7, ...
    am = make(V, frequencies=freq, update_every=1)
    am.weights[3], am.weights[39] = 0.9, 0.001
    tokens = [f"t{i}" for i in range(V)]
    d = am.diagnostics(tokens)
    assert all(isinstance(v, (int, float, str)) for v in d.values())
    assert d["hardest"].split("|")[0] == "t3" and d["easiest"].split("|")[0] == "t39"
    assert d["w_rank_1_10"] == pytest.approx(am.weights[[3] + list(range(5, 14))].mean().item())
    assert math.isnan(d["w_rank_101_1k"]) and d["update"] == 0
    assert "hardest t3" in am.log_line(tokens)


def test_all_reduce_is_noop_single_process():
    am = make(20)
    am.total[6] = 3
    am.all_reduce()
    assert am.total[6] == 3 and am.total.sum() == 3


@pytest.mark.parametrize("kw", [dict(rate=0.0), dict(rate=1.0), dict(metric="easy"), dict(min_weight=0.0),
                                dict(min_weight=0.5), dict(ema=1.5), dict(update_every=0), dict(frequencies=[1, 2])])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        make(20, **kw)


# -----------------------------------------------------------------------------
# evaluate.py: PLL scoring and the task formats

TEXT = ["the cat sat on the mat .", "a dog ran to the park and sat down .", "the girls were walking home .",
        "she has seen the boxes .", "box one contains the apple and the key ."] * 3

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, 330)

@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=64, dropout=0.0)
    return MaskedLM(cfg, nhot_table=tok.subtoken_table()[0]).eval()  # N-hot on: exercises frozen_embeddings

def naive_pll(model, tok, prefix, completion, word_l2r=False):
    """Reference: one copy at a time, full (1, T, V) logits, word spans from encode_words directly."""
    words = tok.encode_words(prefix + completion)
    ids = [t for w in words for t in w]
    start = len(tok.encode(prefix)) if prefix else 0
    x = torch.tensor([1] + ids + [2])
    total, i = 0.0, 0
    for w in words:
        for j in range(len(w)):
            if i >= start:
                y = x.clone()
                y[i + 1:i + 1 + (len(w) - j if word_l2r else 1)] = MASK
                with torch.no_grad():
                    logits, _ = model(y[None])
                total += logits[0, i + 1].log_softmax(-1)[x[i + 1]].item()
            i += 1
    return total

CANDS = [("", "the cat sat on the mat ."), ("", "unbelievable zebras quickly wandered ."), ("", "a"),
         ("box one contains the", " apple"), ("box one contains the", " zucchinis and the key"),
         ("the girls were walking home .", " she has seen the boxes .")]

# -----------------------------------------------------------------------------
# PLL

@pytest.mark.parametrize("pll", ["standard", "word-l2r"])
def test_batched_pll_matches_naive_loop(model, tok, pll):
    cands = [evaluate.tokenize(tok, p, c, pll) for p, c in CANDS]
    if pll == "word-l2r":
        assert any(k > 1 for _, spans in cands for k in spans)  # some word really has several sub-tokens
    got = evaluate.pll_scores(model, cands, batch_size=7, precision="fp32")  # batches straddle sentences and lengths
    want = [naive_pll(model, tok, p, c, pll == "word-l2r") for p, c in CANDS]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(g, 3) for g in got)) == len(got)

def test_word_l2r_differs_from_standard(model, tok):
    ids, spans = evaluate.tokenize(tok, "", "unbelievable zebras", "word-l2r")
    a = evaluate.pll_scores(model, [(ids, spans)], precision="fp32")[0]
    b = evaluate.pll_scores(model, [(ids, [1] * len(ids))], precision="fp32")[0]
    assert a != pytest.approx(b, abs=1e-3)

def test_tokenize_scores_only_the_completion(tok):
    ids, spans = evaluate.tokenize(tok, "box one contains the", " apple")
    assert ids == tok.encode("box one contains the apple")
    n = len(tok.encode("box one contains the"))
    assert spans == [0] * n + [1] * (len(ids) - n)
    ids, spans = evaluate.tokenize(tok, "box one contains the", " zucchinis", "word-l2r")
    assert spans[:n] == [0] * n and spans[n:] == list(range(len(ids) - n, 0, -1))  # one word, masked l2r

def test_bf16_close_and_model_left_trainable(model, tok):
    cands = [evaluate.tokenize(tok, p, c) for p, c in CANDS[:3]]
    fp32 = evaluate.pll_scores(model, cands, precision="fp32")
    assert evaluate.pll_scores(model, cands, precision="bf16") == pytest.approx(fp32, rel=0.05)
    fresh = MaskedLM(ModelConfig(**{**asdict(model.config), "nhot": False})).train()  # empty RoPE cache
    evaluate.pll_scores(fresh, cands, precision="fp32")
    assert fresh.training and "embedding_matrix" not in vars(fresh)  # mode and method restored
    _, loss = fresh(torch.randint(5, tok.vocab_size, (2, 8)), labels=torch.randint(5, tok.vocab_size, (2, 8)))
    loss.backward()  # the RoPE tables cached while scoring must not be inference tensors

def test_longer_than_max_len_is_scored_with_a_note(model, capsys):
    assert math.isfinite(evaluate.pll_scores(model, [([7] * 70, [1] * 70), ([7], [1])])[0])
    assert "1 candidates are longer than the model's max_len 64" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# metrics

def test_rankdata_and_spearman():
    assert compare.rankdata([10, 30, 20, 20]).tolist() == [1, 4, 2.5, 2.5]
    assert compare.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    assert compare.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert compare.spearman([5, 4, 3], [0.1, 0.2, 0.3]) == pytest.approx(-1.0)
    assert math.isnan(compare.spearman([1, 1, 1], [1, 2, 3]))

def test_minimal_pair_macro_average():
    items = [({"uid": "u", "field": "syntax"}, [None, None], None)] * 2 + [({"uid": "v", "field": "morphology"}, [None, None], None),
             ({"uid": "w", "field": "morphology"}, [None, None], None)]
    scores = [[-1, -2], [-3, -2], [-1, -5], [-2, -2]]  # u: 1 of 2, v: right, w: a tie counts as wrong
    res = evaluate.task_result("minimal_pairs", items, scores)
    assert res["score"] == pytest.approx((50 + 100 + 0) / 3)  # macro over UIDs, not 2/4 over pairs
    assert res["by_uid"] == {"u": {"items": 2, "score": 50.0}, "v": {"items": 1, "score": 100.0}, "w": {"items": 1, "score": 0.0}}
    assert res["by_field"] == {"syntax": 50.0, "morphology": 50.0}

def test_entity_tracking_and_ewok_grouping():
    k = lambda f, n: {"uid": f"{f}_{n}_ops", "file": f}
    items = [(k("a", 0), [0, 0, 0], None), (k("a", 0), [0, 0, 0], None), (k("a", 1), [0, 0, 0], None), (k("b", 0), [0, 0, 0], None)]
    scores = [[-1, -2, -3], [-2, -1, -3], [-1, -2, -3], [-4, -2, -3]]
    res = evaluate.task_result("entity_tracking", items, scores)
    assert res["by_file"] == {"a": 75.0, "b": 0.0} and res["score"] == 37.5  # (50 + 100) / 2 for a, then files
    items = [({"uid": "physics"}, [0, 0], None)] * 3 + [({"uid": "social"}, [0, 0], None)]
    res = evaluate.task_result("ewok", items, [[-1, -2], [-1, -2], [-2, -1], [-1, -2]])
    assert res["score"] == pytest.approx((200 / 3 + 100) / 2)

def test_wug_softmax_spearman():
    items = [({"uid": "wug"}, [0, 0], {"ratio": r, "class": "-ous"}) for r in (0.9, 0.5, 0.1, 0.5)]
    res = evaluate.task_result("wug", items, [[0.0, -2.0], [-1.0, -1.0], [-3.0, 0.0], [-1.0, -1.5]])
    p = [1 / (1 + math.exp(d)) for d in (-2.0, 0.0, 3.0, -0.5)]  # softmax share of the first sentence
    assert res["score"] == pytest.approx(100 * compare.spearman(p, [0.9, 0.5, 0.1, 0.5]))
    assert res["metric"] == "spearman" and res["items"] == 4

# -----------------------------------------------------------------------------
# files, formats, the library entry points and the CLI

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path

@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write_jsonl(d / "agreement.jsonl", [
        {"sentence_good": "the cat sat on the mat .", "sentence_bad": "the cat sat on the mats the .", "UID": "agr", "field": "morphology"},
        {"sentence_good": "the girls were walking home .", "sentence_bad": "the girls was walking home .", "UID": "agr", "field": "morphology"},
        {"sentence_good": "she has seen the boxes .", "sentence_bad": "she has see the boxes .", "UID": "irr", "field": "syntax_semantics"}])
    write_jsonl(d / "supplement.jsonl", [{"sentence_good": "a dog ran .", "sentence_bad": "a dog ran ran ."}])
    write_jsonl(d / "notes.jsonl", [{"question": "why?", "answer": "because"}])
    (d / "readme.txt").write_text("not a task")
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "wug_adj.jsonl", [{"sentences": f"the {a}ness was home .\tthe {a}ity was home .", "ratio": r}
                                          for a, r in (("cat", 0.8), ("sat", 0.3), ("mat", 0.6))])
    write_jsonl(other / "regular.jsonl", [{"input_prefix": "box one contains the", "options": [" apple", " key", " dog"], "numops": n}
                                          for n in (0, 0, 1)])
    write_jsonl(other / "ewok.jsonl", [{"Context1": "the cat sat on the mat .", "Context2": "x", "Target1": "the cat sat .",
                                        "Target2": "the mat sat .", "Domain": "physical"}])
    return d, other

def test_evaluate_paths_all_formats(model, tok, task_dir):
    d, other = task_dir
    res = evaluate.evaluate_paths(model, tok, [d, other], batch_size=16, precision="fp32", progress=False)
    assert list(res["tasks"]) == ["tasks", "other/ewok", "other/entity_tracking", "other/wug"]  # files sorted
    bl = res["tasks"]["tasks"]
    assert bl["format"] == "minimal_pairs" and bl["items"] == 4
    assert set(bl["by_uid"]) == {"agr", "irr", "supplement"}  # no UID -> the file name
    assert set(bl["by_field"]) == {"morphology", "syntax/semantics", "supplement"}
    assert res["skipped"] == [f"{d / 'notes.jsonl'}: unknown format (fields: question, answer)"]
    assert res["tasks"]["other/entity_tracking"]["by_uid"].keys() == {"regular_0_ops", "regular_1_ops"}
    assert res["pll"] == "standard" and res["precision"] == "fp32"
    # the minimal-pair verdicts follow the PLLs of the sentences
    s = evaluate.pll_scores(model, [evaluate.tokenize(tok, "", t) for t in ("she has seen the boxes .", "she has see the boxes .")], precision="fp32")
    assert bl["by_uid"]["irr"]["score"] == (100.0 if s[0] > s[1] else 0.0)
    assert bl["score"] == pytest.approx(sum(u["score"] for u in bl["by_uid"].values()) / 3)  # macro over UIDs
    one = evaluate.evaluate_paths(model, tok, [d], limit=1, pll="word-l2r", progress=False)
    assert one["tasks"]["tasks"]["items"] == 2 and one["pll"] == "word-l2r"

@pytest.mark.parametrize("line, msg", [
    ("{not json", "line 2: not valid JSON"),
    ('{"sentence_good": "a dog ran ."}', "line 2: expected the fields sentence_good, sentence_bad"),
    ('{"sentence_good": "a dog ran .", "sentence_bad": 7}', "line 2: malformed minimal_pairs record"),
])
def test_malformed_line_names_file_and_line(model, tok, tmp_path, line, msg):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"sentence_good": "a dog ran .", "sentence_bad": "a dog ran ran ."}, line])
    with pytest.raises(evaluate.EvalError, match=msg) as e:
        evaluate.evaluate_paths(model, tok, [f], progress=False)
    assert "bad.jsonl" in str(e.value)

def test_malformed_wug_and_missing_paths(model, tok, tmp_path):
    f = write_jsonl(tmp_path / "wug.jsonl", [{"sentences": "only one sentence", "ratio": 0.5}])
    with pytest.raises(evaluate.EvalError, match="wug.jsonl, line 1: malformed wug record"):
        evaluate.evaluate_paths(model, tok, [f], progress=False)
    with pytest.raises(evaluate.EvalError, match="does not exist"):
        evaluate.evaluate_paths(model, tok, [tmp_path / "nope.jsonl"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.EvalError, match="no .jsonl files"):
        evaluate.evaluate_paths(model, tok, [tmp_path / "empty"], progress=False)
    with pytest.raises(evaluate.EvalError, match="pll must be"):
        evaluate.evaluate_paths(model, tok, [f], pll="l2r", progress=False)

def test_cli_end_to_end(model, tok, task_dir, tmp_path, capsys):
    ckpt = tmp_path / "latest.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json(), "step": 3}, ckpt)
    out = tmp_path / "results.json"
    evaluate.main([str(ckpt), str(task_dir[0]), str(task_dir[1]), "--out", str(out), "--device", "cpu", "--precision", "fp32"])
    printed = capsys.readouterr()
    assert "tasks" in printed.out and "morphology" in printed.out and "PLL standard" in printed.out
    assert "notes.jsonl: unknown format" in printed.err and "PLL:" not in printed.err  # no bar: not a terminal
    res = json.loads(out.read_text())
    direct = evaluate.evaluate_paths(model, tok, task_dir, precision="fp32", progress=False)
    assert res["step"] == 3 and res["accuracy"] == pytest.approx(direct["accuracy"]) and res["unscored"] == []
    assert res["correlation"] == pytest.approx(direct["correlation"]) and "headline: accuracy" in printed.out
    assert res["tasks"]["tasks"]["by_uid"] == direct["tasks"]["tasks"]["by_uid"]

@pytest.mark.parametrize("content, msg", [(None, "does not exist"), (b"\x80\x02garbage", "cannot read checkpoint"),
                                          ({"weights": 1}, "not an amlm checkpoint")])
def test_cli_bad_checkpoint_one_line_error(tmp_path, capsys, content, msg):
    ckpt = tmp_path / "x.pt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    elif content is not None:
        torch.save(content, ckpt)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(ckpt), str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and msg in err and len(err.strip().splitlines()) == 1

def test_truncated_checkpoint(model, tok, tmp_path):
    ckpt = tmp_path / "t.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated"):
        evaluate.load_checkpoint(ckpt)

def test_ctrl_c_keeps_finished_tasks(model, tok, task_dir, tmp_path, capsys, monkeypatch):
    ckpt, out = tmp_path / "latest.pt", tmp_path / "r.json"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json()}, ckpt)
    argv = [str(ckpt), str(task_dir[0]), str(task_dir[1]), "--out", str(out), "--device", "cpu", "--precision", "fp32"]
    real, calls = evaluate.pll_scores, []
    def pll_scores(*a, **kw):  # Ctrl-C during the n-th task's pass
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(evaluate, "pll_scores", pll_scores)
    stop_at = 2
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    res = json.loads(out.read_text())
    assert e.value.code == 130 and list(res["tasks"]) == ["tasks"] and res["tasks"]["tasks"]["items"] == 4
    assert res["unscored"] == ["other/ewok", "other/entity_tracking", "other/wug"]
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted after 1 of 4 tasks; {out} holds those"
    out.unlink()
    calls.clear()
    stop_at = 1
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 130 and not out.exists()
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted before any task was finished; nothing written"

def test_headline_keeps_accuracy_and_correlation_apart():
    results = {"blimp": {"metric": "accuracy", "score": 60.0}, "ewok": {"metric": "accuracy", "score": 50.0},
               "wug": {"metric": "spearman", "score": 30.0}, "wug_flat": {"metric": "spearman", "score": math.nan}}
    assert evaluate.headline(results) == {"accuracy": 55.0, "correlation": 30.0}
    assert evaluate.headline({"wug": results["wug_flat"]}) == {"accuracy": None, "correlation": None}
    text = evaluate.headline_text({"tasks": results, "accuracy": 55.0, "correlation": 30.0})
    assert text == "accuracy 55.00 (2 tasks), correlation 30.00 (Spearman x 100, 2 tasks)"


def test_full_disk_evaluate_prints_the_results_and_one_sentence(model, tok, task_dir, tmp_path, capsys, monkeypatch):
    ckpt, out = tmp_path / "latest.pt", tmp_path / "r.json"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json()}, ckpt)
    def dump(obj, f, **kw):
        f.write("{")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(ckpt), str(task_dir[0]), "--out", str(out), "--precision", "fp32"])
    printed = capsys.readouterr()
    assert e.value.code == 1 and "headline: accuracy" in printed.out  # the results, on stdout
    assert printed.err.splitlines()[-1] == f"error: cannot write --out {out} (No space left on device); the results are printed above"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "other", "tasks"]  # no r.json, no temporary file

def test_malformed_items_are_skipped_and_counted(model, tok, tmp_path):
    rows = [{"sentence_good": "a dog ran .", "sentence_bad": "a dog ran ran .", "UID": "u"},
            {"sentence_good": "the cat sat .", "sentence_bad": "the cat sat .", "UID": "u"},  # identical: a tie
            {"sentence_good": "", "sentence_bad": "a dog ran ran .", "UID": "u"},  # empty: a PLL of 0 always wins
            {"sentence_good": "a dog ran .", "sentence_bad": " ", "UID": "v"}]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    res = evaluate.evaluate_paths(model, tok, [f], precision="fp32", progress=False)["tasks"]["pairs"]
    assert res["items"] == 1 and set(res["by_uid"]) == {"u"}
    assert res["skipped_items"] == {"identical sentences": 1, "an empty sentence": 2}
    assert "skipped 3 items (identical sentences: 1, an empty sentence: 2)" in evaluate.format_table(
        {"tasks": {"pairs": res}, "accuracy": 1.0, "correlation": None, "pll": "standard", "precision": "fp32",
         "copies": 0, "seconds": 0.0})

def _wug_items(n_per_class=30, seed=0, signal=0.0):
    """Constructed WUG items: four classes with their own mean human ratio and token-count difference, the model's
    log-likelihood ratio a function of class and dtok (plus, with signal > 0, of the item's own ratio)."""
    rng = np.random.default_rng(seed)
    items = []
    for c, (mean, dtok) in {"-able": (0.8, -2), "-ive": (0.6, 0), "-ous": (0.5, -1), "-ish": (0.05, 0)}.items():
        for k in range(n_per_class):
            ratio = float(np.clip(mean + rng.normal(0, 0.15), 0, 1))
            d = int(dtok + rng.integers(-1, 2))
            llr = -1.0 * d + 0.5 * mean + signal * (ratio - mean) + 0.01 * rng.normal()
            items.append({"pair": [f"x{c}{k}ity", f"x{c}{k}ness"], "ratio": ratio, "class": c, "dtok": d, "llr": llr})
    return items

def test_controlled_score_sees_through_class_and_token_counts():
    items = _wug_items()
    official = compare.spearman([i["llr"] for i in items], [i["ratio"] for i in items])
    c = compare.controlled(items)
    assert official > 0.5 and abs(c["rho_ctrl"]) < 15 and c["ci"][0] < 0 < c["ci"][1]  # class and dtok: nothing left
    assert c["classes"] == {"-able": 30, "-ish": 30, "-ive": 30, "-ous": 30}
    real = compare.controlled(_wug_items(signal=5.0))
    assert real["rho_ctrl"] > 50 and real["ci"][0] > 0  # a real within-class signal is seen
    assert compare.controlled(items, seed=3) == compare.controlled(items, seed=3)  # the bootstrap is seeded
    assert compare.controlled(items, seed=3)["ci"] != compare.controlled(items, seed=4)["ci"]
    # paired: a model against itself differs by exactly 0; against the constructed signal clearly
    same = compare.compare_controlled(items, items)
    assert same["difference"] == 0 and same["ci"] == [0, 0] and same["items"] == 120
    diff = compare.compare_controlled(_wug_items(signal=5.0), items)
    assert diff["difference"] > 50 and diff["ci"][0] > 0
    with pytest.raises(evaluate.EvalError, match="share 0 WUG items"):
        compare.compare_controlled(items, [{**i, "pair": ["a", "b"]} for i in items])

def test_wug_class_limit_and_cli(model, tok, tmp_path, capsys):
    assert evaluate.wug_class(["Create ... adjective: tefigious. tefigiosity", "... adjective: tefigious. tefigiousness"]) == "-ous"
    assert evaluate.wug_class(["the catness was home .", "the catity was home ."]) == "-cat"  # any other: its last letters
    # a WUG file sorted by class: --limit takes the same share of each class, not the first lines
    rows = [{"sentences": f"make a noun: {a}{s}. {a}{s}ity\tmake a noun: {a}{s}. {a}{s}ness", "ratio": r}
            for s, r in (("able", 0.9), ("ish", 0.1), ("ive", 0.6), ("ous", 0.5)) for a, r in
            zip(("nut", "bli", "fro", "gla", "pre", "sto"), (r, r - 0.05, r + 0.05, r - 0.1, r + 0.1, r))]
    f = write_jsonl(tmp_path / "wug.jsonl", rows)
    _, items, _ = evaluate.read_items(f, limit=8)
    assert Counter(it[2]["class"] for it in items) == {"-able": 2, "-ish": 2, "-ive": 2, "-ous": 2}
    assert [it[1][0][1] for it in items][:2] == [r["sentences"].split("\t")[0] for r in rows[:2]]  # the first of each
    # the CLI prints rho_ctrl with its CI and the classes; two result files compare on the same items
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json()}, ckpt)
    for name in ("a", "b"):
        evaluate.main([str(ckpt), str(f), "--out", str(tmp_path / f"{name}.json"), "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "rho_ctrl (class, dtok held)" in out and "items per class: -able 6, -ish 6, -ive 6, -ous 6" in out
    res = json.loads((tmp_path / "a.json").read_text())["tasks"]["wug"]
    assert len(res["per_item"]) == 24 and {"dtok", "llr", "ratio", "class", "pair"} <= set(res["per_item"][0])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert e.value.code == 0 and "A - B +0.0, 95 % paired bootstrap CI [+0.0, +0.0]" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# bad input: one table for the three command lines. Each case must exit non-zero with one line on
# stderr naming the problem, no traceback, and nothing half-written: the files it was given stay as they were
# (absent stays absent: no latest.pt, no lock, no results file), and every token cache left is one that passes its check.

class _RunsCode:
    def __reduce__(self):  # unpickling would call os.system: weights_only must refuse it
        return os.system, ("echo pwned > pwned.txt",)

SETUP = {  # files some cases need, made in the case's tmp folder
    "afile": lambda tmp, run: (tmp / "afile").write_text("x"),
    "tasks": lambda tmp, run: write_jsonl(tmp / "tasks.jsonl", [{"sentence_good": "a dog ran .", "sentence_bad": "a dog ran ran ."}]),
    "empties": lambda tmp, run: write_jsonl(tmp / "empties.jsonl", [{"sentence_good": "", "sentence_bad": "a dog ran ran ."},
                                                                    {"sentence_good": "a dog ran .", "sentence_bad": "  "}]),
    "tiny": lambda tmp, run: (tmp / "tiny.txt").write_text("a b.\nc d.\ne f.\n"),  # 2 train lines, 14 tokens
    "empty": lambda tmp, run: (tmp / "empty.txt").write_text(" \n\n"),
    "emptydir": lambda tmp, run: (tmp / "emptydir").mkdir(),
    "notes": lambda tmp, run: (tmp / "notes").mkdir() or write_jsonl(tmp / "notes" / "n.jsonl", [{"question": "why?"}]),
    "badjson": lambda tmp, run: (tmp / "badjson").mkdir() or write_jsonl(tmp / "badjson" / "bad.jsonl", ["{not json"]),
    "utf8": lambda tmp, run: (tmp / "utf8.jsonl").write_bytes(
        b'{"sentence_good": "a dog ran .", "sentence_bad": "a dog ran ran ."}\n{"sentence_good": "caf\xe9"}\n'),
    "results": lambda tmp, run: (tmp / "results").mkdir(),
    "noopt": lambda tmp, run: (tmp / "noopt").mkdir() or torch.save(
        {k: v for k, v in torch.load(Path(run) / "latest.pt", weights_only=True).items() if k != "optimizer"},
        tmp / "noopt" / "latest.pt"),
    "truncated": lambda tmp, run: (tmp / "truncated").mkdir() or (tmp / "truncated" / "latest.pt").write_bytes(
        (Path(run) / "latest.pt").read_bytes()[:3000]),
    "pickle": lambda tmp, run: (tmp / "pickle").mkdir() or (tmp / "pickle" / "latest.pt").write_bytes(pickle.dumps(_RunsCode(), protocol=2)),
    "orphans": lambda tmp, run: (tmp / "orphans").mkdir() or (tmp / "orphans" / "log.txt").write_text("old\n"),
    "locked": lambda tmp, run: (tmp / "locked").mkdir() or (tmp / "locked" / "train.lock").write_text(
        f"{os.getppid()}@{socket.gethostname()}"),  # a live process: pytest's parent
    "ro": lambda tmp, run: (tmp / "ro").mkdir(mode=0o555),
    "latin1": lambda tmp, run: (tmp / "latin1.txt").write_bytes("a line\ncafé au lait\n".encode("latin-1")),
    "binary": lambda tmp, run: (tmp / "x.train").write_bytes(b"some text\n" + bytes(range(256)) * 100),
    "zip": lambda tmp, run: _zip_corpus(tmp / "train_10M.zip"),
    "zipdir": lambda tmp, run: (tmp / "zipdir").mkdir() or _zip_corpus(tmp / "zipdir" / "train_10M.zip"),
    "link": lambda tmp, run: (tmp / "link.pt").symlink_to(Path(run) / "latest.pt"),
}

def _zip_corpus(path):
    """A zip like the one BabyLM serves: a folder of *.train files, compressed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_10M/childes.train", _corpus_lines(300))
as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
E = "{ckpt} {tmp}/tasks.jsonl --out {tmp}/r.json"  # evaluate.py: a good command, then one bad thing
BAD_INPUT = [  # (command line, arguments (train.py: after a good small run's flags), setup, what the line must say)
    # train.py: numeric ranges
    ("train", "--grad-clip -1", "", "--grad-clip: must be positive, got -1"),
    ("train", "--grad-clip 0", "", "--grad-clip: must be positive, got 0"),
    ("train", "--epochs -1", "", "--epochs: must be positive, got -1"),
    ("train", "--batch-tokens 0", "", "--batch-tokens: must be positive"),
    ("train", "--n-head 0", "", "--n-head: must be positive"),
    ("train", "--d-model 0", "", "--d-model: must be positive"),
    ("train", "--n-layer 0", "", "--n-layer: must be positive"),
    ("train", "--d-ff 0", "", "--d-ff: must be positive"),
    ("train", "--vocab-size 0", "", "--vocab-size: must be positive"),
    ("train", "--amlm-update-every 0", "", "--amlm-update-every: must be positive"),
    ("train", "--lr -1", "", "--lr: must be positive, got -1"),
    ("train", "--lr nan", "", "--lr: must be positive, got nan"),
    ("train", "--warmup -1", "", "--warmup: must be non-negative"),
    ("train", "--weight-decay -0.1", "", "--weight-decay: must be non-negative"),
    ("train", "--dropout 1", "", "--dropout: must be in [0, 1)"),
    ("train", "--amlm-ema 1", "", "--amlm-ema: must be in [0, 1)"),
    ("train", "--mask-rate 1.5", "", "strictly between 0 and 1"),
    ("train", "--max-steps -3", "", "--max-steps: must be non-negative"),
    ("train", "--stop-after 0", "", "--stop-after: must be positive"),
    ("train", "--eval-tokens 0", "", "--eval-tokens: must be positive"),
    ("train", "--seed -1", "", "--seed: must be in [0, 2^63)"),
    # train.py: other flags
    ("train", "--seq-len 64,100", "", "must divide 100"),
    ("train", "--seq-len abc", "", "--seq-len must be positive integers"),
    ("train", "--seq-len 0,32", "", "--seq-len must be positive integers"),
    ("train", "--batch-tokens 100", "", "must be a multiple of it"),
    ("train", "--grad-accum 3", "", "16 sequences of 32 per step, which do not split evenly over 1 process(es) x --grad-accum 3"),
    ("train", "--grad-accum 0", "", "--grad-accum: must be positive"),
    ("train", "--n-head 3", "", "--d-model must be a multiple of --n-head"),
    ("train", "--device mps", "", "--device: invalid choice: 'mps'"),
    ("train", "--learning-rate 1", "", "unrecognized arguments: --learning-rate"),
    ("train", "--eval-blimp {tmp}/typo", "", "typo does not exist"),
    ("train", "--eval-blimp {tmp}/emptydir", "emptydir", "emptydir holds no .jsonl files"),
    ("train", "--eval-blimp {tmp}/notes", "notes", "holds no file of a task format"),
    ("train", "--eval-blimp {tmp}/badjson", "badjson", "bad.jsonl, line 1: not valid JSON"),
    # train.py --resume
    ("train", "--resume {run} --lr 0.5", "", "--lr 0.5 (the run has 0.001) differ"),
    ("train", "--resume {run} --seq-len 32", "", "--seq-len 32 (the run has 16,32) differ"),
    ("train", "--resume {run} --out {tmp}/y", "", "--out {tmp}/y (the run has {run}) differ"),
    ("train", "--resume {run} --lr 0.5 --out {tmp}/y --seq-len 32", "",
     "but --out {tmp}/y (the run has {run}), --seq-len 32 (the run has 16,32), --lr 0.5 (the run has 0.001) differ"),
    ("train", "--resume {run} --size small", "", "--size small (the run has tiny)"),
    ("train", "--resume {run} --overwrite", "", "give one of them"),
    ("train", "--resume {tmp}/nothere", "", "cannot resume from {tmp}/nothere: it holds no latest.pt"),
    ("train", "--resume {run}/latest.pt", "", "--resume takes the run folder, not a file: try --resume {run}"),
    ("train", "--resume {tmp}/noopt", "noopt", "its latest.pt lacks optimizer"),
    ("train", "--resume {tmp}/truncated", "truncated", "cannot resume from {tmp}/truncated: cannot read checkpoint"),
    ("train", "--resume {tmp}/pickle", "pickle", "cannot resume from {tmp}/pickle: cannot read checkpoint"),
    # train.py: the run folder
    ("train", "--out {run}", "", "{run} already holds a run (latest.pt); continue it with --resume {run}"),
    ("train", "--out {tmp}/orphans", "orphans", "holds files of an earlier run (log.txt) but no latest.pt"),
    ("train", "--out {tmp}/orphans --overwrite", "orphans", "--overwrite deletes only a run train.py wrote"),
    ("train", "--corpus {tmp} --out {tmp}/runs/a", "tiny", "is inside the corpus folder"),
    ("train", "--out {tmp}/locked", "locked", "{tmp}/locked is in use by another train.py (pid"),
    ("train", "--out {tmp}/afile", "afile", "--out {tmp}/afile is a file, not a folder"),
    ("train", "--out {tmp}/afile/run", "afile", "cannot write to the run folder {tmp}/afile/run"),
    pytest.param("train", "--out {tmp}/ro", "ro", "cannot write to the run folder {tmp}/ro", marks=as_root),
    # train.py: the data
    ("train", "--data-dir {tmp}/afile/data", "afile", "data dir {tmp}/afile/data is not writable"),
    ("train", "--corpus {tmp}/missing.txt", "", "unknown corpus"),
    ("train", "--corpus {tmp}/empty.txt", "empty", "holds no text"),
    ("train", "--corpus {tmp}/emptydir", "emptydir", "holds no *.train or *.txt files"),
    ("train", "--corpus {tmp}/tiny.txt", "tiny", "the corpus gives 14 training tokens, fewer than the 32 of one block"),
    ("train", "--vocab-size 10", "", "vocab size 10 is smaller than the"),
    ("train", "--corpus {tmp}/latin1.txt", "latin1", "latin1.txt is not UTF-8 text: byte 10 is 0xE9"),
    ("train", "--corpus {tmp}/x.train", "binary", "x.train is not a text file: byte 10 is a NUL byte"),
    ("train", "--corpus {tmp}/train_10M.zip", "zip", "train_10M.zip is a zip archive: unzip it"),
    ("train", "--corpus {tmp}/zipdir", "zipdir", "holds no *.train or *.txt files (train_10M.zip is a zip archive"),
    ("train", "--seq-len 1", "", "--seq-len 1: every length must be at least 4"),
    ("train", "--seq-len 2,32", "", "--seq-len 2,32: every length must be at least 4"),
    ("train", "--compile --fast", "", "--compile compiles the plain model"),
    # data.py
    ("data", "--corpus {tmp}/missing.txt --data-dir {data}", "", "unknown corpus"),
    ("data", "--corpus {tmp}/tiny.txt --vocab-size abc", "tiny", "--vocab-size: invalid int value: 'abc'"),
    ("data", "--corpus {tmp}/tiny.txt --data-dir {data} --vocab-size 0", "tiny", "vocab size must be a positive integer"),
    ("data", "--corpus {tmp}/empty.txt --data-dir {data}", "empty", "holds no text"),
    ("data", "--corpus {tmp}/latin1.txt --data-dir {data}", "latin1", "latin1.txt is not UTF-8 text: byte 10"),
    ("data", "--corpus {tmp}/train_10M.zip --data-dir {data}", "zip", "is a zip archive: unzip it"),
    # evaluate.py
    ("evaluate", E + " --out {tmp}/results", "results", "--out {tmp}/results is a folder; give a file name"),
    ("evaluate", E + " --out {tmp}/afile/r.json", "afile", "cannot write --out {tmp}/afile/r.json"),
    pytest.param("evaluate", E + " --out {tmp}/ro/r.json", "ro", "cannot write --out {tmp}/ro/r.json", marks=as_root),
    ("evaluate", "{tmp}/nothere.pt {tmp}/tasks.jsonl --out {tmp}/new/deep/r.json", "", "does not exist"),  # no new/ left
    ("evaluate", E + " --device mps", "", "device 'mps' is not supported"),
    ("evaluate", E + " --device gpu0", "", "unknown device 'gpu0'"),
    pytest.param("evaluate", E + " --device cuda", "", "no CUDA GPU is available", marks=no_cuda),
    ("evaluate", E + " --batch-size 0", "", "--batch-size, --limit and --threads must be positive"),
    ("evaluate", E + " --pll l2r", "", "--pll: invalid choice: 'l2r'"),
    ("evaluate", E + " --precision fp16", "", "--precision: invalid choice: 'fp16'"),
    ("evaluate", "{ckpt} {tmp}/utf8.jsonl --out {tmp}/r.json", "utf8", "utf8.jsonl, line 2: not UTF-8"),
    ("evaluate", "{ckpt} {tmp}/badjson --out {tmp}/r.json", "badjson", "bad.jsonl, line 1: not valid JSON"),
    ("evaluate", "{ckpt} {tmp}/notes --out {tmp}/r.json", "notes", "nothing to score: all 1 files were skipped"),
    ("evaluate", "{ckpt} {tmp}/nothere.jsonl --out {tmp}/r.json", "", "nothere.jsonl does not exist"),
    ("evaluate", "{tmp}/emptydir {tmp}/tasks.jsonl --out {tmp}/r.json", "emptydir", "is a folder; give a .pt file"),
    ("evaluate", "{tmp}/missing.pt {tmp}/tasks.jsonl --out {tmp}/r.json", "", "missing.pt does not exist"),
    ("evaluate", "{tmp}/afile {tmp}/tasks.jsonl --out {tmp}/r.json", "afile", "cannot read checkpoint"),
    ("evaluate", "{ckpt}", "", "give a checkpoint and at least one PATH"),
    ("evaluate", "--compare {tmp}/afile {tmp}/afile", "afile", "afile is not a results file of evaluate.py --out"),
    ("evaluate", "{ckpt} --compare {tmp}/afile {tmp}/afile", "afile", "--compare takes the files to compare (A.json B.json, or A B LABELS.jsonl), not a checkpoint"),
    ("evaluate", "{ckpt} {tmp}/empties.jsonl", "empties", "every minimal_pairs item was skipped (an empty sentence: 2)"),
    # evaluate.py --out: never one of its inputs, by whatever path, nor another file that is not a result
    ("evaluate", "{run}/latest.pt {tmp}/tasks.jsonl --out {run}/latest.pt", "", "--out {run}/latest.pt is the checkpoint being scored"),
    ("evaluate", "{run}/latest.pt {tmp}/tasks.jsonl --out {tmp}/link.pt", "link", "--out {tmp}/link.pt is the checkpoint being scored"),
    ("evaluate", E + " --out {tmp}/tasks.jsonl", "", "--out {tmp}/tasks.jsonl is a task file being scored"),
    ("evaluate", "{ckpt} {tmp} --out {tmp}/tasks.jsonl", "", "--out {tmp}/tasks.jsonl is a task file being scored"),
    ("evaluate", E + " --out {run}/log.txt", "", "--out {run}/log.txt exists and is not a results file of evaluate.py"),
]

@pytest.fixture(scope="module")
def saved_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    run(["--max-steps", "2"], data_dir, out)
    return str(out)

@pytest.fixture(scope="module")
def saved_ckpt(model, tok, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "latest.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json()}, ckpt)
    return str(ckpt)

def snapshot(*folders):
    """Every file under folders with its size and modification time, and every folder."""
    return {str(p): p.is_dir() or (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in Path(f).rglob("*")}

@pytest.mark.parametrize("cli, args, setup, msg", BAD_INPUT)
def test_bad_input_gets_one_line(cli, args, setup, msg, tmp_path, data_dir, saved_run, saved_ckpt, capsys):
    places = {"tmp": tmp_path, "run": saved_run, "data": data_dir, "ckpt": saved_ckpt}
    for name in ["tasks", *setup.split()]:
        SETUP[name](tmp_path, saved_run)
    argv = args.format(**places).split()
    if cli == "train" and not args.startswith("--resume"):
        argv = SMALL + ["--data-dir", data_dir, "--out", str(tmp_path / "out"), "--max-steps", "2"] + argv
    before = snapshot(tmp_path, saved_run)
    try:
        rc = {"train": train.main, "data": data.main, "evaluate": evaluate.main}[cli](argv)
    except SystemExit as e:  # any other exception fails the test: it would be a traceback
        rc = e.code
    err = capsys.readouterr().err + (f"{rc}\n" if isinstance(rc, str) else "")
    lines = [line for line in err.splitlines() if line and not line.startswith(("data: ", "bpe merges"))]  # not progress
    assert rc not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert msg.format(**places) in lines[0]
    assert snapshot(tmp_path, saved_run) == before  # nothing written, nothing changed, no lock left
    caches = [c for c in (Path(data_dir) / "cache").iterdir()]
    assert all(c.name.isalnum() for c in caches)  # no .tmp or .bad folders left behind
    for c in caches:
        data.load_cache(c)  # every cache left passes its check


def _damage_npy(name, make):
    def damage(cache):
        a = np.load(cache / name)
        np.save(cache / name, make(a))
    return damage

def _truncate(name, keep=0.5):
    return lambda cache: (cache / name).write_bytes((cache / name).read_bytes()[:int(keep * (cache / name).stat().st_size)])

CACHE_DAMAGE = {
    "train.npy cut short": _truncate("train.npy"),
    "val.npy cut short": _truncate("val.npy", 0.9),
    "train.npy not an array": lambda c: (c / "train.npy").write_text("garbage"),
    "train.npy random ids, same size": _damage_npy("train.npy", lambda a: np.random.default_rng(0).integers(0, 400, len(a)).astype(a.dtype)),
    "train.npy constant ids, same size": _damage_npy("train.npy", lambda a: np.full_like(a, 7)),
    "train.npy one id changed": _damage_npy("train.npy", lambda a: np.where(np.arange(len(a)) == len(a) // 2, 9, a).astype(a.dtype)),
    "train.npy as int32": _damage_npy("train.npy", lambda a: a.astype(np.int32)),
    "val.npy missing": lambda c: (c / "val.npy").unlink(),
    "meta.json cut short": _truncate("meta.json"),
    "meta.json missing": lambda c: (c / "meta.json").unlink(),
    "meta.json of an older version (no checksums)": lambda c: (c / "meta.json").write_text(
        json.dumps({k: v for k, v in json.loads((c / "meta.json").read_text()).items() if k != "checks"})),
    "tokenizer.json corrupt": lambda c: (c / "tokenizer.json").write_text('{"format": "amlm-bpe", "merges": [[1'),
    "tokenizer.json missing": lambda c: (c / "tokenizer.json").unlink(),
    "tokenizer.json another valid tokenizer": lambda c: Tokenizer.train("the cat sat", 300).save(c / "tokenizer.json"),
}

@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A corpus and its token cache, built once; each case damages a copy."""
    tmp = tmp_path_factory.mktemp("cache")
    corpus = _write_text(tmp / "c.txt", _corpus_lines(300))
    d = data.prepare(str(corpus), tmp / "d", 400, quiet=True)
    return corpus, d.cache_dir, np.array(d.train), np.array(d.val), d.tokenizer.tokens

@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_cache_is_rebuilt_not_loaded(damage, built_cache, tmp_path, capsys):
    corpus, cache, train_ids, val_ids, tokens = built_cache
    copy = tmp_path / "cache" / cache.name
    shutil.copytree(cache, copy)
    CACHE_DAMAGE[damage](copy)
    d = data.prepare(str(corpus), tmp_path, 400, quiet=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"data: the token cache {copy} fails its check (") and "rebuilding it" in err
    assert not d.info["cache_hit"] and d.cache_dir == copy and d.tokenizer.tokens == tokens
    assert np.array_equal(d.train, train_ids) and np.array_equal(d.val, val_ids)
    assert data.prepare(str(corpus), tmp_path, 400, quiet=True).info["cache_hit"] and not capsys.readouterr().err
    assert os.listdir(tmp_path / "cache") == [cache.name]  # the broken copy is gone, nothing half-written is left

def test_checksum_covers_everything_up_to_the_limit_then_samples():
    a = (np.arange(200_000) % 251).astype(np.uint8)
    assert data.checksum(a) == hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() == data.checksum(a.tobytes())
    sampled = lambda x: data.checksum(x, limit=256 * 16)  # 256 slices of 16 bytes, one every 781 bytes
    inside, outside = a.copy(), a.copy()
    inside[781 * 5 + 3] += 1
    outside[781 * 5 + 100] += 1
    assert sampled(inside) != sampled(a) and sampled(outside) == sampled(a) and data.checksum(outside) != data.checksum(a)


# -----------------------------------------------------------------------------
# the run folder, the lock, odd corpora, --help

def test_overwrite_replaces_only_the_runs_files(data_dir, tmp_path):
    run(["--max-steps", "3"], data_dir, tmp_path)
    (tmp_path / "ckpt_1M.pt").write_bytes(b"an old milestone")
    (tmp_path / "blimp_1M.json").write_text("{}")  # evaluate.py's, not train.py's: kept
    ck = run(["--max-steps", "2", "--overwrite"], data_dir, tmp_path)
    assert ck["step"] == 2 and not (tmp_path / "ckpt_1M.pt").exists() and (tmp_path / "blimp_1M.json").exists()
    assert open(tmp_path / "log.txt").read().count("config:") == 1 and not (tmp_path / "train.lock").exists()
    train.main(["--resume", str(tmp_path), "--max-steps", "4", "--data-dir", data_dir, "--stop-after", "1"])
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 3  # flags meant to change may

def test_stale_lock_is_taken_over_with_a_warning(data_dir, tmp_path, capsys):
    tmp_path.joinpath("train.lock").write_text(f"99999999@{socket.gethostname()}")  # above Linux's largest pid
    run(["--max-steps", "1"], data_dir, tmp_path)
    err = capsys.readouterr().err
    assert f"warning: taking over {tmp_path / 'train.lock'}, left by pid 99999999, which is no longer running" in err
    assert not (tmp_path / "train.lock").exists()

def test_ctrl_c_before_training_releases_the_folder(data_dir, tmp_path, capsys, monkeypatch):
    def prepare(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "prepare", prepare)
    with pytest.raises(SystemExit) as e:
        train.main(SMALL + ["--data-dir", data_dir, "--out", str(tmp_path / "run")])
    assert e.value.code == 130 and not (tmp_path / "run").exists()  # made, locked, then removed again
    assert capsys.readouterr().err == "interrupted before training started; nothing was saved\n"

def test_small_validation_split_is_noted_and_skipped(tmp_path, capsys):
    corpus = _write_text(tmp_path / "c.txt", _corpus_lines(149))  # one validation line: fewer tokens than a block
    train.main(SMALL + ["--corpus", str(corpus), "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "run"),
                        "--max-steps", "2"])
    assert "note: the validation split has " in capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert s["steps"] == 2 and s["val_loss"] is None

def test_help_gives_one_default_per_flag_and_says_what_resume_keeps():
    text = train.get_parser().format_help()
    options, epilog = text.split("options:\n")[1].split("\n\n", 1)
    entries = re.split(r"\n  (?=-)", options)[1:]  # [0] is -h
    assert len(entries) == len(vars(train.get_parser().parse_args([]))) and all(e.count("default") == 1 for e in entries), [e for e in entries if e.count("default") != 1]
    assert "--resume RUN_DIR keeps every setting of the saved run" in " ".join(epilog.split())
    for size, vocab in (("paper", 40000), ("tiny", 16384)):  # the defaults the help gives in words
        args = train.parse_args(["--size", size, "--corpus", "x"])[0]
        assert args.vocab_size == vocab and args.batch_tokens == 16384
    assert train.parse_args(["--corpus", "synthetic"])[0].batch_tokens == 4096

def _full_disk(monkeypatch, kind):
    """torch.save on a full disk: it writes part of the file, then fails the way torch reports it."""
    real = torch.save
    def save(obj, path, *a, **kw):
        if str(path).endswith(".pt") or ".pt.tmp" in str(path):
            Path(path).write_bytes(b"half a checkpoint")
            if kind == "oserror":
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", save)

@pytest.mark.parametrize("kind", ["oserror", "runtimeerror"])
def test_full_disk_train_one_sentence_previous_latest_intact(data_dir, tmp_path, capsys, monkeypatch, kind):
    run(["--max-steps", "4", "--stop-after", "2"], data_dir, tmp_path)
    before, names = (tmp_path / "latest.pt").read_bytes(), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    _full_disk(monkeypatch, kind)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path), "--data-dir", data_dir])
    err = capsys.readouterr().err
    assert str(e.value.code).startswith(f"error: cannot write {tmp_path}/latest.pt (") and "Traceback" not in err
    assert "(No space left on device)" in str(e.value.code)  # also where torch.save said only "unexpected pos"
    assert (tmp_path / "latest.pt").read_bytes() == before  # the previous checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left, no lock

def test_stale_temp_files_are_removed_at_the_next_start(data_dir, tmp_path, capsys):
    run(["--max-steps", "4", "--stop-after", "2"], data_dir, tmp_path)
    for name in ("latest.pt.tmp4242", "ckpt_1M.pt.tmp77", "summary.json.tmp9", "notes.tmp1", "latest.pt.tmpx"):
        (tmp_path / name).write_bytes(b"left by a killed run")  # the last two are not names train.py writes
    capsys.readouterr()
    train.main(["--resume", str(tmp_path), "--data-dir", data_dir])
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.tmp*")) == ["latest.pt.tmpx", "notes.tmp1"]
    assert err.count("a temporary file an interrupted run left") == 3

def test_what_the_log_says_before_the_first_step(data_dir, tmp_path, capsys, monkeypatch):
    # the estimate, a rising rate said as rising, too few AMLM updates noted; a vocabulary the corpus cannot fill
    train.main(SMALL + ["--data-dir", data_dir, "--out", str(tmp_path / "a"), "--max-steps", "6", "--vocab-size", "100000",
                        "--mask-rate-start", "0.1", "--mask-rate-end", "0.4"])
    log, err = (tmp_path / "a" / "log.txt").read_text(), capsys.readouterr().err
    assert "the vocabulary stops there, short of the 100,000 asked for (--vocab-size)" in err
    assert "masking: hard, rate 0.10 -> 0.40 (rising)" in log and "update the masking weights 1 time(s)" in log
    est = re.search(r"estimate: 6 steps of 512 tokens on cpu \(fp32\) take about (\d+) s", log)
    assert est and log.index("estimate:") < log.index("step 1/6") and "note: this is a GPU-sized run" not in log
    assert [int(s) for s in re.findall(r"^step (\d+)/6:", log, flags=re.M)] == [1]  # the first step; 10 and 100 never come
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0)  # a slow device: a speed line at every step, by the clock
    train.main(SMALL + ["--data-dir", data_dir, "--out", str(tmp_path / "b"), "--max-steps", "3"])
    assert re.findall(r"^step (\d+)/3: .* tok/s, ETA", (tmp_path / "b" / "log.txt").read_text(), flags=re.M) == ["1", "2", "3"]
    # a run that would take days on this CPU names one that fits, with its own estimate
    monkeypatch.setattr(estimate, "run_seconds", lambda *a, **kw: 3 * 86400.0)
    lines = estimate.estimate_lines(tiny_model(), train.parse_args(SMALL + ["--max-steps", "9"])[0], 0, 9,
                                    torch.autocast("cpu", enabled=False), train.seq_len_at)
    assert "take about 72.0 h (3.0 days)" in lines[0] and "python train.py --corpus synthetic --size tiny" in lines[1]


# -----------------------------------------------------------------------------
# export.py: the Hugging Face folder, checked through transformers (a test dependency only: without it these
# tests skip, unless AMLM_REQUIRE_TRANSFORMERS is set, as .ci/run does, which turns a missing one into a failure)

import export


def _transformers():
    if os.environ.get("AMLM_REQUIRE_TRANSFORMERS"):
        import transformers  # CI installed it: an ImportError here fails the test
        return transformers
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers): "
                               "the export exactness tests need it, export.py itself does not")

TRICKY = ["", " ", "\n", "a", "The dog walked.", "  runs   of\tspaces  \n\n and\r\nnewlines ", "naïve café résumé",
          "nai\u0308ve cafe\u0301 (combining marks)", "Hi 🦊🦊 fox 👩‍👩‍👧 and ☃!", "日本語のテキスト", "x² ½ 12,500.75 ٣٤ _a_ __init__",
          "don't 'quoted' it’s l'homme’s", "a\u2028b\u3000c\xa0d\x1ce\x85f\u200bg", "literal ▁ marker▁x ▁▁", "\0\x99 ctrl \x7f",
          "[MASK] [CLS] [SEP] <0x41> ##x", "supercalifragilistic" * 7 + " end", "Ünïcödé ÀÉÎÕÜ ß ẞ ǅ ǈ", "🦊" * 70]


@pytest.fixture(scope="module")
def hf_ckpt(data_dir, tmp_path_factory):
    """A checkpoint trained a few steps on the synthetic corpus (N-hot on, 2 layers)."""
    out = tmp_path_factory.mktemp("hf_run")
    run(["--max-steps", "8", "--n-layer", "2"], data_dir, out)
    return out / "latest.pt"


@pytest.fixture(scope="module")
def hf_dir(hf_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_export") / "model"
    assert export.main([str(hf_ckpt), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return _transformers().AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)


def _ours(hf_ckpt):
    model, tok, _ = evaluate.load_checkpoint(hf_ckpt)
    return model, tok


def _check_offsets(text, tokens, offsets):
    """Each token's span ends with its own characters (a "▁" stands for the whitespace before it, and byte
    tokens share their character's span), and the spans, read in order, spell the text without whitespace."""
    spelled, last = [], None
    for t, (s, e) in zip(tokens, offsets):
        if t in data.SPECIALS:
            assert (s, e) == (0, 0), t
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            assert e - s == 1 and int(t[3:5], 16) in text[s:e].encode(), (t, text[s:e])
            spelled += [text[s:e]] if (s, e) != last else []
            last = (s, e)
        elif t.replace("▁", ""):
            core = t.replace("▁", "")
            assert text[s:e].replace("▁", " ").strip() == core, (t, text[s:e])
            spelled.append(core)
    assert "".join(spelled) == "".join(text.replace("▁", " ").split())


def _with_specials(tok, s):
    """Our ids of s with each special token's name typed in it as that special token (what Hugging Face
    tokenizers do; tokenizer.Tokenizer itself keeps them plain text). Example: "a [MASK] b" -> [▁a, MASK, ▁b]"""
    parts = re.split("(" + "|".join(map(re.escape, tokenizer.SPECIALS)) + ")", s)
    return [i for p in parts for i in ([tokenizer.SPECIALS.index(p)] if p in tokenizer.SPECIALS else tok.encode(p))]

def test_export_tokenizer_ids_offsets_decode_on_tricky_text(hf_ckpt, hf_tok):
    _, tok = _ours(hf_ckpt)
    for s in TRICKY:
        enc = hf_tok(s, return_offsets_mapping=True)
        ours = _with_specials(tok, s)
        assert enc["input_ids"] == [CLS] + ours + [SEP], repr(s)
        assert ours == tok.encode(s) or any(name in s for name in tokenizer.SPECIALS)  # identical without the names
        if ours == tok.encode(s):
            _check_offsets(s, hf_tok.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"])
        assert hf_tok.decode(enc["input_ids"], skip_special_tokens=True) == tok.decode(ours), repr(s)
    pair = hf_tok("The cat sat.", "  A dog 🦊 ran. ")
    assert pair["input_ids"] == [CLS] + tok.encode("The cat sat.") + [SEP] + tok.encode("  A dog 🦊 ran. ") + [SEP]
    assert "token_type_ids" not in pair  # the model has no segment embedding
    batch = hf_tok(["a b", "the happy dog walked"], padding=True)
    assert batch["input_ids"][0][-1] == data.PAD and batch["attention_mask"][0][-1] == 0


def test_export_tokenizer_every_code_point(hf_tok):
    # Python's classes (\s, \d, [^\W\d_], ...) against the Rust engine's spelled-out ones, for all of Unicode:
    # a code point put in another class would move a pre-token boundary in this one long string
    backend, text = hf_tok.backend_tokenizer, export.every_code_point()
    marked = "▁" + "▁".join(text.replace("▁", " ").split())
    assert backend.normalizer.normalize_str(text) == marked
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(marked)]
    assert pieces == [c for w in data.PAT.findall(marked) for c in tokenizer.chunks(w)]
    spaced = "x".join(text)  # every code point alone between two letters: whitespace becomes a word break
    assert backend.normalizer.normalize_str(spaced) == "▁" + "▁".join(spaced.replace("▁", " ").split())


def test_export_tokenizer_whole_synthetic_corpus_and_fuzz(hf_ckpt, hf_tok):
    _, tok = _ours(hf_ckpt)
    lines = data.synthetic_text().splitlines()
    assert hf_tok(lines, add_special_tokens=False)["input_ids"] == [tok.encode(s) for s in lines]
    rng = random.Random(0)
    alphabet = "ab cdeé🦊.,'’_ \t\n\u2028\u00a0▁1²日-\u0301"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(500)]
    enc = hf_tok(fuzz, add_special_tokens=False, return_offsets_mapping=True)
    for s, ids, offsets in zip(fuzz, enc["input_ids"], enc["offset_mapping"]):
        assert ids == tok.encode(s), repr(s)
        _check_offsets(s, hf_tok.convert_ids_to_tokens(ids), offsets)
        assert hf_tok.decode(ids) == tok.decode(ids), repr(s)


def test_export_model_matches_maskedlm(hf_ckpt, hf_dir):
    tf = _transformers()
    model, tok = _ours(hf_ckpt)
    mlm = tf.AutoModelForMaskedLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    base = tf.AutoModel.from_pretrained(hf_dir, trust_remote_code=True).eval()
    assert tf.AutoConfig.from_pretrained(hf_dir, trust_remote_code=True).hidden_size == model.config.d_model
    rows = [[CLS] + tok.encode(s) + [SEP] for s in ("The happy dog walked.", "A cat.", "Anna said that the reality of it.")]
    T = max(map(len, rows))
    ids = torch.tensor([r + [data.PAD] * (T - len(r)) for r in rows])
    mask = (ids != data.PAD).long()
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, i, o: hidden.update(h=o))
    with torch.no_grad():
        for x, m in ((ids, mask), (ids[1:2, :mask[1].sum()], None)):  # padded batch, then one unpadded row
            ref, _ = model(x, attention_mask=m)
            assert (mlm(input_ids=x, attention_mask=m).logits - ref).abs().max() <= 1e-4
            out = base(input_ids=x, attention_mask=m, token_type_ids=torch.zeros_like(x))
            assert not hasattr(out, "logits") and (out.last_hidden_state - hidden["h"]).abs().max() <= 1e-4
        long = torch.randint(FIRST_CHAR, tok.vocab_size, (1, 512))  # the pipeline fine-tunes on up to 512 tokens
        assert (mlm(input_ids=long).logits - model(long)[0]).abs().max() <= 1e-4


def test_export_classifier_fine_tunes_both_embedding_tables(hf_dir):
    tf = _transformers()
    clf = tf.AutoModelForSequenceClassification.from_pretrained(hf_dir, trust_remote_code=True, num_labels=2)
    ids = torch.randint(FIRST_CHAR, clf.config.vocab_size, (4, 20))
    loss = clf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    enc = clf.amlm.lm
    assert enc.tok.weight.grad.abs().sum() > 0 and enc.sub.weight.grad.abs().sum() > 0  # N-hot keeps training


def test_export_safetensors_config_and_processor(hf_ckpt, hf_dir, hf_tok):
    tf = _transformers()
    proc = tf.AutoProcessor.from_pretrained(hf_dir, padding_side="right", trust_remote_code=True)  # as the pipeline
    assert proc(text="The dog 🦊.")["input_ids"] == hf_tok("The dog 🦊.")["input_ids"]
    import safetensors.torch as st  # comes with transformers: an independent reader of our writer
    ck = torch.load(hf_ckpt, weights_only=True)
    tensors = st.load_file(hf_dir / "model.safetensors")
    assert {k.removeprefix("amlm.lm."): v for k, v in tensors.items()}.keys() == ck["model"].keys()
    assert all(torch.equal(v, ck["model"][k.removeprefix("amlm.lm.")]) for k, v in tensors.items())
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"}
    assert cfg["amlm_step"] == ck["step"] and "import amlm" not in (hf_dir / "modeling_amlm.py").read_text()
    assert (hf_dir / "model.py").read_bytes() == Path(HERE, "model.py").read_bytes()  # the maths, imported relatively
    for maths in ("def apply_rope", "class Block", "embedding_bag", "def attention"):  # no second copy of it
        assert maths not in (hf_dir / "modeling_amlm.py").read_text()
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


FRESH_LOAD = """
import sys, torch, transformers as tf
folder, data = sys.argv[1], torch.load(sys.argv[2])
kw = dict(trust_remote_code=True)
mlm = tf.AutoModelForMaskedLM.from_pretrained(folder, **kw).eval()
base = tf.AutoModel.from_pretrained(folder, **kw).eval()
clf = tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, **kw)
with torch.no_grad():
    logits = mlm(input_ids=data["ids"], attention_mask=data["mask"]).logits
    hidden = base(input_ids=data["ids"], attention_mask=data["mask"]).last_hidden_state
assert clf(input_ids=data["ids"]).logits.shape == (len(data["ids"]), 3)
fill = tf.pipeline("fill-mask", model=folder, **kw)("The happy dog [MASK] home.", top_k=3)
print("max diff", float((logits - data["logits"]).abs().max()), float((hidden - data["hidden"]).abs().max()))
print("fill-mask", [f["token"] for f in fill], tf.__version__, sys.modules[type(mlm).__module__].__file__)
"""

@pytest.mark.parametrize("name", ["fresh", "with.dot"])
def test_export_loads_from_a_fresh_folder_outside_the_repository(hf_ckpt, hf_dir, tmp_path, name):
    # as a user meets it: the export copied elsewhere, loaded from a current directory outside this repository (so
    # the repository's own model.py cannot be imported by accident) with an empty module cache; a dot in the folder's
    # name breaks transformers 4.51's package of the relative import, which modeling_amlm.py works around
    _transformers()
    folder = tmp_path / "copy" / name
    shutil.copytree(hf_dir, folder)
    model, tok = _ours(hf_ckpt)
    rows = [[CLS] + tok.encode(s) + [SEP] for s in ("The happy dog walked.", "A cat.")]
    ids = torch.tensor([r + [data.PAD] * (len(rows[0]) - len(r)) for r in rows])
    mask = (ids != data.PAD).long()
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, i, o: hidden.update(h=o))
    with torch.no_grad():
        want = model(ids, attention_mask=mask)[0]
    torch.save({"ids": ids, "mask": mask, "logits": want, "hidden": hidden["h"]}, tmp_path / "want.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder), str(tmp_path / "want.pt")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = [float(x) for x in re.search(r"max diff (\S+) (\S+)", r.stdout).groups()]
    assert max(diffs) <= 1e-4, diffs
    tokens, version, module = re.search(r"fill-mask (\[.*\]) (\S+) (\S+)", r.stdout).groups()
    assert len(eval(tokens)) == 3 and str(tmp_path / "modules") in module  # the export's own copy of the code ran


def test_export_milestones_names_and_order(hf_ckpt, tmp_path):
    for name in ("ckpt_10M.pt", "ckpt_2M.pt", "latest.pt", "notes.txt"):
        shutil.copyfile(hf_ckpt, tmp_path / name)
    out = tmp_path / "hf"
    assert [p.name for p in export.export(tmp_path, out, all_milestones=True, quiet=True)] == ["chck_2M", "chck_10M", "main"]
    assert sorted(p.name for p in out.iterdir()) == ["chck_10M", "chck_2M", "main"]
    assert (out / "main" / "model.safetensors").is_file() and not list(tmp_path.glob("hf.*"))


def test_export_duplicate_token_strings_are_refused():
    tok = Tokenizer(["▁", "a", "b", "c"], [(262, 263), (263, 264), (265, 264), (262, 266)])  # ab, bc, ab+c, a+bc
    with pytest.raises(export.ExportError, match="two tokens spelled 'abc'"):
        export.tokenizer_json(tok)


def test_export_bad_input_one_sentence_nothing_written(hf_ckpt, tmp_path, capsys):
    def fails(args, msg):
        assert export.main([str(a) for a in args]) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    fails([tmp_path / "foreign.pt", tmp_path / "a"], "not an amlm checkpoint")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    fails([tmp_path / "garbage.pt", tmp_path / "a"], "cannot read checkpoint")
    fails([tmp_path / "missing.pt", tmp_path / "a"], "does not exist")
    fails([tmp_path / "nope", tmp_path / "a", "--milestones"], "does not exist")
    ck = torch.load(hf_ckpt, weights_only=True)
    ck["model"]["ln_f.weight"] = torch.ones(7)
    torch.save(ck, tmp_path / "shape.pt")
    fails([tmp_path / "shape.pt", tmp_path / "a"], "first mismatch: ln_f.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "garbage.pt", "shape.pt"]  # no half export
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fails([hf_ckpt, tmp_path / "full"], "holds files export.py did not write (keep.txt)")
    fails([hf_ckpt, tmp_path / "full", "--force"], "holds files export.py did not write (keep.txt)")  # --force too
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


# ----- GLUE: paired comparison of fine-tuned predictions

def _glue_preds(path, preds, task="mnli", order=None):
    """A predictions.json as the official pipeline's finetune.run writes it (ids number the predicted file's lines)."""
    order = range(len(preds)) if order is None else order
    path.write_text(json.dumps({task: {"predictions": [{"id": f"{task}_{i}", "pred": preds[i]} for i in order]}}))
    return str(path)

def _glue_files(tmp_path):
    """60 labelled MNLI-like items; A fine-tuned twice (right on the first 45 and 39 items), B once (first 30)."""
    labels = [i % 3 for i in range(60)]
    write_jsonl(tmp_path / "mnli.valid.jsonl", [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": y}
                                                for i, y in enumerate(labels)])
    right = lambda k: [y if i < k else (y + 1) % 3 for i, y in enumerate(labels)]
    a1 = _glue_preds(tmp_path / "a1.json", right(45), order=reversed(range(60)))  # ids in any order
    a2 = _glue_preds(tmp_path / "a2.json", right(39))
    b = _glue_preds(tmp_path / "b.json", right(30))
    return labels, right, a1, a2, b, str(tmp_path / "mnli.valid.jsonl")

def test_glue_compare_paired_accuracy_averaged_over_seeds(tmp_path, capsys):
    labels, right, a1, a2, b, gold = _glue_files(tmp_path)
    assert compare.read_predictions(a1) == ("mnli", right(45)) and compare.read_labels(gold) == labels
    c = compare.compare_glue([right(45), right(39)], [right(30)], labels)
    assert (c["a"], c["b"], c["difference"], c["a_files"]) == (70.0, 50.0, 20.0, [75.0, 65.0])
    # the CI is evaluate.py's own paired bootstrap of the per-item difference (per-item correctness averaged per side)
    d = (np.array([i < 45 for i in range(60)], float) + np.array([i < 39 for i in range(60)])) / 2 - (np.arange(60) < 30)
    assert c["ci"] == [100 * x for x in compare.bootstrap(lambda idx: d[idx].mean(), 60)] and 0 < c["ci"][0] < 20 < c["ci"][1]
    same = compare.compare_glue([right(45)], [right(45)], labels)
    assert same["difference"] == 0 and same["ci"] == [0, 0]
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--compare", f"{a1},{a2}", b, gold])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("mnli: accuracy x 100 on 60 items")
    assert "A 70.00 (2 files: 75.00, 65.00), B 50.00 (1 file); A - B +20.00, 95 % paired bootstrap CI [+" in out
    with pytest.raises(SystemExit) as e:  # B against A: the sign turns, the CI mirrors
        evaluate.main(["--compare", b, f"{a1},{a2}", gold])
    assert e.value.code == 0 and f"A - B -20.00, 95 % paired bootstrap CI [{-c['ci'][1]:+.2f}, {-c['ci'][0]:+.2f}]" in capsys.readouterr().out

GLUE_BAD = [  # (what to break, how: files or text, the sentence expected)
    ("labels", "missing", "cannot read {tmp}/nothere.jsonl"),
    ("labels", '{"premise": "p", "hypothesis": "h"}', "line 1: no 'label' field"),
    ("labels", '{"premise": "p", "hypothesis": "h", "label": "entailment"}', "line 1: the label 'entailment' is not an integer"),
    ("labels", '{"premise": "p", "label": 1', "line 1: not valid JSON"),
    ("a", "59 items", "predicts 59 items but {tmp}/mnli.valid.jsonl labels 60"),
    ("a", "gap", "the ids skip mnli_3, so they do not number the lines of one file"),
    ("a", "twice", "the id mnli_0 appears twice"),
    ("a", "qqp", "the prediction files are of different tasks (mnli in {tmp}/a1.json, qqp in {tmp}/x.json)"),
    ("a", "not json", "x.json is not a predictions.json of the official pipeline (not valid JSON)"),
    ("a", '{"tasks": {}}', "x.json is not a predictions.json of the official pipeline (expected one task"),
    ("a", "bool pred", 'a malformed prediction {{"id": "mnli_5", "pred": true}}'),
    ("a", "empty piece", "holds an empty file name; join a side's files with single commas"),
    ("a", "no file", "cannot read {tmp}/gone.json"),
    ("args", "four", "--compare takes A.json B.json (WUG results of evaluate.py --out) or A B LABELS.jsonl"),
    ("args", "no labels", "a1.json is not a results file of evaluate.py --out (KeyError); to compare GLUE predictions, add a third"),
]

@pytest.mark.parametrize("what, how, msg", GLUE_BAD)
def test_glue_compare_bad_input_gets_one_line(what, how, msg, tmp_path, capsys):
    labels, right, a1, a2, b, gold = _glue_files(tmp_path)
    x = str(tmp_path / "x.json")
    a = f"{a1},{x}"
    args = None
    if what == "labels":
        gold = str(tmp_path / "nothere.jsonl") if how == "missing" else str(write_jsonl(tmp_path / "bad.jsonl", [how]))
    elif how == "59 items":
        _glue_preds(Path(x), right(45)[:59])
    elif how in ("gap", "twice"):
        _glue_preds(Path(x), [*right(45), 0], order=[i for i in range(61) if i != 3] if how == "gap" else [0, *range(59)])
    elif how == "qqp":
        _glue_preds(Path(x), right(45), task="qqp")
    elif how == "bool pred":
        _glue_preds(Path(x), [*right(45)[:5], True, *right(45)[6:]])
    elif how == "empty piece":
        a = f"{a1},,{a2}"
    elif how == "no file":
        a = f"{a1},{tmp_path / 'gone.json'}"
    elif what == "a":
        Path(x).write_text(how)
    elif how == "four":
        args = ["--compare", a1, a2, b, gold]
    elif how == "no labels":
        args = ["--compare", a1, b]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args or ["--compare", a, b, gold])
    err = capsys.readouterr().err
    assert e.value.code == 1 and msg.format(tmp=tmp_path) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ----- no command destroys a user's file
# Each case runs the command with one output that is an input, a folder of the user's or a file it did not write, and
# checks that every file there before is byte for byte the same after (and that a refusal is one line, no traceback).

import tempfile
from tools import bench, plot


def hashes(*folders):
    """Every path under folders -> its bytes' sha256 (a folder: "dir", a link: "-> target"): byte for byte, not mtime."""
    return {str(p): f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in [Path(f), *Path(f).rglob("*")]}


def refused(call, capsys, msg, code=None):
    """call() must exit non-zero (SystemExit or a return code) with one line on stderr holding msg."""
    try:
        rc = call()
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err + (f"{rc}\n" if isinstance(rc, str) else "")
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert msg in lines[0], lines[0]
    assert code is None or rc == code, rc


@pytest.fixture
def export_run(hf_ckpt, tmp_path):
    """A run folder as train.py leaves it: latest.pt (the hf_ckpt checkpoint), a milestone, log.txt, amlm.csv."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(hf_ckpt, run / "latest.pt")
    shutil.copyfile(hf_ckpt, run / "ckpt_1M.pt")
    (run / "log.txt").write_text("step 1: loss 6.3\n")
    (run / "amlm.csv").write_text("step,mask_rate\n1,0.4\n")
    return run


@pytest.mark.parametrize("args, msg", [
    (["{run}/latest.pt", "{run}", "--force"], "{run} holds the checkpoint being exported"),
    (["{run}/latest.pt", "{run}/latest.pt", "--force"], "{run}/latest.pt is the checkpoint being exported"),
    (["{run}", "{run}", "--milestones", "--force"], "{run} is the run folder being exported"),
    (["{run}", "{tmp}", "--milestones", "--force"], "{tmp} holds the run folder being exported"),
    (["{run}/latest.pt", "{tmp}/runlink", "--force"], "{tmp}/runlink holds the checkpoint being exported"),  # by a link
    (["{run}/latest.pt", "{tmp}/mine", "--force"], "{tmp}/mine holds files export.py did not write (notes.txt)"),
    (["{run}/latest.pt", "{tmp}/mine"], "{tmp}/mine holds files export.py did not write (notes.txt)"),
    (["{run}/latest.pt", "{tmp}/mine/notes.txt", "--force"], "{tmp}/mine/notes.txt is a file, not a folder"),
])
def test_export_never_replaces_its_source_or_a_users_folder(export_run, tmp_path, capsys, args, msg):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "runlink").symlink_to(export_run)
    before = hashes(tmp_path)
    places = {"run": export_run, "tmp": tmp_path}
    refused(lambda: export.main([a.format(**places) for a in args]), capsys, msg.format(**places))
    assert hashes(tmp_path) == before


def test_export_force_replaces_only_its_own_export_and_dot_works(export_run, tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hf"
    assert export.main([str(export_run), str(hf), "--milestones"]) == 0 and capsys.readouterr()
    refused(lambda: export.main([str(export_run), str(hf), "--milestones"]), capsys, "holds an earlier export; pass --force")
    assert export.main([str(export_run), str(hf), "--milestones", "--force"]) == 0 and capsys.readouterr()  # its own: replaced
    assert sorted(p.name for p in hf.iterdir()) == ["chck_1M", "main"]
    (hf / "main" / "README.md").write_text("my model card")  # a file of the user's in it: no longer export.py's alone
    before = hashes(tmp_path)
    refused(lambda: export.main([str(export_run), str(hf), "--milestones", "--force"]), capsys, "(main/README.md)")
    assert hashes(tmp_path) == before
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # "." names the current folder, which stays the same folder
    assert export.main([str(export_run / "latest.pt"), "."]) == 0
    assert (tmp_path / "here" / "config.json").is_file() and Path.cwd() == tmp_path / "here"
    assert export.main([str(export_run / "latest.pt"), ".", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "hf", "run"]  # no temporary folder left


def test_export_force_that_fails_midway_keeps_the_earlier_export_whole(export_run, tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hf"
    assert export.main([str(export_run), str(hf), "--milestones"]) == 0 and capsys.readouterr()
    before, real, calls = hashes(tmp_path), os.replace, []
    def flaky(a, b):  # the third move fails: the earlier export half moved out, none of the new one in
        calls.append(a)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(a, b)
    monkeypatch.setattr(os, "replace", flaky)
    assert export.main([str(export_run), str(hf), "--milestones", "--force"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"cannot write {hf} (No space left on device)")
    assert len(calls) > 3 and hashes(tmp_path) == before  # moved back, the temporary folders gone


def test_export_force_never_takes_a_folder_of_several_exports(export_run, tmp_path, capsys):
    for name in ("a", "b"):  # two exports side by side: their parent is not an export, --force or not
        assert export.main([str(export_run / "latest.pt"), str(tmp_path / "hf" / name)]) == 0
    capsys.readouterr()
    before = hashes(tmp_path)
    refused(lambda: export.main([str(export_run / "latest.pt"), str(tmp_path / "hf"), "--force"]), capsys, "(a)")
    assert hashes(tmp_path) == before


def test_export_failure_leaves_no_folder_it_made(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02garbage")
    refused(lambda: export.main([str(tmp_path / "bad.pt"), str(tmp_path / "new" / "deeper" / "hf")]), capsys, "cannot read checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]


def test_autotokenizer_loads_the_export_without_trust_remote_code(hf_dir, hf_tok, monkeypatch):
    # the tokenizer is a standard PreTrainedTokenizerFast: loading it asks nothing (input() is never called);
    # transformers 5 reads config.json first, which names the model's own code, so there only the class itself
    tf = _transformers()
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "n")
    loaders = [tf.PreTrainedTokenizerFast.from_pretrained]
    if int(tf.__version__.split(".")[0]) < 5:
        loaders.append(tf.AutoTokenizer.from_pretrained)
    for load in loaders:
        t = load(hf_dir)
        assert t("The dog 🦊 ran.")["input_ids"] == hf_tok("The dog 🦊 ran.")["input_ids"] and not asked


@pytest.mark.parametrize("args, msg", [
    (["model", "--dtypes", "fp16"], "argument --dtypes: must be fp32 or bf16"),
    (["model", "--dtypes", "banana"], "argument --dtypes: must be fp32 or bf16"),
    (["model", "--dtypes", "fp32,fp32"], "argument --dtypes: must be fp32 or bf16"),
    (["model", "--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    (["model", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["model", "--steps", "two"], "argument --steps: must be a positive integer, got two"),
    (["pieces", "--repeat", "-1"], "argument --repeat: must be a positive integer, got -1"),
    (["data", "--vocab-size", "0"], "argument --vocab-size: must be a positive integer, got 0"),
    (["data", "--data-dir", "{tmp}/data"], "--data-dir {tmp}/data is not empty; give a new or empty folder"),
    (["data", "--data-dir", "{tmp}/data/babylm_10M/a.train"], "is a file; give a new or empty folder"),
])
def test_bench_flags_are_checked_before_anything_runs(args, msg, tmp_path, capsys, monkeypatch):
    (tmp_path / "data" / "babylm_10M").mkdir(parents=True)
    (tmp_path / "data" / "babylm_10M" / "a.train").write_text("the corpus\n")
    for name in ("bench_model", "bench_pieces", "bench_data"):  # a check that let the flag through fails here
        monkeypatch.setattr(bench, name, lambda a: pytest.fail("ran with a bad flag"))
    before = hashes(tmp_path)
    refused(lambda: bench.main([a.format(tmp=tmp_path) for a in args]), capsys, msg.format(tmp=tmp_path), code=2)
    assert hashes(tmp_path) == before
    assert bench.get_parser().parse_args(["model", "--dtypes", "bf16"]).dtypes == ["bf16"]


def test_bench_data_removes_only_the_scratch_folder_it_made(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))  # where its temporary folder goes
    (tmp_path / "t").mkdir()
    monkeypatch.chdir(tmp_path)
    seen = []
    def fake_data_py(args):  # as data.py: it fills the data dir it is given
        d = Path(args[args.index("--data-dir") + 1])
        seen.append(d)
        (d / "cache").mkdir(exist_ok=True)
        return 1.0, 0.1, "tokens/word 1.500"
    monkeypatch.setattr(bench, "run_data_py", fake_data_py)
    bench.main(["data", "--corpus", "synthetic"])  # the default: a new temporary folder, removed at the end
    assert seen[0].parent == tmp_path / "t" and not seen[0].exists() and not list((tmp_path / "t").iterdir())
    bench.main(["data", "--corpus", "synthetic", "--data-dir", "scratch"])  # a new folder it names: made and kept
    assert (tmp_path / "scratch" / "cache").is_dir()
    assert "tokens/word 1.500" in capsys.readouterr().out
    monkeypatch.undo()


def test_bench_data_shows_data_pys_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    monkeypatch.chdir(tmp_path)
    refused(lambda: bench.main(["data", "--corpus", "nothere.txt"]), capsys, "data.py failed: unknown corpus")
    assert not list((tmp_path / "t").iterdir())  # its scratch folder removed, nothing else touched


@pytest.mark.parametrize("png, msg", [
    ("{run}/amlm.csv", "--png {run}/amlm.csv must end in .png"),
    ("{run}/summary.json", "must end in .png"),
    ("{run}", "--png {run} is a folder"),
    ("{run}/fake.png", "--png {run}/fake.png exists and is not a PNG image"),
])
def test_plot_png_never_overwrites_an_input(png, msg, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "amlm.csv").write_text("step,mask_rate\n1,0.4\n")
    (run / "summary.json").write_text('{"config": {"mask_rate_start": 0.4}}')
    (run / "fake.png").write_text("not an image")
    before = hashes(tmp_path)
    refused(lambda: plot.main(["figure1", str(run), "--png", png.format(run=run)]), capsys, msg.format(run=run), code=2)
    assert hashes(tmp_path) == before


def test_plot_figure1_takes_one_run(tmp_path, capsys):
    refused(lambda: plot.main(["figure1", "a", "b", "--png", str(tmp_path / "f.png")]), capsys,
            "figure1 draws one run's weights; give one run folder, not 2", code=2)
    assert not (tmp_path / "f.png").exists()


def test_long_items_are_batched_by_tokens_with_progress_lines(model, capsys, monkeypatch):
    # --batch-size counts copies of up to TOKENS_PER_COPY tokens: a batch of long copies holds fewer, the same scores
    shapes = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, x, *a, **kw: shapes.append(tuple(x.shape)) or real(self, x, *a, **kw))
    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0)  # a line after every batch, as a log file gets one a minute
    cands = [([7 + i % 50] * n, [1] * n) for i, n in enumerate((3, 5, 40, 150, 150, 6))]
    scores = evaluate.pll_scores(model, cands, batch_size=4, progress=True)
    budget = 4 * evaluate.TOKENS_PER_COPY
    assert all(rows * T <= budget or rows == 1 for rows, T in shapes) and max(T for _, T in shapes) == 152
    err = capsys.readouterr().err
    assert re.search(r"PLL: [\d,]+ of 354 masked copies \(\d+ %\) in \d+ s", err), err  # capsys: no terminal
    one = evaluate.pll_scores(model, cands, batch_size=1)
    assert np.allclose(scores, one, atol=1e-4)


def test_correlation_of_few_items_warns_and_gives_no_ci(model, tok, tmp_path, capsys):
    rows = [{"sentences": f"make a noun: {a}able. {a}ability\tmake a noun: {a}able. {a}ableness", "ratio": r}
            for a, r in (("nut", 0.9), ("bli", 0.2))]
    f = write_jsonl(tmp_path / "wug2.jsonl", rows)
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.to_json()}, ckpt)
    evaluate.main([str(ckpt), str(f), "--out", str(tmp_path / "r.json"), "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "no CI" in out and "95 % CI" not in out and "warning: a correlation over 2 items" in out
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["wug2"]["controlled"]["ci"] is None
    assert compare.controlled(_wug_items(3))["ci"] is not None  # 12 items: a CI
