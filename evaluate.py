"""
Zero-shot evaluation of a masked LM the way the BabyLM 2025 pipeline scores MLMs: BLiMP-style
minimal pairs, WUG morphology, entity tracking and EWoK, by pseudo-log-likelihood (PLL).

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for
Pretraining BabyLMs" (BabyLM Challenge 2025). Its claims are about these tasks, so a trained
checkpoint can be scored here without installing the BabyLM pipeline.

A candidate's PLL: for each scored token, one copy of [CLS] text [SEP] with that token replaced
by [MASK]; the log-softmax of the true token at that position (temperature 1), summed. With
--pll word-l2r (Kauf & Ivanova 2023) the later sub-tokens of the same word are masked too, which
is fairer to words split into several tokens. All copies of a task's sentences go through the model
in large length-sorted batches, and the head is computed only at the masked position. Tasks are scored
one after another, so Ctrl-C keeps (and with --out writes) the tasks already finished.

    python evaluate.py out/run/latest.pt evaluation_data/fast_eval/blimp_fast --out results.json
    python evaluate.py CKPT blimp/ wug.jsonl --pll word-l2r --limit 50 --device cpu

A PATH is a .jsonl file or a directory of them; the format is told by each file's fields. An item with an empty
sentence, or whose correct sentence equals another candidate (nothing to choose), is skipped and counted.

WUG-style correlation tasks also get rho_ctrl: the official Spearman correlation mostly follows the adjective's
class (-able, -ish, -ive, -ous) and how many more tokens one sentence has than the other, which even an untrained
model tracks; rho_ctrl is the partial Spearman correlation with both held fixed (docs/results.md), with a bootstrap
95 % CI. Two models are compared on the same items, with a paired bootstrap CI of the difference: two result
files of this script (WUG's rho_ctrl), or GLUE predictions of the official pipeline's fine-tuning (accuracy; each
side may join several fine-tuning seeds with commas) with the labelled file they predicted:

    python evaluate.py --compare out/H/eval.json out/HN/eval.json
    python evaluate.py --compare H-ft1/predictions.json,H-ft2/predictions.json U-ft1/...,U-ft2/... mnli.valid.jsonl
"""
import argparse, json, math, os, re, sys, tempfile, time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.checkpoint import load_model, write_json
from lib.compare import MIN_CORRELATION_ITEMS, compare_files, controlled, jsonl_lines, spearman
from lib.errors import ArgumentParser, EvalError, UserError
from lib.fast import FastMaskedLM
from lib.run import pick_device, pick_dtype
from model import MaskedLM
from tokenizer import CLS, MASK, PAD, SEP

PLL_VARIANTS = ("standard", "word-l2r")
TOKENS_PER_COPY = 64  # --batch-size counts copies of up to this many tokens; a batch of longer ones holds fewer
PROGRESS_SECONDS = 60  # without a terminal (a log file), a progress line this often on a long scoring
FORMATS = {  # format -> fields that identify it (and must be on every line)
    "minimal_pairs": ("sentence_good", "sentence_bad"),
    "wug": ("sentences", "ratio"),
    "entity_tracking": ("input_prefix", "options"),
    "ewok": ("Context1", "Target1", "Target2"),
}

class UnknownFormat(EvalError):
    """A file whose records match no known format: reported and skipped, never scored."""

# -----------------------------------------------------------------------------
# checkpoint loading

def load_checkpoint(path, device="cpu", fast=True):
    """A checkpoint as lib/fast.py's FastMaskedLM (model.py's MaskedLM with fast=False), in eval mode; CheckpointError
    in one sentence if it is not one. Example: load_checkpoint("out/run/latest.pt") -> (FastMaskedLM(...),
    Tokenizer(...), {"step": 1000, ...})"""
    return load_model(path, device, FastMaskedLM if fast else MaskedLM)

# -----------------------------------------------------------------------------
# PLL scoring

