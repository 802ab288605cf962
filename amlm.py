"""
Adaptive masked language modeling (AMLM): the masking curriculum of Edman & Fraser,
"Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

Plain MLM selects every token with the same probability p (0.15). AMLM gives every vocabulary
type a masking weight w_i (starting at p) and, every `update_every` optimizer steps, moves the
weights of types the model still predicts wrongly up and those it has learned down, so the
prediction budget flows to what is still difficult. p itself may decay over training (`mask_rate`);
the paper's best configuration ("hard decay") goes from 0.40 to 0.15.
metric="uniform" switches adaptation off (every weight stays p): the baseline runs the same code.

In a training loop (train.py's main() is this loop, with gradient accumulation and the hooks):

    am = AMLM(vocab_size, special_ids=[PAD, CLS, SEP, MASK], mask_id=MASK, rate=0.40)
    g = torch.Generator().manual_seed(0)
    for step in range(total_steps):
        p = mask_rate(step, total_steps, 0.40, 0.15)  # the decaying mask rate
        inputs, labels = am.mask(batch, rate=p, generator=g)
        logits, loss = model(inputs, labels=labels)   # logits (n_labelled, V)
        am.observe(labels, logits, inputs)            # statistics, no grad
        loss.backward(); opt.step(); opt.zero_grad()
        am.step(rate=p)                               # every update_every steps: new weights, rescaled to p

Checks: python -m pytest test_amlm.py ; a toy version with plain loops: python toy_amlm.py
"""
import math
from collections import namedtuple

import torch
import torch.nn.functional as F

# frequency-rank buckets for diagnostics: ranks 1-10, 11-100, 101-1k, 1k-10k, >10k (upper edges inclusive)
BUCKET_EDGES = (10, 100, 1000, 10000)
BUCKET_KEYS = ("1_10", "11_100", "101_1k", "1k_10k", "10k_plus")
BUCKET_LABELS = ("1-10", "11-100", "101-1k", "1k-10k", ">10k")

# -----------------------------------------------------------------------------
# helpers: a table lookup, top-1 hits, the mask-rate schedule

def lookup(table, ids):
    """table[ids] for a 1-D table, as index_select: on a busy CPU the advanced-indexing kernel can wait for a
    second thread even on a small batch. Example: lookup(w, [[2, 0]]) -> [[w2, w0]]."""
    return table.index_select(0, ids.reshape(-1)).view(ids.shape)

def top1_hits(logits, y):
    """(n,) bool: is the target's logit the row maximum? A tie (more likely in bf16) counts as right.
    amax is a plain vectorised reduction, much cheaper on CPU than argmax over (n, V) logits.
    Example: logits [[1., 3.], [2., 0.]], y [1, 1] -> [True, False]"""
    return logits.gather(1, y[:, None]).squeeze(1) >= logits.amax(-1)

def mask_rate(step, total_steps, start, end):
    """Masking rate at optimizer step `step`: linear from `start` (step 0) to `end` (step total_steps), then flat.
    Example: mask_rate(50, 100, 0.40, 0.15) -> 0.275 ; mask_rate(7, 100, 0.15, 0.15) -> 0.15 (constant)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not (0 < start < 1 and 0 < end < 1):
        raise ValueError(f"mask rates must lie in (0, 1), got start={start} end={end}")
    frac = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * frac

# -----------------------------------------------------------------------------
# the metrics: how well the model masters each type, from statistics gathered during training
#
# The names are the paper's: "hard" scores a type by top-1 accuracy (a 0/1 hit per position), "soft" by
# cross-entropy; "uniform" keeps nothing and never moves the weights (plain MLM on the same code path). They say
# how a type is scored, not which types are difficult: the difficult types are those with a low mastery, and
# they are masked most. A metric is one entry of METRICS; everything else (allocation, device moves, the
# update's reset, all_reduce, checkpoints) follows from the entries.

def hard_add(logits, y):
    """What each labelled position adds to its type's statistics: a top-1 hit (0/1) and a count.
    Example: logits [[1., 3.], [2., 0.]], y [1, 1] -> {"correct": [1, 0], "total": [1, 1]}"""
    return {"correct": top1_hits(logits, y).long(), "total": torch.ones_like(y)}

def hard_mastery(s, maskable):
    """Smoothed top-1 accuracy (correct + 0.5) / (total + 1): an unseen type scores 0.5.
    Example: correct 3 of total 4 -> 3.5 / 5 = 0.7 ; 0 of 9 -> 0.05"""
    return (s["correct"] + 0.5).float() / (s["total"] + 1).float()

def hard_fit(s):
    """The window's positions and accuracy. Example: correct [1, 0], total [1, 1] -> {"observed": 2, "acc": 0.5}"""
    n = int(s["total"].sum())
    return {"observed": n, "acc": int(s["correct"].sum()) / max(n, 1)}

