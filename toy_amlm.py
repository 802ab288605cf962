"""
AMLM in about 100 lines: the method of Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language
Modeling for Pretraining BabyLMs" (BabyLM 2025), on toy numbers with plain Python loops. Each part prints what it
computes and names the function that does it for real. Imports only torch; a few seconds on a CPU.

Run: python toy_amlm.py    (then docs/walkthrough.md: one real training step; then docs/exercise.md: build it yourself)
"""
import math

import torch

def probabilities(w, rate):
    """Budgeted selection probabilities of one row, given each position's weight (0 = a special token): pi_j is
    proportional to w_j and sums to rate * L; a pi above 1 is capped, its excess spread over the rest (water-filling).
    Example: probabilities([0, 1.0, 0.1, 0.1, 0], 0.5) -> [0, 1, 0.25, 0.25, 0]"""
    budget, capped = rate * sum(x > 0 for x in w), [False] * len(w)
    while True:  # each pass caps what exceeds 1; the scale only grows, so this ends
        scale = (budget - sum(capped)) / sum(x for x, c in zip(w, capped) if not c)
        pi = [1.0 if c else x * scale for x, c in zip(w, capped)]
        if max(pi) <= 1:
            return pi
        capped = [c or x > 1 for c, x in zip(capped, pi)]

def update(w, correct, total, p, ema=0.2, floor=0.005):
    """One AMLM update, type by type; returns the weights before and after the rescale to mean p.
    Example: update({"A": .15, "B": .15}, {"A": 9, "B": 0}, {"A": 9, "B": 9}, .15) -> A .036, B .144, then .06, .24"""
    new = {}
    for t in w:
        score = (correct[t] + 0.5) / (total[t] + 1)      # mastery: smoothed top-1 accuracy, 1 = learned
        q = p * (1 - score)                              # proposal: the less mastered, the more masked
        new[t] = max(ema * w[t] + (1 - ema) * q, floor)  # EMA (ema weighs the OLD value), then the floor
    mean = sum(new.values()) / len(new)
    return new, {t: x * p / mean for t, x in new.items()}  # the rescale comes after the floor

def units(token, n=3):
    """Character 1..n-grams, "<" for a word start ("▁"), ">" for the token's end (the bare ">" dropped).
    Example: units("▁ab") -> ["<", "a", "b", "<a", "ab", "b>", "<ab", "ab>"]"""
    s = ("<" + token[1:] if token.startswith("▁") else token) + ">"
    us = dict.fromkeys(s[i:i + k] for k in range(1, n + 1) for i in range(len(s) - k + 1))
    us.pop(">", None)
    return list(us)

def nhot(vocab, min_count=2, cap=8192):
    """Each token's kept units: those found in >= min_count vocabulary entries, the cap most frequent.
    Example: nhot(["▁ab", "▁ac"])["▁ab"] -> ["<", "a", "<a"]"""
    df = {}
    for t in vocab:
        for u in units(t):
            df[u] = df.get(u, 0) + 1
    kept = set(sorted((u for u in df if df[u] >= min_count), key=lambda u: (-df[u], u))[:cap])
    return {t: [u for u in units(t) if u in kept] for t in vocab}