def tokenize(tokenizer, prefix, completion, pll="standard"):
    """Token ids of prefix + completion and, per token, how many positions to mask when scoring it:
    0 = not scored (the prefix), 1 = the token alone, k = it and the k-1 later sub-tokens of its word
    (word-l2r). The completion starts where the text's tokens stop matching the prefix's own tokens.
    Example (word-l2r, "walked" = "▁walk" "ed"): ("", "he walked") -> ([▁he, ▁walk, ed], [1, 2, 1])"""
    text = prefix + completion
    words = tokenizer.encode_words(text) if pll == "word-l2r" else [[t] for t in tokenizer.encode(text)]
    ids = [t for w in words for t in w]
    spans = [len(w) - j for w in words for j in range(len(w))]
    first = 0
    for a, b in zip(tokenizer.encode(prefix), ids):
        if a != b:
            break
        first += 1
    return ids, [0] * first + spans[first:]

@contextmanager
def frozen_embeddings(model):
    """Compose the N-hot embedding matrix once instead of once per batch (it is fixed at inference).
    Example: with frozen_embeddings(model): model(x) ... # same logits, one embedding_bag call"""
    if not hasattr(model, "embedding_matrix"):
        yield
        return
    E = model.embedding_matrix()
    model.embedding_matrix = lambda: E  # instance attribute shadows the method until removed
    try:
        yield
    finally:
        del model.embedding_matrix

