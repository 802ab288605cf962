"""
Small figures from finished runs (needs matplotlib, which the project itself does not):

    python -m tools.plot figure1 out/harddecay --png docs/figure1.png
        the paper's Figure 1: average masking probability by frequency rank over training, from amlm.csv
    python -m tools.plot curves out/uniform out/harddecay --png docs/curves.png
        BLiMP macro accuracy against words seen, from the blimp_*.json files evaluate.py wrote
        (their "accuracy": the mean of the accuracy tasks)
    python -m tools.plot seeds out/sci/U-1337 out/sci/U-1 out/sci/H-1337 ... --png docs/seeds.png
        BLiMP-fast and WUG against words seen for runs named <configuration>-<seed>, from the eval_*.json
        files evaluate.py wrote with both tasks: one colour per configuration, one line per seed

Paper: Edman & Fraser, "Mask and You Shall Receive", BabyLM 2025.
"""
import csv, glob, json, os, re, sys, tempfile

from amlm import BUCKET_KEYS, BUCKET_LABELS
from lib.errors import ArgumentParser


def figure1(run, ax):
    """A position's probability is about w * current rate / the rate the weights are scaled to (each row is
    rescaled to the current rate when masking); amlm.csv's "rate" column says that scale (a file without the
    column has its weights at the starting rate)."""
    rows = list(csv.DictReader(open(os.path.join(run, "amlm.csv"))))
    start = json.load(open(os.path.join(run, "summary.json")))["config"]["mask_rate_start"]
    steps = [int(r["step"]) for r in rows]
    for key, label in zip(BUCKET_KEYS, BUCKET_LABELS):
        ys = [float(r[f"w_rank_{key}"]) * float(r["mask_rate"]) / float(r.get("rate") or start) for r in rows]
        ax.plot(steps, ys, label=f"ranks {label}")
    ax.plot(steps, [float(r["mask_rate"]) for r in rows], "k--", label="mask rate")
    ax.set(xlabel="step", ylabel="mean masking weight", title=f"AMLM weights by frequency rank ({os.path.basename(run)})")


def curves(runs, ax):
    for run in runs:
        pts = []
        for f in glob.glob(os.path.join(run, "blimp_*.json")):
            res = json.load(open(f))
            words = res.get("words_seen")  # a file without it has it in its name: blimp_<N>M.json
            x = words / 1e6 if words is not None else int(re.search(r"blimp_(\d+)M", f).group(1))
            pts.append((x, res["accuracy"] if "accuracy" in res else res["overall"]))  # "overall": the same, another key
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=os.path.basename(os.path.normpath(run)))
    ax.axhline(50, color="grey", lw=0.5)
    ax.set(xlabel="million words seen", ylabel="BLiMP-fast macro accuracy (%)", title="learning curves")


def config_and_seed(run):
    """A run folder named <configuration>-<seed>. Example: "out/sci/HN-1337/" -> ("HN", "1337")"""
    config, _, seed = os.path.basename(os.path.normpath(run)).rpartition("-")
    return config, seed


def seeds(runs, axes):
    named = [(*config_and_seed(run), run) for run in runs]
    colours = {}
    for config, seed, run in sorted(named, key=lambda n: n[1] != "1337"):  # seed 1337's style goes in the legend
        pts = []
        for f in glob.glob(os.path.join(run, "eval_*.json")):
            res = json.load(open(f))
            scores = {name.split("/")[0]: t["score"] for name, t in res["tasks"].items()}
            pts.append((res["words_seen"] / 1e6, scores.get("blimp_fast"), scores.get("wug_adj_dev")))
        if not pts:
            raise ValueError(f"{run} holds no eval_*.json")
        pts.sort()
        first = config not in colours  # one legend entry per configuration, whatever the number of seeds
        colour = colours.setdefault(config, f"C{len(colours)}")
        for ax, i in zip(axes, (1, 2)):
            xs = [p for p in pts if p[i] is not None]
            ax.plot([p[0] for p in xs], [p[i] for p in xs], "o-" if seed == "1337" else "s--", color=colour, ms=4,
                    label=config if first else None)
    axes[0].axhline(50, color="grey", lw=0.5)
    axes[0].set(xlabel="million words seen", ylabel="BLiMP-fast macro accuracy (%)",
                title="BLiMP-fast (solid: seed 1337, dashed: other seeds)")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(xlabel="million words seen", ylabel="Spearman rho x 100", title="WUG adjective nominalisation")


def png_problem(png):
    """What is wrong with --png, or None: it must end in .png, and an existing file there must be a PNG (an earlier
    figure), so that no input (amlm.csv, summary.json, a results file) or other file of the user's is overwritten.
    Example: "out/run/amlm.csv" -> "--png out/run/amlm.csv must end in .png"; "docs/figure1.png" -> None"""
    if os.path.isdir(png):
        return f"--png {png} is a folder; give a file name, such as {os.path.join(png, 'figure.png')}"
    if not png.lower().endswith(".png"):
        return f"--png {png} must end in .png"
    if os.path.exists(png):
        try:
            with open(png, "rb") as f:
                if f.read(8) != b"\x89PNG\r\n\x1a\n":
                    return f"--png {png} exists and is not a PNG image; give another file name"
        except OSError as e:
            return f"cannot read --png {png} ({e.strerror or e})"
    return None


def main(argv=None):
    p = ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["figure1", "curves", "seeds"])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--png", required=True, help="the figure to write: a new file, or an earlier PNG to replace")
    a = p.parse_args(argv)
    if problem := png_problem(a.png):
        p.error(problem)
    if a.what == "figure1" and len(a.runs) > 1:  # one run's weights per figure; a second would be silently dropped
        p.error(f"figure1 draws one run's weights; give one run folder, not {len(a.runs)}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("tools/plot.py needs matplotlib (pip install matplotlib); training and evaluation do not")
    fig, ax = plt.subplots(1, 2 if a.what == "seeds" else 1, figsize=(10 if a.what == "seeds" else 6, 3.6), dpi=90)
    try:
        {"figure1": lambda: figure1(a.runs[0], ax), "curves": lambda: curves(a.runs, ax),
         "seeds": lambda: seeds(a.runs, ax)}[a.what]()
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:  # AttributeError: a file named without <N>M
        sys.exit(f"error: cannot read the run folder: {e}")
    for x in ax if a.what == "seeds" else [ax]:
        x.legend(fontsize=6)
    fig.tight_layout()
    tmp = None
    try:  # written to a new name beside it, then renamed: a failure leaves the earlier figure as it was
        os.makedirs(os.path.dirname(a.png) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".png", prefix=os.path.basename(a.png) + ".tmp", dir=os.path.dirname(a.png) or ".")
        os.close(fd)
        fig.savefig(tmp, format="png")
        os.replace(tmp, a.png)
    except OSError as e:
        sys.exit(f"error: cannot write --png {a.png} ({e.strerror or e})")
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {a.png} ({os.path.getsize(a.png) // 1024} KB)")


if __name__ == "__main__":
    main()