def soft_add(logits, y):
    """Each labelled position's cross-entropy and a count. Example: uniform logits over V = 4 -> ce_sum += ln 4"""
    return {"ce_sum": F.cross_entropy(logits.float(), y, reduction="none"), "ce_count": torch.ones_like(y)}

def soft_mastery(s, maskable):
    """1 - minmax(mean cross-entropy) over the normal types, each mean including one pseudo-observation at the
    uniform-guess loss ln V, so an unseen type counts as difficult (ln V is near the top of the range). The
    pseudo-observation is added here rather than stored, so all_reduce() counts it once.
    Example: means 0.1 (type a), 2.0 (b), 1.05 (c) -> a 1.0, b 0.0, c 0.5"""
    mean = (s["ce_sum"] + math.log(len(maskable))) / (s["ce_count"] + 1).float()
    lo, hi = mean.masked_fill(~maskable, math.inf).min(), mean.masked_fill(~maskable, -math.inf).max()
    # every type equally difficult (e.g. nothing observed): neutral 0.5, the update then keeps relative weights
    return torch.where(hi > lo, 1 - (mean - lo) / (hi - lo).clamp_min(1e-12), 0.5)

def soft_fit(s):
    """The window's [MASK]ed positions and mean cross-entropy. Example: ce_sum [2.0], ce_count [4] -> "ce" 0.5"""
    n = int(s["ce_count"].sum())
    return {"observed": n, "ce": float(s["ce_sum"].sum()) / max(n, 1)}

# stats: statistic name -> dtype, one value per type (int64 counts, float32 sums: the paper's bfloat16 stops
# counting past 256); add(logits, y) -> {statistic: (n,) values, one per labelled position}; mastery(stats,
# maskable) -> (V,) in [0, 1], 1 = learned, 0 = never right; fit(stats) -> {"observed": n, "acc" or "ce": ...}
# for the log; mask_only: count only the positions whose input is [MASK] (the paper's soft metric does)
Metric = namedtuple("Metric", "stats add mastery fit mask_only")
METRICS = {
    "hard": Metric({"correct": torch.long, "total": torch.long}, hard_add, hard_mastery, hard_fit, mask_only=False),
    "soft": Metric({"ce_sum": torch.float32, "ce_count": torch.long}, soft_add, soft_mastery, soft_fit, mask_only=True),
    "uniform": Metric({}, None, None, None, mask_only=False),
}
# every metric's statistics, held by every instance: a checkpoint has the same keys whichever metric wrote it
STATISTICS = {name: dtype for m in METRICS.values() for name, dtype in m.stats.items()}

# -----------------------------------------------------------------------------