def pll_scores(model, candidates, batch_size=256, device=None, precision="auto", progress=False):
    """PLL of each candidate (ids without specials, spans as from tokenize()) -> list of floats.
    Each scored token becomes one copy of [CLS] ids [SEP]; copies are sorted by length so batches
    carry little padding, and labels mark only the masked position, so the model computes the
    output head there alone. A batch holds batch_size copies, or fewer when they are longer than TOKENS_PER_COPY:
    batch_size x TOKENS_PER_COPY tokens at most, so a long item needs no more memory than short ones.
    Example: ([7, 8], [1, 1]) -> log p(7|[CLS] M 8 [SEP]) + log p(8|[CLS] 7 M [SEP])"""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seq = np.array([s for s, (_, spans) in enumerate(candidates) for k in spans if k], dtype=np.int64)
    pos = np.array([i + 1 for _, spans in candidates for i, k in enumerate(spans) if k], dtype=np.int64)
    span = np.array([k for _, spans in candidates for k in spans if k], dtype=np.int64)
    length = np.array([len(ids) + 2 for ids, _ in candidates], dtype=np.int64)
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if max_len and (length > max_len).any():  # RoPE runs at any length, but the model never trained on it
        print(f"note: {(length > max_len).sum()} candidates are longer than the model's max_len {max_len} "
              f"(the longest has {length.max()} tokens); scored anyway", file=sys.stderr)
    order = np.lexsort((pos, seq, length[seq]))  # by length, then sentence, then position
    copy_len, budget = length[seq[order]], batch_size * TOKENS_PER_COPY
    scores = np.zeros(len(candidates))
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if pick_dtype(device, precision) == "bf16" else nullcontext()
    bar = tqdm(total=len(order), unit="copy", disable=None if progress else True, desc="PLL")  # None: off unless a terminal
    t0 = last = time.time()
    try:
        # no_grad, not inference_mode: what the model caches while scoring (its RoPE tables) must stay
        # usable by training afterwards, and inference tensors are not
        with torch.no_grad(), amp, frozen_embeddings(model):
            start = 0
            while start < len(order):
                n = min(batch_size, len(order) - start)
                while n > 1 and n * copy_len[start + n - 1] > budget:  # sorted by length: the last copy is the longest
                    n = max(1, budget // int(copy_len[start + n - 1]))
                idx, start = order[start:start + n], start + n
                uniq, inv = np.unique(seq[idx], return_inverse=True)  # the few sentences in this batch
                T = int(length[uniq].max())
                base = torch.full((len(uniq), T), PAD, dtype=torch.long)
                for j, s in enumerate(uniq):
                    base[j, :length[s]] = torch.tensor([CLS, *candidates[s][0], SEP])
                x = base[torch.from_numpy(inv)]  # (B, T): one row per copy
                ar, rows = torch.arange(T), torch.arange(len(idx))
                p, k = torch.from_numpy(pos[idx]), torch.from_numpy(span[idx])
                target = x[rows, p].clone()
                x[(ar >= p[:, None]) & (ar < (p + k)[:, None])] = MASK
                lens = torch.from_numpy(length[seq[idx]])
                # most batches hold one length: no mask then keeps sdpa on its fastest kernel
                attention_mask = (ar < lens[:, None]).long().to(device) if (lens < T).any() else None
                labels = torch.full_like(x, -100)
                labels[rows, p] = target
                logits, _ = model(x.to(device), labels=labels.to(device), attention_mask=attention_mask)
                # one label per row, so the (n_labelled, V) logits come back in row order
                lp = logits.float().log_softmax(-1).gather(1, target.to(device)[:, None])[:, 0]
                np.add.at(scores, seq[idx], lp.double().cpu().numpy())
                bar.update(len(idx))
                if progress and bar.disable and time.time() - last >= PROGRESS_SECONDS:  # a log file gets a line
                    last = time.time()
                    print(f"PLL: {start:,} of {len(order):,} masked copies ({100 * start // len(order)} %) in "
                          f"{last - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        bar.close()
        model.train(was_training)
    return scores.tolist()

# -----------------------------------------------------------------------------
# reading the task files

def detect_format(record):
    """Name of the format whose identifying fields a record has, else None.
    Example: {"sentence_good": "A.", "sentence_bad": "B."} -> "minimal_pairs" """
    for name, fields in FORMATS.items():
        if isinstance(record, dict) and all(f in record for f in fields):
            return name
    return None

def read_items(file, limit=None):
    """One jsonl file -> (format, items, skipped), UnknownFormat if it is none of FORMATS. An item is (group keys,
    [(prefix, completion), ...], extra), the first candidate the correct one (WUG: extra = {"ratio": the human
    preference for the first sentence, "class": the adjective's suffix}). skipped counts the items left out, by
    reason (item_problem). limit: the first `limit` items; on a WUG file, a class-balanced sample of that size.
    Example: line {"sentence_good": "A.", "sentence_bad": "B.", "UID": "u", "field": "syntax"} ->
    ("minimal_pairs", [({"uid": "u", "field": "syntax"}, [("", "A."), ("", "B.")], None)], Counter())"""
    fmt, items, skipped = None, [], Counter()
    for where, line in jsonl_lines(file):
        if limit is not None and len(items) >= limit and fmt != "wug":
            break
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg})")
        if fmt is None:
            fmt = detect_format(r)
            if fmt is None:
                fields = ", ".join(r) if isinstance(r, dict) else type(r).__name__
                raise UnknownFormat(f"{file}: unknown format (fields: {fields})")
        if detect_format(r) != fmt:
            raise EvalError(f"{where}: expected the fields {', '.join(FORMATS[fmt])} of a {fmt} file")
        try:
            item = make_item(fmt, r, Path(file).stem)
        except (TypeError, ValueError, AttributeError) as e:
            raise EvalError(f"{where}: malformed {fmt} record ({e})")
        if problem := item_problem(item[1]):
            skipped[problem] += 1
        else:
            items.append(item)
    if fmt is None:
        raise UnknownFormat(f"{file}: holds no records")
    if fmt == "wug" and limit is not None:
        items = balanced(items, limit)
    return fmt, items, skipped

def item_problem(candidates):
    """Why an item cannot be scored fairly, or None: a candidate with nothing to score (an empty sentence would
    always win: its PLL is 0), or a correct candidate equal to another one (a tie, nothing to choose).
    Example: [("", "A dog ran."), ("", "A dog ran.")] -> "identical sentences"; [("", "A."), ("", " ")] -> "an empty sentence" """
    if any(not completion.strip() for _, completion in candidates):
        return "an empty sentence"
    if candidates[0] in candidates[1:]:
        return "identical sentences"
    return None

def wug_class(sentences):
    """The class of a WUG item: the adjective's suffix as written, read off the sentence that ends in -ness; -able,
    -ish, -ive and -ous are the test's classes, any other adjective is the class of its last three letters.
    Example: ("... adjective: tefigious. tefigiosity", "... adjective: tefigious. tefigiousness") -> "-ous" """
    nouns = [w for s in sentences for w in re.findall(r"\w+", s) if w.endswith("ness")]
    adjective = nouns[-1][:-4] if nouns else ""
    return next((f"-{x}" for x in ("able", "ish", "ive", "ous") if adjective.endswith(x)), f"-{adjective[-3:]}")

