"""
Comparing models, for evaluate.py: Spearman correlations, rho_ctrl (WUG with the adjective's class and the token
counts held fixed), the paired bootstrap, and the paired comparison of two models on the same items: two WUG result
files of evaluate.py, or the official pipeline's GLUE predictions. Part of a PyTorch reimplementation of Edman &
Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    python evaluate.py --compare out/H/eval.json out/HN/eval.json                  # WUG: rho_ctrl, H - HN
    python evaluate.py --compare H1.json,H2.json U1.json,U2.json mnli.valid.jsonl   # GLUE: accuracy, H - U
"""
import json, math, re, sys
from collections import Counter
from pathlib import Path

import numpy as np

from lib.errors import EvalError

MIN_CORRELATION_ITEMS = 10  # fewer items: a Spearman correlation is printed with a warning and rho_ctrl with no CI

# -----------------------------------------------------------------------------
# reading a .jsonl file, for evaluate.py's task files and --compare's labels

def jsonl_lines(path):
    """Yield ("<path>, line <n>", text) for each non-blank line of a .jsonl file, read as bytes so that a line that is
    not UTF-8 is named by its number (a byte-order mark on line 1 is no error); EvalError in one sentence otherwise.
    Example: b'{"a": 1}\\n\\n{"a": 2}\\n' in x.jsonl -> ("x.jsonl, line 1", '{"a": 1}\\n'), ("x.jsonl, line 3", ...)"""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise EvalError(f"cannot read {path} ({e.strerror or e})") from None
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path}, line {n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise EvalError(f"{where}: not UTF-8") from None
            if line.strip():
                yield where, line

# -----------------------------------------------------------------------------
# correlations

def rankdata(x):
    """Ranks 1..n, ties sharing their average rank. Example: [10, 30, 20, 20] -> [1, 4, 2.5, 2.5]"""
    x = np.asarray(x, dtype=np.float64)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]

def spearman(x, y):
    """Spearman's rho: Pearson correlation of the tie-aware ranks; nan if either side is constant.
    Example: ([1, 2, 3, 4], [1, 3, 2, 4]) -> 0.8"""
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denom = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")

# -----------------------------------------------------------------------------
# WUG, controlled: what the official Spearman measures once the item's class and token counts are held fixed

def partial_spearman(x, y, classes, z):
    """Spearman's rho of x and y controlling for a class and a covariate z: rank x, y and z, regress the ranks of x
    and of y on [class indicators, rank(z)] by least squares, and correlate the residuals (Pearson). nan when a
    residual is constant. Example: x and y each class + z plus their own independent noise -> about 0, while
    spearman(x, y) is high: class and z explain all they share."""
    groups = sorted(set(classes))
    X = np.column_stack([np.equal.outer(classes, groups).astype(float), rankdata(z)])  # the indicators span the intercept
    res = [r - X @ np.linalg.lstsq(X, r, rcond=None)[0] for r in (rankdata(x), rankdata(y))]
    denom = math.sqrt(float(res[0] @ res[0]) * float(res[1] @ res[1]))
    return float(res[0] @ res[1]) / denom if denom > 1e-9 * len(x) else float("nan")

def rho_ctrl(items):
    """partial_spearman of the model's log-likelihood ratio (PLL of the first sentence minus the second) and the human
    ratio, controlling for the adjective's class and dtok (the first sentence's token count minus the second's).
    Example: an untrained model on the WUG dev file -> about 0, though its official Spearman is 0.74."""
    return partial_spearman([i["llr"] for i in items], [i["ratio"] for i in items], [i["class"] for i in items],
                            [i["dtok"] for i in items])

