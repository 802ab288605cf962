"""
Two small figures from finished runs (needs matplotlib, which the project itself does not):

    python plot.py figure1 out/harddecay --png docs/figure1.png
        the paper's Figure 1: average masking probability by frequency rank over training, from amlm.csv
    python plot.py curves out/uniform out/harddecay --png docs/curves.png
        BLiMP macro accuracy against words seen, from the blimp_*.json files evaluate.py wrote
        (their "accuracy": the mean of the accuracy tasks)

Paper: Edman & Fraser, "Mask and You Shall Receive", BabyLM 2025.
"""
import argparse, csv, glob, json, os, re, sys

from amlm import BUCKET_KEYS, BUCKET_LABELS


def figure1(run, ax):
    """A position's probability is about w * current rate / the rate the weights are scaled to (each row is
    rescaled to the current rate when masking); amlm.csv's "rate" column says that scale (files without it
    kept the weights at the starting rate)."""
    rows = list(csv.DictReader(open(os.path.join(run, "amlm.csv"))))
    start = json.load(open(os.path.join(run, "summary.json")))["config"]["mask_rate_start"]
    steps = [int(r["step"]) for r in rows]
    for key, label in zip(BUCKET_KEYS, BUCKET_LABELS):
        ys = [float(r[f"w_rank_{key}"]) * float(r["mask_rate"]) / float(r.get("rate") or start) for r in rows]
        ax.plot(steps, ys, label=f"ranks {label}")
    ax.plot(steps, [float(r["mask_rate"]) for r in rows], "k--", label="mask rate")
    ax.set(xlabel="step", ylabel="mean masking probability", title=f"AMLM weights by frequency rank ({os.path.basename(run)})")


def curves(runs, ax):
    for run in runs:
        pts = []
        for f in glob.glob(os.path.join(run, "blimp_*.json")):
            res = json.load(open(f))
            words = res.get("words_seen")  # older result files only have it in their name: blimp_<N>M.json
            x = words / 1e6 if words is not None else int(re.search(r"blimp_(\d+)M", f).group(1))
            pts.append((x, res["accuracy"] if "accuracy" in res else res["overall"]))  # older files: "overall"
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=os.path.basename(os.path.normpath(run)))
    ax.axhline(50, color="grey", lw=0.5)
    ax.set(xlabel="million words seen", ylabel="BLiMP-fast macro accuracy (%)", title="learning curves")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["figure1", "curves"])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--png", required=True)
    a = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot.py needs matplotlib (pip install matplotlib); training and evaluation do not")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    try:
        figure1(a.runs[0], ax) if a.what == "figure1" else curves(a.runs, ax)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"error: cannot read the run folder: {e}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.png) or ".", exist_ok=True)
    fig.savefig(a.png)
    print(f"wrote {a.png} ({os.path.getsize(a.png) // 1024} KB)")