def balanced(items, n):
    """n of the WUG items, the same fraction of each class (the first ones of each, by largest remainder), in file
    order: the files are sorted by class, so their first n lines would be a class or two.
    Example: classes [a, a, a, a, b, b], n 3 -> the first two a's and the first b."""
    classes = Counter(it[2]["class"] for it in items)
    share = {c: n * k / len(items) for c, k in classes.items()}
    take = {c: int(v) for c, v in share.items()}
    for c in sorted(share, key=lambda c: take[c] - share[c])[:max(0, min(n, len(items)) - sum(take.values()))]:
        take[c] += 1
    seen, out = Counter(), []
    for it in items:
        if seen[it[2]["class"]] < take[it[2]["class"]]:
            seen[it[2]["class"]] += 1
            out.append(it)
    return out

def text(v):
    """v itself if it is a string, else TypeError (a number or null where a sentence belongs)."""
    if not isinstance(v, str):
        raise TypeError(f"{v!r} is not a string")
    return v

def make_item(fmt, r, stem):
    """A record of a known format -> (group keys, candidates, extra); raises ValueError/TypeError if malformed."""
    if fmt == "minimal_pairs":
        field = r.get("field", "supplement")  # BLiMP supplement files have neither field nor UID
        keys = {"uid": str(r.get("UID") or stem), "field": "syntax/semantics" if field == "syntax_semantics" else field}
        return keys, [("", text(r["sentence_good"])), ("", text(r["sentence_bad"]))], None
    if fmt == "wug":
        pair = text(r["sentences"]).split("\t")
        if len(pair) != 2:
            raise ValueError("'sentences' must hold two tab-separated sentences")
        ratio = float(r["ratio"])
        if not math.isfinite(ratio):
            raise ValueError("'ratio' must be a finite number")
        return {"uid": stem}, [("", pair[0]), ("", pair[1])], {"ratio": ratio, "class": wug_class(pair)}
    if fmt == "entity_tracking":
        options = r["options"]
        if not isinstance(options, list) or len(options) < 2:
            raise ValueError("'options' must be a list of at least two strings")
        keys = {"uid": f"{stem}_{r.get('numops', 0)}_ops", "file": stem}
        return keys, [(text(r["input_prefix"]), text(o)) for o in options], None
    context = text(r["Context1"])  # ewok: the target follows the context after a space; only it is scored
    return {"uid": str(r.get("Domain") or stem)}, [(context, " " + text(r["Target1"])), (context, " " + text(r["Target2"]))], None

def task_files(path):
    """A .jsonl file or a directory -> sorted list of its .jsonl files.
    Example: "blimp/" holding b.jsonl, a.jsonl, notes.txt -> [blimp/a.jsonl, blimp/b.jsonl]"""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise EvalError(f"directory {path} holds no .jsonl files")
        return files
    if not path.is_file():
        raise EvalError(f"{path} does not exist")
    return [path]

# -----------------------------------------------------------------------------
# metrics

def group_mean(values, keys):
    """Mean of values per key, in first-seen order. Example: ([1, 0, 1], ["a", "a", "b"]) -> {"a": 0.5, "b": 1.0}"""
    acc = defaultdict(list)
    for v, k in zip(values, keys):
        acc[k].append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}