def bootstrap(stat, n, rounds=2000, seed=0):
    """The 2.5 and 97.5 percentiles of stat(idx) over `rounds` resamples of n items with replacement (idx: an index
    array); deterministic for a seed. Resamples where stat is nan are left out. Example: bootstrap(lambda i: 0.5, 10)
    -> (0.5, 0.5)."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(rounds)])
    lo, hi = np.nanpercentile(values, [2.5, 97.5]) if np.isfinite(values).any() else (math.nan, math.nan)
    return float(lo), float(hi)

def controlled(items, rounds=2000, seed=0):
    """rho_ctrl x 100 with its bootstrap 95 % CI (items resampled; None for fewer than MIN_CORRELATION_ITEMS items,
    whose resamples repeat a few items and give a CI of no width) and the items per class.
    Example: -> {"rho_ctrl": -2.1, "ci": [-16.0, 12.3], "classes": {"-able": 25, "-ish": 25, ...}}; 2 items -> "ci": None"""
    pick = lambda idx: [items[i] for i in idx]
    ci = None
    if len(items) >= MIN_CORRELATION_ITEMS:
        ci = [100 * v for v in bootstrap(lambda idx: rho_ctrl(pick(idx)), len(items), rounds, seed)]
    return {"rho_ctrl": 100 * rho_ctrl(items), "ci": ci,
            "classes": dict(sorted(Counter(i["class"] for i in items).items()))}

def compare_controlled(a, b, rounds=2000, seed=0):
    """Two models' per_item lists on the same items (matched by their sentences) -> rho_ctrl x 100 of each, their
    difference a - b, and its paired bootstrap 95 % CI (the same resampled items for both). Each model's rho_ctrl
    controls for its own token counts. EvalError if the two share fewer than 10 items."""
    pairs = {tuple(i["pair"]): i for i in b}
    a = [i for i in a if tuple(i["pair"]) in pairs]
    b = [pairs[tuple(i["pair"])] for i in a]
    if len(a) < MIN_CORRELATION_ITEMS:
        raise EvalError(f"the two results share {len(a)} WUG items; compare results scored on the same file")
    diff = lambda idx: rho_ctrl([a[i] for i in idx]) - rho_ctrl([b[i] for i in idx])
    lo, hi = bootstrap(diff, len(a), rounds, seed)
    ra, rb = rho_ctrl(a), rho_ctrl(b)
    return {"items": len(a), "a": 100 * ra, "b": 100 * rb, "difference": 100 * (ra - rb), "ci": [100 * lo, 100 * hi]}

# -----------------------------------------------------------------------------
# --compare

def compare_files(*paths):
    """--compare A.json B.json: the WUG tasks two result files share, rho_ctrl of each with the paired bootstrap CI of
    a - b. --compare A B LABELS.jsonl: GLUE, the official pipeline's predictions of two models (compare_glue_files).
    Returns the exit code; one sentence on stderr if a file is not a results file with per-item WUG scores.
    Example: -> "wug_adj_dev: rho_ctrl x 100 on 100 shared items: A 12.1, B 3.0; A - B +9.1, 95 % paired bootstrap CI [...]" """
    if len(paths) == 3:
        return compare_glue_files(*paths)
    if len(paths) != 2:
        print(f"error: --compare takes A.json B.json (WUG results of evaluate.py --out) or A B LABELS.jsonl (GLUE "
              f"predictions of the official pipeline), not {len(paths)} file{'s' * (len(paths) != 1)}", file=sys.stderr)
        return 1
    a_path, b_path = paths
    per_item = {}
    for path in (a_path, b_path):
        try:
            tasks = json.loads(Path(path).read_text())["tasks"]
            per_item[path] = {name: t["per_item"] for name, t in tasks.items() if t.get("per_item")}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            try:
                glue = read_predictions(path) and True
            except EvalError:
                glue = "," in path  # a side of several GLUE prediction files
            hint = "; to compare GLUE predictions, add a third file, the labelled .jsonl they predicted" if glue else ""
            print(f"error: {path} is not a results file of evaluate.py --out ({type(e).__name__}){hint}", file=sys.stderr)
            return 1
    shared = [name for name in per_item[a_path] if name in per_item[b_path]]
    if not shared:
        print(f"error: {a_path} and {b_path} share no WUG task with per-item scores", file=sys.stderr)
        return 1
    for name in shared:
        try:
            c = compare_controlled(per_item[a_path][name], per_item[b_path][name])
        except EvalError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
        except (KeyError, TypeError, ValueError) as e:  # a per-item entry without its llr, dtok, ratio or class
            print(f"error: {name}: a per-item entry is malformed ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
        print(f"{name}: rho_ctrl x 100 on {c['items']} shared items: A {c['a']:.1f}, B {c['b']:.1f}; A - B "
              f"{c['difference']:+.1f}, 95 % paired bootstrap CI [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]")
    return 0

# GLUE: the official pipeline's fine-tuned predictions (evaluation_pipeline.finetune.run with --predict_data writes
# <results_dir>/<model folder>/<revision>/finetune/<task>/predictions.json), compared item by item

def read_predictions(path):
    """One predictions.json of the official pipeline -> (task, [the prediction for line 0, 1, ... of the file it
    predicted]). Its ids number the lines of that file: {"mnli": {"predictions": [{"id": "mnli_0", "pred": 2}, ...]}};
    it holds no labels. EvalError in one sentence if the file is not one.
    Example: {"rte": {"predictions": [{"id": "rte_1", "pred": 0}, {"id": "rte_0", "pred": 1}]}} -> ("rte", [1, 0])"""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise EvalError(f"cannot read {path} ({e.strerror or e})") from None
    except ValueError:  # not JSON, or not UTF-8
        raise EvalError(f"{path} is not a predictions.json of the official pipeline (not valid JSON)") from None
    body = next(iter(data.values())) if isinstance(data, dict) and len(data) == 1 else None
    if not isinstance(body, dict) or not isinstance(body.get("predictions"), list) or not body["predictions"]:
        raise EvalError(f"{path} is not a predictions.json of the official pipeline "
                        '(expected one task with its predictions, as {"mnli": {"predictions": [...]}})')
    task = next(iter(data))
    preds = {}
    for p in body["predictions"]:
        pid = p.get("id") if isinstance(p, dict) else None
        m = re.fullmatch(re.escape(task) + r"_([0-9]+)", pid) if isinstance(pid, str) else None
        if m is None or type(p.get("pred")) is not int:
            raise EvalError(f"{path}: a malformed prediction {json.dumps(p)[:80]} (expected {{\"id\": \"{task}_<line>\", "
                            f"\"pred\": <integer>}})")
        if int(m[1]) in preds:
            raise EvalError(f"{path}: the id {p['id']} appears twice")
        preds[int(m[1])] = p["pred"]
    if len(preds) != max(preds) + 1:
        missing = next(i for i in range(len(preds)) if i not in preds)
        raise EvalError(f"{path}: the ids skip {task}_{missing}, so they do not number the lines of one file")
    return task, [preds[i] for i in range(len(preds))]

def read_labels(path):
    """The integer 'label' of each line of a GLUE .jsonl file, in order: the gold answers for the file given to the
    pipeline as --predict_data (the official validation files hold them). EvalError in one sentence otherwise.
    Example: lines {"premise": "...", "hypothesis": "...", "label": 2}, {..., "label": 0} -> [2, 0]"""
    labels = []
    for where, line in jsonl_lines(path):  # a blank line: the pipeline could not have read it, so no id counts it
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict) or "label" not in r:
            raise EvalError(f"{where}: no 'label' field; give the labelled .jsonl the pipeline predicted")
        if type(r["label"]) is not int:
            raise EvalError(f"{where}: the label {r['label']!r} is not an integer")
        labels.append(r["label"])
    if not labels:
        raise EvalError(f"{path} holds no labelled lines")
    return labels

def compare_glue(a, b, labels, rounds=2000, seed=0):
    """Two models' predictions on the same labelled items -> accuracy x 100 of each, a - b, and its paired bootstrap
    95 % CI (the items resampled, the same for both). A side is a list of one or more prediction lists (e.g. one per
    fine-tuning seed): per item, its correctness is averaged over them, so its accuracy is the mean of theirs.
    Example: a [[0, 1, 2, 2]], b [[0, 1, 2, 0], [0, 0, 0, 0]], labels [0, 1, 2, 2] -> a 100, b 50 (75 and 25), a - b +50"""
    y = np.asarray(labels)
    if any(len(p) != len(y) for p in (*a, *b)) or not a or not b:
        raise EvalError(f"every side needs predictions for all {len(y)} labelled items")
    ca, cb = (np.mean([np.asarray(p) == y for p in side], axis=0) for side in (a, b))
    d = ca - cb
    lo, hi = bootstrap(lambda idx: d[idx].mean(), len(d), rounds, seed)
    return {"items": len(y), "a": 100 * ca.mean(), "b": 100 * cb.mean(), "difference": 100 * d.mean(),
            "ci": [100 * lo, 100 * hi], "a_files": [100 * np.mean(np.asarray(p) == y) for p in a],
            "b_files": [100 * np.mean(np.asarray(p) == y) for p in b]}

def compare_glue_files(a_spec, b_spec, labels_path):
    """--compare A B LABELS.jsonl: A and B each one predictions.json of the pipeline or several joined by commas (one
    model fine-tuned with several seeds), all for the same items, LABELS the .jsonl they predicted; prints compare_glue's
    figures. Returns the exit code; one sentence on stderr on bad input.
    Example: -> "mnli: accuracy x 100 on 4908 items: A 61.20 (2 files: 61.00, 61.40), B 60.10 (...); A - B +1.10, 95 % ..." """
    try:
        labels = read_labels(labels_path)
        sides, tasks = [], {}
        for spec in (a_spec, b_spec):
            files = spec.split(",")
            if not all(files):
                raise EvalError(f"{spec!r} holds an empty file name; join a side's files with single commas")
            sides.append([])
            for path in files:
                task, preds = read_predictions(path)
                if len(preds) != len(labels):
                    raise EvalError(f"{path} predicts {len(preds)} items but {labels_path} labels {len(labels)}; give "
                                    f"the file the pipeline predicted (--predict_data)")
                tasks.setdefault(task, path)
                sides[-1].append(preds)
        if len(tasks) > 1:
            raise EvalError("the prediction files are of different tasks (" + ", ".join(f"{t} in {p}" for t, p in tasks.items()) + ")")
        c = compare_glue(*sides, labels)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    side = lambda acc, files: f"{acc:.2f} (" + (f"{len(files)} files: " + ", ".join(f"{x:.2f}" for x in files)
                                                if len(files) > 1 else "1 file") + ")"
    print(f"{next(iter(tasks))}: accuracy x 100 on {c['items']} items of {labels_path}: A {side(c['a'], c['a_files'])}, "
          f"B {side(c['b'], c['b_files'])}; A - B {c['difference']:+.2f}, 95 % paired bootstrap CI "
          f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]")
    return 0