class AMLM:
    """Per-type masking weights, their statistics and update, and budgeted mask sampling.

    vocab_size: V; special_ids: ids never selected nor drawn as random replacements ([PAD] [CLS] [SEP] ...;
    mask_id is always added). Special types keep weight 0 and are left out of every mean, so
    `weights[maskable].mean() == rate` holds at all times. rate: the starting mask rate p; each update rescales the
    weights to the rate it is given (the decaying one), and `rate` follows it.
    metric: a key of METRICS, "hard" (top-1 accuracy), "soft" (cross-entropy) or "uniform" (no adaptation).
    ema: weight of the OLD value in the update. min_weight: floor on any weight (must lie in (0, rate]).
    frequencies: (V,) counts of each type in the training data, only used to rank types in diagnostics().
    """

    def __init__(self, vocab_size, special_ids, mask_id, rate=0.15, metric="hard", ema=0.2,
                 update_every=200, min_weight=0.005, frequencies=None):
        V = int(vocab_size)
        specials = sorted({int(i) for i in special_ids} | {int(mask_id)})
        if V < 2 or any(not 0 <= i < V for i in specials) or len(specials) >= V:
            raise ValueError(f"special_ids and mask_id must be ids in [0, {V}) leaving at least one normal type")
        if not 0 < rate < 1:
            raise ValueError(f"rate must lie in (0, 1), got {rate}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {ema}")
        if int(update_every) < 1:
            raise ValueError(f"update_every must be at least 1, got {update_every}")
        if not 0 < min_weight <= rate:
            raise ValueError(f"min_weight must lie in (0, rate={rate}], got {min_weight}")
        self.vocab_size, self.mask_id, self.rate, self.metric = V, int(mask_id), float(rate), metric
        self.ema, self.update_every, self.min_weight = float(ema), int(update_every), float(min_weight)
        self.maskable = torch.ones(V, dtype=torch.bool)
        self.maskable[specials] = False
        self.normal = self.maskable.nonzero().squeeze(1)  # the normal (non-special) types: every mean is over these
        self.n_normal = len(self.normal)
        self.weights = torch.where(self.maskable, self.rate, 0.0).float()
        for name, dtype in STATISTICS.items():  # statistics since the last update, one value per type
            setattr(self, name, torch.zeros(V, dtype=dtype))
        self.steps, self.updates = 0, 0
        self.last = {"observed": 0, "acc": math.nan, "ce": math.nan}  # the window before the latest update
        # diagnostics only: normal types from most to least frequent (by id when no counts are given), on CPU
        self.order = self.normal.clone()
        if frequencies is not None:
            f = torch.as_tensor(frequencies, dtype=torch.float64).flatten()
            if f.numel() != V:
                raise ValueError(f"frequencies must have one count per type ({V}), got {f.numel()}")
            self.order = self.order[torch.argsort(-f[self.order], stable=True)]
        ranks = torch.arange(1, len(self.order) + 1)
        self.bucket = torch.bucketize(ranks, torch.tensor(BUCKET_EDGES))  # bucket index of order[k]

    def stats(self):
        """The statistics as {name: (V,) tensor}: every metric's (see STATISTICS), the tensors themselves, not copies.
        Example: a new AMLM(3, [0], 1) -> {"correct": [0, 0, 0], "total": [0, 0, 0], "ce_sum": [0., 0., 0.],
        "ce_count": [0, 0, 0]}"""
        return {name: getattr(self, name) for name in STATISTICS}

    def to(self, device):
        """Move weights and statistics to `device` (the model's); returns self."""
        for name in ("maskable", "normal", "weights", *STATISTICS):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -------------------------------------------------------------------------
    # sampling

    def probabilities(self, input_ids, rate=None):
        """(B, T) selection probabilities: pi_j proportional to w[x_j], each row summing to rate * L
        (L = its non-special positions), no entry above 1, 0 on specials.
        Probabilities that would exceed 1 are capped and the excess is spread over the rest of the row
        in proportion to their weights (water-filling), so the expected rate stays exact.
        Only relative weights matter here: each row is rescaled to its own budget.
        Example: w(a)=1.0, w(b)=0.1, row [CLS a b b SEP], rate 0.5 -> budget 1.5, a would get 1.25:
        capped to 1, the remaining 0.5 goes to the b's -> [0, 1, 0.25, 0.25, 0]."""
        rate = self.rate if rate is None else float(rate)
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must lie in [0, 1], got {rate}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        w = lookup(self.weights, input_ids)                                   # (B, T), 0 on specials
        budget = rate * lookup(self.maskable, input_ids).sum(1, dtype=w.dtype)  # (B,) selections per row
        capped = torch.zeros_like(w, dtype=torch.bool)
        # each pass caps every entry above 1 and rescales the others to the budget that is left;
        # the scale only grows, so a capped entry stays capped and T + 1 passes always suffice (1-2 in practice)
        for _ in range(input_ids.shape[1] + 1):
            free = torch.where(capped, 0.0, w)
            scale = (budget - capped.sum(1)) / free.sum(1).clamp_min(1e-30)
            pi = torch.where(capped, 1.0, free * scale[:, None])
            over = pi > 1
            if not over.any():
                break
            capped |= over
        return pi

    def mask(self, input_ids, rate=None, generator=None):
        """Select positions and corrupt them BERT-style; returns (inputs, labels), both (B, T).
        Selected positions become [MASK] 80 %, a random non-special token 10 %, unchanged 10 %;
        labels hold the original id there and -100 elsewhere. All randomness comes from `generator`
        (same device as input_ids) and the amount drawn never depends on the data, so masks are reproducible.

        Each position is selected independently with probability pi_j (as in the paper), so the marginals are
        exactly pi but the count per row varies (64 tokens at 0.15: 9.6 +- 2.9).
        Example: rate 0.5 on [CLS a b b SEP] selects 1.5 positions on average."""
        rate = self.rate if rate is None else float(rate)
        pi = self.probabilities(input_ids, rate)
        B, T = input_ids.shape
        dev = input_ids.device
        u = torch.rand(B, T, generator=generator, device=dev)
        selected = u < pi  # rand is in [0, 1): pi = 0 is never drawn, pi = 1 always
        how = torch.rand(B, T, generator=generator, device=dev)
        pick = torch.randint(self.n_normal, (B, T), generator=generator, device=dev)  # random replacements: normal types
        inputs = torch.where(selected & (how < 0.8), self.mask_id, input_ids)
        inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), lookup(self.normal, pick), inputs)
        labels = torch.where(selected, input_ids, -100)
        return inputs, labels

    # -------------------------------------------------------------------------
    # statistics and update

    @torch.no_grad()
    def observe(self, labels, logits, inputs=None):
        """Accumulate statistics from one (micro-)batch. labels: (B, T) with -100 where unselected;
        logits: (n_labelled, V) in the row-major order of the labelled positions (what MaskedLM returns),
        or (B, T, V). hard counts every selected position; soft counts only positions whose input is
        [MASK] (as in the paper), which needs `inputs`; without it soft counts every labelled position.
        Costs one row-max (hard) or one cross-entropy (soft) over the labelled logits; uniform does nothing.
        Example: labels [[-100, 7, -100, 9]] and logits predicting 7 and 3 -> total[7]=1, correct[7]=1, total[9]=1."""
        metric = METRICS[self.metric]
        if metric.add is None:
            return
        sel = labels != -100
        y = labels[sel]
        logits = logits.detach()
        if logits.dim() == labels.dim() + 1:  # full (B, T, V) logits: keep the labelled rows
            logits = logits[sel]
        if logits.shape[0] != y.numel():
            raise ValueError(f"got {logits.shape[0]} logit rows for {y.numel()} labelled positions")
        added = metric.add(logits, y)
        if metric.mask_only and inputs is not None:  # the random/kept 10 % + 10 % are skipped
            keep = inputs[sel] == self.mask_id  # (selecting after the metric is cheaper than copying the logits)
            y, added = y[keep], {name: v[keep] for name, v in added.items()}
        for name, v in added.items():
            getattr(self, name).index_add_(0, y, v)

    def mastery(self):
        """(V,) mastery in [0, 1] per type from the current statistics: 1 = learned, 0 = never right; the update
        masks a type in proportion to 1 - mastery. hard: (correct + 0.5) / (total + 1), an unseen type scores 0.5;
        soft: 1 - minmax(mean cross-entropy), see soft_mastery. Example (hard): correct 3 of total 4 -> 0.7."""
        metric = METRICS[self.metric]
        if metric.mastery is None:
            raise ValueError(f"metric {self.metric!r} keeps no statistics and has no mastery")
        return metric.mastery(self.stats(), self.maskable)

    def step(self, rate=None):
        """Call once per optimizer step (after all micro-batches were observed), with the mask rate that step
        used; every update_every steps the weights move (see update)."""
        self.steps += 1
        if self.steps % self.update_every == 0:
            self.update(rate)

    @torch.no_grad()
    def update(self, rate=None):
        """Move the weights toward the current mastery (step() calls this), then reset the statistics.
        p is the mask rate in force now (the decaying one; the last rate if None):

            q_i = p * (1 - mastery_i)            proposal: difficult types (low mastery) get more
            w_i <- ema * w_i + (1 - ema) * q_i   ema = 0.2 weights the OLD value
            w_i <- max(w_i, min_weight)          nothing is ever switched off
            w   <- w * p / mean(w)               mean over the normal types is p again

        Example (hard, p = 0.15, ema = 0.2, two types at w = 0.15):
            type A, 9 right of 9: mastery 9.5/10 = 0.95, q = 0.0075, w = 0.03 + 0.006 = 0.036
            type B, 0 right of 9: mastery 0.5/10 = 0.05, q = 0.1425, w = 0.03 + 0.114 = 0.144
            no clamp; mean 0.09, rescale by 0.15/0.09: w_A = 0.06, w_B = 0.24 (B is now chosen 4x as often).
        As in the paper's code, the weights follow the decaying rate, so the floor min_weight is a larger share
        of the mean as p falls: 1/80 of it at p = 0.40, 1/30 at p = 0.15. The floor comes before the rescale, so a
        floored type ends above min_weight when the rescale scales up. Example: at p = 0.10, a learned type at
        w = 0.01 that proposes q ~ 0 gets 0.2 * 0.01 = 0.002 -> floored to 0.005; beside one unseen type at
        w = 0.19 (0.078 after the EMA) the rescale by 0.10 / 0.0415 lifts it to 0.012.

        Sampling uses only the relative weights (probabilities() rescales each row to its budget), and the rescale
        changes the EMA's effective mix. If the weights have mean p and the mean mastery is m (no floor), the
        mean before the rescale is p * (ema + (1 - ema) * (1 - m)), so the old weight's share of the new one is
        ema / (ema + (1 - ema) * (1 - m)): 0.2 at m = 0 (nothing learned), 1/3 at m = 0.5, 0.56 at m = 0.8.
        The better the model, the more slowly the relative weights move."""
        metric = METRICS[self.metric]
        self.all_reduce()
        if metric.mastery is not None:
            self.last = {"observed": 0, "acc": math.nan, "ce": math.nan, **metric.fit(self.stats())}
            p = self.rate = self.rate if rate is None else float(rate)
            q = p * (1 - self.mastery())
            w = (self.ema * self.weights + (1 - self.ema) * q).clamp_min(self.min_weight)
            w = torch.where(self.maskable, w, 0.0)
            self.weights = w * (p * self.n_normal / w.sum())  # specials add 0 to the sum
        for t in self.stats().values():
            t.zero_()
        self.updates += 1

    def all_reduce(self, stats=None):
        """Sum the statistics (or the given copies of them) over processes when torch.distributed is initialised
        (no-op otherwise). update() calls it, so every process computes the same weights; all must call step()
        in lockstep. Example: process 0 saw type 7 twice, process 1 once -> both hold total[7] == 3."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and METRICS[self.metric].stats:
            for t in stats if stats is not None else self.stats().values():
                dist.all_reduce(t)

    # -------------------------------------------------------------------------
    # checkpointing

    def state_dict(self):
        """Everything needed for an exact resume: weights, statistics and step counters (plain tensors and ints).
        Under torch.distributed the statistics since the last update are summed over the processes (all must
        call this), so one saved state holds the whole run's; load it with stats=True into one process only.
        Example: -> {"weights": ..., "correct": ..., "total": ..., "ce_sum": ..., "ce_count": ..., "steps": 400, ...}"""
        stats = {name: t.clone() for name, t in self.stats().items()}
        self.all_reduce(list(stats.values()))
        return {"weights": self.weights.clone(), **stats, "steps": self.steps, "updates": self.updates,
                "metric": self.metric, "vocab_size": self.vocab_size, "rate": self.rate}

    def load_state_dict(self, sd, stats=True):
        """Restore from state_dict(); the metric and vocabulary size must match this instance. stats=False starts
        the statistics from zero (the other processes of a distributed run: one of them holds the saved sums).
        A statistic the state lacks (one no metric of its writer kept) starts from zero."""
        if sd["vocab_size"] != self.vocab_size or sd["metric"] != self.metric:
            raise ValueError(f"AMLM state is for metric={sd['metric']} V={sd['vocab_size']}, "
                             f"this one is metric={self.metric} V={self.vocab_size}")
        self.weights = sd["weights"].to(device=self.weights.device, dtype=self.weights.dtype).clone()
        for name, t in self.stats().items():
            saved = sd.get(name) if stats else None
            t = torch.zeros_like(t) if saved is None else saved.to(device=t.device, dtype=t.dtype).clone()
            setattr(self, name, t)
        self.steps, self.updates = int(sd["steps"]), int(sd["updates"])
        # the scale the weights are at; a state without a rate takes its weights' mean
        self.rate = float(sd.get("rate", self.weights[self.maskable].mean()))

    # -------------------------------------------------------------------------
    # diagnostics (the paper's Figure 1: weight by frequency rank, and which types are masked most)

    def diagnostics(self, tokens=None):
        """One flat CSV row of plain values describing the current weights: counters, the last window's
        accuracy (hard) or mean cross-entropy (soft), mean weight per frequency-rank bucket (nan when a bucket
        is empty), and the 5 most and least masked (highest / lowest weight) of the 1000 most frequent types,
        joined with "|" (token strings if `tokens`, the id -> string list, is given, else ids). The columns
        "hardest" and "easiest" (public names: amlm.csv and the log line) hold these most and least masked types.
        Example: {"step": 400, "update": 2, ..., "w_rank_1_10": 0.031, ..., "hardest": "▁gave|▁him|...", ...}"""
        w = self.weights.float().cpu()
        wo = w[self.order]
        sums = torch.zeros(len(BUCKET_KEYS), dtype=torch.float64).index_add_(0, self.bucket, wo.double())
        counts = torch.bincount(self.bucket, minlength=len(BUCKET_KEYS))
        top = self.order[:1000]
        by_weight = top[torch.argsort(w[top], descending=True, stable=True)].tolist()
        name = (lambda i: tokens[i]) if tokens is not None else str
        d = {"step": self.steps, "update": self.updates, "metric": self.metric, "rate": self.rate, **self.last,
             "w_min": float(wo.min()), "w_max": float(wo.max())}
        for key, s, c in zip(BUCKET_KEYS, sums.tolist(), counts.tolist()):
            d[f"w_rank_{key}"] = s / c if c else math.nan
        d["hardest"] = "|".join(name(i) for i in by_weight[:5])
        d["easiest"] = "|".join(name(i) for i in by_weight[::-1][:5])
        return d

    def log_line(self, tokens=None):
        """One line for the training log: the curriculum as each frequency-rank bucket's mean weight relative to the
        mean over the maskable types (above 1x: masked more often than the average type), and the most and least
        masked of the 1000 most frequent types ("hardest", "easiest"). Example: 'amlm hard update 2 step 400
        acc 0.412 | masked vs the average type, by frequency rank: 1-10 0.21x 11-100 0.48x 101-1k 1.20x ... |
        hardest ▁met|... | easiest .|...'"""
        d = self.diagnostics(tokens)
        fit = " ".join(f"{k} {d[k]:.3f}" for k in ("acc", "ce") if not math.isnan(d[k]))
        ranks = " ".join(f"{lab} {d['w_rank_' + k] / self.rate:.2f}x" for lab, k in zip(BUCKET_LABELS, BUCKET_KEYS)
                         if not math.isnan(d["w_rank_" + k]))
        return (f"amlm {self.metric} update {d['update']} step {d['step']} {fit} | masked vs the average type, by "
                f"frequency rank: {ranks} | hardest {d['hardest']} | easiest {d['easiest']}")