def task_result(fmt, items, scores, n_tokens=None):
    """Figures for one task from its items and their candidates' PLLs (all on a 0-100 scale); n_tokens: each
    candidate's token count, for WUG's controlled score.
    Example (minimal pairs): UIDs u (2 pairs, 1 right) and v (1 pair, right) -> score 75.0 (macro over UIDs)"""
    keys = [it[0] for it in items]
    uids = [k["uid"] for k in keys]
    n = Counter(uids)
    res = {"format": fmt, "items": len(items)}
    if fmt == "wug":  # softmax over the two sentences' PLLs = sigmoid of their difference; rho per file
        p_first = [1 / (1 + math.exp(min(s[1] - s[0], 700))) for s in scores]
        res["metric"] = "spearman"
        res["by_uid"] = {u: {"items": n[u], "score": 100 * spearman([p for p, v in zip(p_first, uids) if v == u],
                                                                     [it[2]["ratio"] for it, v in zip(items, uids) if v == u])}
                         for u in n}
        res["score"] = float(np.mean([v["score"] for v in res["by_uid"].values()]))
        if n_tokens is not None:  # per item: what the controlled score and a paired comparison need
            res["per_item"] = [{"pair": [c for _, c in it[1]], "ratio": it[2]["ratio"], "class": it[2]["class"],
                                "dtok": t[0] - t[1], "llr": s[0] - s[1]} for it, t, s in zip(items, n_tokens, scores)]
            res["controlled"] = controlled(res["per_item"])
        return res
    correct = [float(s[0] > max(s[1:])) for s in scores]  # strict: a tie is not a correct choice
    by_uid = {u: 100 * a for u, a in group_mean(correct, uids).items()}
    res["metric"] = "accuracy"
    res["by_uid"] = {u: {"items": n[u], "score": a} for u, a in by_uid.items()}
    if fmt == "entity_tracking":  # numops groups averaged per file, then the files averaged
        file_of = {k["uid"]: k["file"] for k in keys}
        res["by_file"] = group_mean(by_uid.values(), [file_of[u] for u in by_uid])
        res["score"] = sum(res["by_file"].values()) / len(res["by_file"])
    else:
        res["score"] = sum(by_uid.values()) / len(by_uid)
    if fmt == "minimal_pairs":  # the paper reports e.g. "morphology": the macro over that field's UIDs
        field_of = {k["uid"]: k["field"] for k in keys}
        res["by_field"] = group_mean(by_uid.values(), [field_of[u] for u in by_uid])
    return res

# -----------------------------------------------------------------------------
# evaluation of whole paths (library entry points)

def read_tasks(paths, limit=None, formats=None):
    """The tasks under paths -> ({name: (format, items, skipped items by reason)}, skipped files). One task per
    (path, format): a directory of BLiMP files is one task. limit = items per file (quick looks; WUG: class-balanced);
    formats = the formats to keep (others skipped). Example: read_tasks(["blimp_fast"]) ->
    ({"blimp_fast": ("minimal_pairs", [13397 items], Counter({"identical sentences": 3}))}, [])"""
    tasks, skipped = {}, []
    for path in paths:
        by_format = defaultdict(lambda: ([], Counter()))
        for file in task_files(path):
            try:
                fmt, items, left_out = read_items(file, limit)
            except UnknownFormat as e:
                skipped.append(str(e))
                continue
            if formats is not None and fmt not in formats:
                skipped.append(f"{file}: {fmt} not requested")
                continue
            by_format[fmt][0].extend(items)
            by_format[fmt][1].update(left_out)
        for fmt, (items, left_out) in by_format.items():
            name = Path(path).stem + (f"/{fmt}" if len(by_format) > 1 else "")
            if not items:
                skipped.append(f"{path}: every {fmt} item was skipped ({skip_text(left_out)})")
                continue
            while name in tasks:  # two paths with the same name
                name += "'"
            tasks[name] = (fmt, items, left_out)
    return tasks, skipped

def skip_text(counts):
    """Example: Counter({"identical sentences": 3, "an empty sentence": 1}) -> "identical sentences: 3, an empty sentence: 1" """
    return ", ".join(f"{k}: {v}" for k, v in counts.items())

def task_path_problem(path):
    """What is wrong with a path of tasks to score (train.py's --eval-blimp checks it before training), or None.
    Example: "typo/" -> "typo does not exist" """
    try:
        return None if read_tasks([path])[0] else f"{path} holds no file of a task format evaluate.py scores"
    except UserError as e:
        return str(e)