def main():
    g = torch.Generator().manual_seed(0)
    print("1. uniform MLM: every position selected with p = 0.15")
    words = "▁the ▁cat ▁sat ▁on ▁the ▁mat ▁and ▁the ▁dog ▁sat ▁too".split()
    draws = torch.rand(1000, len(words), generator=g) < 0.15
    print("   one draw:", " ".join("[MASK]" if m else w for w, m in zip(words, draws[0].tolist())))
    print(f"   selected over 1000 draws: {draws.float().mean():.3f}   (real: amlm.AMLM(metric='uniform').mask)")

    print("2. one AMLM update, p = 0.15, ema = 0.2: A right 9 of 9, B right 0 of 9, both at w = 0.15")
    before, after = update({"A": 0.15, "B": 0.15}, {"A": 9, "B": 0}, {"A": 9, "B": 9}, 0.15)
    for t in "AB":
        print(f"   {t}: w 0.15 -> {before[t]:.4f} -> rescaled {after[t]:.4f}")
    print(f"   B is now masked {after['B'] / after['A']:.1f}x as often as A")
    print("   the floor at p = 0.10: C at w = 0.01 always right (q ~ 0), D at w = 0.19 never seen (mastery 0.5)")
    before, after = update({"C": 0.01, "D": 0.19}, {"C": 10**6, "D": 0}, {"C": 10**6, "D": 0}, 0.10)
    print(f"   C: 0.2 x 0.01 = 0.002 -> floored {before['C']:.4f} -> rescaled {after['C']:.4f} (above the floor)")
    print(f"   D: -> {before['D']:.4f} -> rescaled {after['D']:.4f}   (real: amlm.AMLM.mastery and amlm.AMLM.update)")

    print("3. budgeted probabilities of [CLS] a b b [SEP], w(a) = 1.0, w(b) = 0.1, rate 0.5: budget 1.5")
    pi = probabilities([0, 1.0, 0.1, 0.1, 0], 0.5)
    print("   pi =", " ".join(f"{x:.2f}" for x in pi), "  (a capped at 1, its excess went to the b's)")
    counts = (torch.rand(1000, 5, generator=g) < torch.tensor(pi)).sum(1)
    hist = " ".join(f"{k}: {int((counts == k).sum())}" for k in range(4))
    print(f"   selected per row in 1000 draws: {hist}; mean {counts.float().mean():.3f}")
    print("   (real: amlm.AMLM.probabilities, amlm.AMLM.mask)")

    print("4. N-hot units of ▁walked ▁talked ▁jumped, kept if in >= 2 vocabulary entries")
    vocab = ["▁walked", "▁talked", "▁jumped"]
    for t, us in nhot(vocab).items():
        print(f"   {t}: {len(units(t))} units, {len(us)} kept, k = {len(us)}, each weighs 1/sqrt(k) = "
              f"{1 / math.sqrt(len(us)):.4f}: {' '.join(us)}")
    kept = nhot(vocab)
    print("   shared by all three:", " ".join(u for u in kept["▁walked"] if all(u in kept[t] for t in vocab)))
    print("   (real: tokenizer.subtoken_units, tokenizer.Tokenizer.subtoken_table, model.MaskedLM.embedding_matrix)")

    print("5. 20 steps on a toy task: 'e' always follows 'k' (easy), 'r0'-'r4' are random (difficult)")
    names = ["[CLS]", "[MASK]", "k", "e", "r0", "r1", "r2", "r3", "r4"]
    torch.manual_seed(0)
    table = torch.nn.Embedding(len(names), len(names))  # the "model": logits of a position from its left input
    opt = torch.optim.Adam(table.parameters(), lr=0.3)
    w = {t: 0.15 for t in range(2, len(names))}
    correct, total = dict.fromkeys(w, 0), dict.fromkeys(w, 0)
    for step in range(1, 21):
        x = torch.randint(4, 9, (16, 13), generator=g)
        x[:, 1::4], x[:, 2::4], x[:, 0] = 2, 3, 0  # ... k e r r k e r r ...
        pi = torch.tensor([probabilities([w.get(t, 0.0) for t in row], 0.15) for row in x.tolist()])
        sel = torch.rand(x.shape, generator=g) < pi
        inputs = torch.where(sel, 1, x)  # all [MASK] here; the real mask keeps 10 % and swaps 10 %
        logits = table(inputs[:, :-1])[sel[:, 1:]]  # predict each selected position from its left neighbour
        y = x[:, 1:][sel[:, 1:]]
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(); loss.backward(); opt.step()
        for t, hit in zip(y.tolist(), (logits.argmax(1) == y).tolist()):
            correct[t], total[t] = correct[t] + hit, total[t] + 1
        if step % 5 == 0:
            _, w = update(w, correct, total, 0.15)
            correct, total = dict.fromkeys(w, 0), dict.fromkeys(w, 0)
            print(f"   step {step}: loss {loss.item():.2f}  w(e) {w[3]:.3f}  w(r0) {w[4]:.3f}  w(k) {w[2]:.3f}")
    print("   the easy type's weight fell, the difficult ones' rose   (real: train.py's loop, amlm.AMLM.step)")

if __name__ == "__main__":
    main()