def score_tasks(model, tokenizer, tasks, batch_size=256, device=None, pll="standard", precision="auto", progress=True):
    """Yield (name, result) task by task, so that a caller stopped midway keeps the tasks already finished. Each
    task is one batched pass; a candidate an earlier task scored is not scored again (minimal pairs share
    sentences across files). A result also counts the candidates and masked copies its pass scored, and the items
    left out. Example: dict(score_tasks(model, tok, read_tasks(["blimp_fast"])[0]))["blimp_fast"]["score"] -> 55.1"""
    if pll not in PLL_VARIANTS:
        raise EvalError(f"pll must be one of {', '.join(PLL_VARIANTS)}, not {pll!r}")
    scored, n_tokens = {}, {}  # (prefix, completion) -> PLL, and its token count
    for name, (fmt, items, left_out) in tasks.items():
        new = list(dict.fromkeys(c for _, cands, _ in items for c in cands if c not in scored))
        candidates = [tokenize(tokenizer, *c, pll=pll) for c in new]
        scored.update(zip(new, pll_scores(model, candidates, batch_size, device, precision, progress)))
        n_tokens.update(zip(new, (len(ids) for ids, _ in candidates)))
        res = task_result(fmt, items, [[scored[c] for c in cands] for _, cands, _ in items],
                          [[n_tokens[c] for c in cands] for _, cands, _ in items])
        yield name, {**res, "skipped_items": dict(left_out), "candidates": len(new),
                     "copies": sum(1 for _, spans in candidates for k in spans if k)}

def headline(results):
    """Accuracy tasks and correlation tasks apart (a Spearman x 100 is no accuracy): the mean score of each kind,
    None where there is none (a constant WUG rho is nan and left out).
    Example: blimp 60.0, ewok 50.0, wug 30.0 (spearman) -> {"accuracy": 55.0, "correlation": 30.0}"""
    out = {}
    for key, metric in (("accuracy", "accuracy"), ("correlation", "spearman")):
        scores = [r["score"] for r in results.values() if r["metric"] == metric and math.isfinite(r["score"])]
        out[key] = sum(scores) / len(scores) if scores else None
    return out

def headline_text(res):
    """The headline in words. Example: "accuracy 55.00 (2 tasks), correlation 30.00 (Spearman x 100, 1 task)" """
    n = Counter(r["metric"] for r in res["tasks"].values())
    parts = [f"accuracy {res['accuracy']:.2f} ({n['accuracy']} task{'s' * (n['accuracy'] != 1)})"
             if res["accuracy"] is not None else None,
             f"correlation {res['correlation']:.2f} (Spearman x 100, {n['spearman']} task{'s' * (n['spearman'] != 1)})"
             if res["correlation"] is not None else None]
    return ", ".join(p for p in parts if p) or "no finite score"

def evaluate_paths(model, tokenizer, paths, batch_size=256, device=None, pll="standard", precision="auto",
                   limit=None, formats=None, progress=True):
    """Score every task under paths -> results dict (read_tasks, then score_tasks). Example:
    evaluate_paths(model, tok, ["blimp_fast"]) -> {"pll": "standard", "precision": "bf16",
        "tasks": {"blimp_fast": {"format": "minimal_pairs", "metric": "accuracy", "items": 13400, "score": 55.1,
        "by_uid": {...}, "by_field": {...}, ...}}, "accuracy": 55.1, "correlation": None, "skipped": [],
        "candidates": 26794, "copies": 269682, "seconds": 90.0}"""
    if pll not in PLL_VARIANTS:
        raise EvalError(f"pll must be one of {', '.join(PLL_VARIANTS)}, not {pll!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t0 = time.time()
    tasks, skipped = read_tasks(paths, limit, formats)
    for e in skipped if progress else []:
        print(f"skipped {e}", file=sys.stderr)
    results = dict(score_tasks(model, tokenizer, tasks, batch_size, device, pll, precision, progress))
    return results_dict(results, pll, pick_dtype(device, precision), skipped, time.time() - t0)

def milestone_line(model, tokenizer, path, device, words):
    """train.py --eval-blimp: the tasks in path scored at a milestone, as one log line (accuracy and correlation
    tasks apart); tasks that cannot be read are said in the line, and training goes on.
    Example: -> "tasks/blimp: accuracy 55.3 (67 tasks) at 2M words" """
    try:
        res = evaluate_paths(model, tokenizer, [path], device=device, progress=False)
    except UserError as e:  # the files changed since the start: say so, train on
        return f"{path}: not scored at {words // 1_000_000}M words ({e})"
    return f"{path}: {headline_text(res)} at {words // 1_000_000}M words"

def results_dict(results, pll, precision, skipped, seconds):
    """The results dict of evaluate_paths (see there) from score_tasks's results."""
    return {"pll": pll, "precision": precision, "tasks": results, **headline(results), "skipped": skipped,
            "candidates": sum(r["candidates"] for r in results.values()),
            "copies": sum(r["copies"] for r in results.values()), "seconds": round(seconds, 2)}

# -----------------------------------------------------------------------------
# command line

def format_table(res):
    """The results as a plain-text table: task, format, items, score (and the fields of minimal pairs; WUG's rho_ctrl;
    the items left out), then the headline: the accuracy tasks and the correlation tasks, each kind averaged apart."""
    lines = [f"{'task':<32} {'format':<16} {'items':>7} {'score':>7}"]
    for name, t in res["tasks"].items():
        lines.append(f"{name:<32} {t['format']:<16} {t['items']:>7} {t['score']:>7.2f}  {t['metric']}")
        for field, score in t.get("by_field", {}).items():
            lines.append(f"  {field:<30} {'':<16} {'':>7} {score:>7.2f}")
        if c := t.get("controlled"):
            ci = f"95 % CI [{c['ci'][0]:.1f}, {c['ci'][1]:.1f}]" if c.get("ci") else "no CI"
            lines.append(f"  {'rho_ctrl (class, dtok held)':<30} {'':<16} {'':>7} {c['rho_ctrl']:>7.2f}  {ci}; items per "
                         "class: " + ", ".join(f"{k} {v}" for k, v in c["classes"].items()))
        if t["metric"] == "spearman" and t["items"] < MIN_CORRELATION_ITEMS:
            lines.append(f"  warning: a correlation over {t['items']} items says next to nothing; "
                         f"score at least {MIN_CORRELATION_ITEMS}")
        if t.get("skipped_items"):
            lines.append(f"  skipped {sum(t['skipped_items'].values())} items ({skip_text(t['skipped_items'])})")
    lines.append(f"headline: {headline_text(res)}")
    lines.append(f"PLL {res['pll']} ({res['precision']}), {res['copies']:,} masked copies in {res['seconds']:.1f} s")
    return "\n".join(lines)

def is_results_file(path):
    """Whether path holds what evaluate.py --out writes (a JSON object with "tasks" and "pll") or nothing at all: the
    only files --out may replace. Example: an earlier results.json -> True; a checkpoint, a task file -> False"""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            return not head or head == b"{" and {"tasks", "pll"} <= set(json.loads(head + f.read()))
    except (OSError, ValueError, TypeError):
        return False

def check_out(path, checkpoint=None, task_files=()):
    """--out, checked before any scoring: a file name (not a folder) in a folder we can write (made when the results
    are written, so a refusal leaves none), and not a file it would destroy: an input (the checkpoint, a task file,
    by whatever path) or any other file but an earlier result. Example: check_out("out/run/latest.pt", "out/run/latest.pt") -> EvalError("--out
    out/run/latest.pt is the checkpoint being scored; give another file name")"""
    path = Path(path)
    if path.is_dir():
        raise EvalError(f"--out {path} is a folder; give a file name, such as {path / 'results.json'}")
    if path.exists():
        same = lambda p: Path(p).exists() and path.samefile(p)  # also through a symbolic or hard link
        if checkpoint is not None and same(checkpoint):
            raise EvalError(f"--out {path} is the checkpoint being scored; give another file name")
        if any(map(same, task_files)):
            raise EvalError(f"--out {path} is a task file being scored; give another file name")
        if not is_results_file(path):
            raise EvalError(f"--out {path} exists and is not a results file of evaluate.py; give another file name")
    where = next(p for p in path.absolute().parents if p.exists())  # its folders are made only when it is written
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{path.name}.tmp", dir=where)  # a new name: no file of the user's
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EvalError(f"cannot write --out {path} ({e.strerror or e})") from None

def setup(args):
    """Everything that can fail on bad input, before any scoring: -> (tasks, skipped, model, tokenizer, ckpt,
    device, precision), or exit 1 with one line."""
    try:
        if args.batch_size < 1 or any(v is not None and v < 1 for v in (args.limit, args.threads)):
            raise EvalError("--batch-size, --limit and --threads must be positive")
        if args.out:
            check_out(args.out, args.checkpoint, [f for p in args.paths for f in task_files(p)])
        if args.threads:
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        precision = pick_dtype(device, args.precision)
        model, tokenizer, ckpt = load_checkpoint(args.checkpoint, device, args.fast)
        tasks, skipped = read_tasks(args.paths, args.limit)
        if not tasks:
            raise EvalError(f"nothing to score: all {len(skipped)} files were skipped (the first: {skipped[0]})")
        for e in skipped:
            print(f"skipped {e}", file=sys.stderr)
        return tasks, skipped, model, tokenizer, ckpt, device, precision
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

def main(argv=None):
    ap = ArgumentParser(prog="evaluate.py", description="Zero-shot BabyLM-style evaluation of an amlm "
                        "checkpoint by PLL. Ctrl-C stops it, keeping (and with --out writing) the tasks "
                        "already finished; a directory is one task, so pass its files for finer steps.")
    ap.add_argument("checkpoint", nargs="?", help="a train.py checkpoint (.pt)")
    ap.add_argument("paths", nargs="*", metavar="PATH", help="a .jsonl file or a directory of them")
    ap.add_argument("--compare", nargs="+", metavar="FILE", help="instead of scoring: A.json B.json, rho_ctrl of the "
                    "WUG tasks two --out files share, with a paired bootstrap 95 %% CI of A - B; or A B LABELS.jsonl, "
                    "GLUE: two models' predictions.json of the official pipeline (a side may join several by commas, "
                    "e.g. fine-tuning seeds: per item averaged) and the labelled .jsonl they predicted: the accuracy "
                    "of each, A - B and its paired bootstrap 95 %% CI over the items")
    ap.add_argument("--out", help="write the results here as JSON (checked before scoring)")
    ap.add_argument("--batch-size", type=int, default=256, help="masked copies per forward pass (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    ap.add_argument("--pll", default="standard", choices=PLL_VARIANTS,
                    help="word-l2r: Kauf & Ivanova 2023 (default: %(default)s)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="auto: bf16 where it is native, AMX or AVX512-BF16 CPUs, bf16 GPUs (default: %(default)s)")
    ap.add_argument("--limit", type=int, help="score only the first N items of each file, for quick looks (a WUG file: "
                                          "N items, the same share of each class)")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                    help="lib/fast.py's FastMaskedLM; --no-fast: model.py's MaskedLM, the same maths (default: on)")
    ap.add_argument("--threads", type=int, help="CPU threads (1 can beat 2 when other jobs share the cores)")
    args = ap.parse_args(argv)
    if args.compare:
        if args.checkpoint:
            ap.error("--compare takes the files to compare (A.json B.json, or A B LABELS.jsonl), not a checkpoint")
        sys.exit(compare_files(*args.compare))
    if not args.paths:
        ap.error("give a checkpoint and at least one PATH to score (or --compare A.json B.json)")
    results, tasks = {}, {}
    try:
        tasks, skipped, model, tokenizer, ckpt, device, precision = setup(args)
        t0 = time.time()
        for name, r in score_tasks(model, tokenizer, tasks, args.batch_size, device, args.pll, args.precision):
            results[name] = r
    except KeyboardInterrupt:
        if not results:
            print("interrupted before any task was finished; nothing written", file=sys.stderr)
            sys.exit(130)
    res = {"checkpoint": str(args.checkpoint), "step": ckpt.get("step"), "words_seen": ckpt.get("words_seen"),
           "limit": args.limit, **results_dict(results, args.pll, precision, skipped, time.time() - t0),
           "unscored": [name for name in tasks if name not in results]}
    print(format_table(res))
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json(res, args.out)
        except OSError as e:  # a full disk: the table above is all there is
            print(f"error: cannot write --out {args.out} ({e.strerror or e}); the results are printed above", file=sys.stderr)
            sys.exit(1)
    if res["unscored"]:
        print(f"interrupted after {len(results)} of {len(tasks)} tasks" + (f"; {args.out} holds those" if args.out else ""),
              file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    main()
