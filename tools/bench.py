"""
Benchmarks (not tests) for amlm, a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall
Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    python -m tools.bench model [--rounds 7] [--dtypes fp32,bf16] [--compile]
        training-step throughput of lib/fast.py's FastMaskedLM and model.py's MaskedLM (with --compile also the plain
        model under torch.compile), N-hot on and off, and Hugging Face's BertForMaskedLM of the same shape when
        transformers is installed (a benchmark-only peer)
    python -m tools.bench pieces [--repeat 20]
        each speed piece of lib/fast.py against its plain twin, forward + backward, at the model benchmark's shape
    python -m tools.bench data --corpus babylm_10M --vocab-size 16384 [--data-dir NEW_OR_EMPTY_FOLDER]
        a cold `python data.py` (tokenizer training + encoding) into a new temporary data dir (removed at the end;
        --data-dir: a new or empty folder instead, kept), then a cache hit

The model benchmark: 4 layers, d_model 256, 4 heads, d_ff 1024, vocab 16384, dropout 0.1, batches of
32 x 128 tokens with 15 % of the positions masked, AdamW. One timed step is forward + backward + AdamW step.
The contenders run back to back, round after round, in one process; a ratio is taken per round (the
machine's speed drifts less within a round) and the median is reported with the per-round range.
"""
import argparse, os, re, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch

from lib.errors import ArgumentParser

N_LAYER, D_MODEL, N_HEAD, D_FF, V, T, B, P = 4, 256, 4, 1024, 16384, 128, 32, 0.15  # the shape, batch and mask rate

# -----------------------------------------------------------------------------
# model: training-step throughput

def masked_batch(gen):
    x = torch.randint(5, V, (B, T), generator=gen)
    sel = torch.rand(B, T, generator=gen) < P
    return torch.where(sel, 4, x), torch.where(sel, x, -100)

def ours(fast=True, nhot=False):
    from lib.fast import FastMaskedLM
    from model import MaskedLM, ModelConfig
    table = None
    if nhot:  # 6 units per token, about what a 4-5 character word's 1- to 3-grams give after pruning
        table = torch.randint(0, 4096, (V, 8), generator=torch.Generator().manual_seed(1))
        table[:, 6:], table[:5] = -1, -1
    m = (FastMaskedLM if fast else MaskedLM)(ModelConfig(vocab_size=V, n_layer=N_LAYER, n_head=N_HEAD, d_model=D_MODEL, d_ff=D_FF, max_len=T, dropout=0.1), table)
    return m, lambda inp, lab: m(inp, labels=lab)[1]

def bert():
    from transformers import BertConfig, BertForMaskedLM
    m = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=D_MODEL, num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                                   intermediate_size=D_FF, max_position_embeddings=T, attn_implementation="sdpa"))
    return m, lambda inp, lab: m(input_ids=inp, labels=lab).loss

def runner(model, loss_fn, bf16):
    """A function k -> tokens per second over k training steps (after four warm-up steps, one per batch)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [masked_batch(torch.Generator().manual_seed(i)) for i in range(4)]
    def run(k):
        t = time.perf_counter()
        for i in range(k):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(*batches[i % 4])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return B * T * k / (time.perf_counter() - t)
    run(4)  # every batch once: torch.compile sees all four target counts before the timing
    return run

def bench_model(a):
    contenders = {"ours (fast)": ours, "ours (plain, --no-fast)": lambda: ours(fast=False),
                  "ours (fast) + N-hot": lambda: ours(nhot=True)}
    if a.compile:  # what train.py --compile runs: the plain model, compiled (the first steps compile it)
        def compiled():
            m, loss = ours(fast=False)
            return m, torch.compile(loss)
        contenders["ours (plain + compile)"] = compiled
    try:
        import transformers  # noqa: F401
        contenders["HF BertForMaskedLM"] = bert
    except ImportError:
        print("transformers is not installed: BertForMaskedLM not measured (pip install transformers)")
    ratios = [("ours (fast)", "ours (plain, --no-fast)", "lib/fast.py speed-up"),
              ("ours (fast)", "ours (plain + compile)", "fast / plain + compile"),
              ("ours (fast)", "HF BertForMaskedLM", "ours / BertForMaskedLM"),
              ("ours (fast)", "ours (fast) + N-hot", "N-hot cost (slow-down)")]
    for dtype in a.dtypes:
        runs = {}
        for name, make in contenders.items():
            torch.manual_seed(0)
            runs[name] = runner(*make(), bf16=dtype == "bf16")
        tps = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, run in runs.items():
                tps[name].append(run(a.steps))
        print(f"\n[{dtype}] {a.rounds} rounds of {a.steps} steps, {torch.get_num_threads()} threads")
        for name, v in tps.items():
            print(f"  {name:26s} {statistics.median(v):8.0f} tok/s (range {min(v):.0f}-{max(v):.0f})")
        for x, y, what in ratios:
            if x in tps and y in tps:
                r = [p / q for p, q in zip(tps[x], tps[y])]
                show = (lambda v: f"{100 * (v - 1):.1f} %") if "cost" in what else (lambda v: f"{v:.2f}x")
                print(f"  {what:26s} {show(statistics.median(r))} (per-round {show(min(r))} to {show(max(r))})")

# -----------------------------------------------------------------------------
# pieces: each of lib/fast.py's pieces against its plain twin

def pieces():
    """(name, plain twin, fast piece) triples: functions of no arguments that run forward + backward once."""
    from lib import fast
    import model as plain
    torch.manual_seed(0)
    hd, n = D_MODEL // N_HEAD, int(B * T * P)
    qkv = torch.randn(B, T, 3 * N_HEAD, hd, requires_grad=True)
    cos, sin = plain.rope_tables(T, hd, "cpu")
    def rope_plain():
        q, k, v = qkv.view(B, T, 3, N_HEAD, hd).permute(2, 0, 3, 1, 4)
        (plain.apply_rope(q, cos, sin) * hd ** -0.5 + plain.apply_rope(k, cos, sin) + v).sum().backward()
    def rope_fast():
        q, k, v = fast.RotaryQKV.apply(qkv, cos, sin, hd ** -0.5)
        (q + k + v).sum().backward()
    x, y = torch.randn(B, T, D_MODEL, requires_grad=True), torch.randn(B, T, D_MODEL, requires_grad=True)
    h, E, b = torch.randn(n, D_MODEL, requires_grad=True), torch.randn(V, D_MODEL, requires_grad=True), torch.zeros(V, requires_grad=True)
    t = torch.randint(5, V, (n,))
    m = ours(nhot=True)[0]
    def lce_plain():
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, E, b), t).backward()
    def nhot_plain():
        torch.nn.functional.embedding_bag(m.nhot_ids, m.sub.weight, per_sample_weights=m.nhot_w, mode="sum").sum().backward()
    return [("RoPE + q/k/v split", rope_plain, rope_fast),
            ("dropout (0.1)", lambda: torch.nn.functional.dropout(x, 0.1, True).sum().backward(),
             lambda: fast.dropout(x, 0.1, True).sum().backward()),
            ("residual add + dropout", lambda: (x + torch.nn.functional.dropout(y, 0.1, True)).sum().backward(),
             lambda: fast.dropout_add(x, y, 0.1, True).sum().backward()),
            ("tied head + loss", lce_plain, lambda: fast.LinearCrossEntropy.apply(h, E, b, t)[1].backward()),
            ("N-hot sum (6 units/token)", nhot_plain, lambda: fast.nhot_sum(m).sum().backward())]

def bench_pieces(a):
    print(f"forward + backward, median of {a.repeat} calls, {torch.get_num_threads()} threads, shape of `python -m tools.bench model`")
    for name, slow, quick in pieces():
        times = []
        for f in (slow, quick):
            f(), f()  # warm-up
            ts = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            times.append(statistics.median(ts) * 1e3)
        print(f"  {name:28s} plain {times[0]:7.2f} ms   fast {times[1]:7.2f} ms   saves {times[0] - times[1]:6.2f} ms")

# -----------------------------------------------------------------------------
# data: tokenizer training, encoding, cache

ROOT = Path(__file__).resolve().parent.parent  # where data.py is

def run_data_py(args):
    """Run data.py in a child process -> (wall seconds, peak memory GB, its output); if it fails, exit with its last
    line of stderr (its one-sentence error). Example: ["--corpus", "nothere"] -> exit "error: data.py failed: ..." """
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "data.py", *args], stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            said = [line for line in err.read().splitlines() if line.strip()] or ["(nothing on stderr)"]
            sys.exit(f"error: data.py failed: {re.sub(r'^(data.py: )?error: ', '', said[-1])}")
    return time.time() - t0, usage.ru_maxrss / 2**20, out  # ru_maxrss is in KiB on Linux

def data_dir_problem(path):
    """What is wrong with --data-dir for the cold run, or None: it must be new or empty, since this benchmark removes
    no folder it did not make. Example: "data" holding babylm_10M/ -> "--data-dir data is not empty; ..." """
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"--data-dir {path} is a file; give a new or empty folder, or leave it out for a temporary one"
    if p.is_dir() and any(p.iterdir()):
        return (f"--data-dir {path} is not empty; give a new or empty folder (the cold run needs one without a "
                f"cache), or leave it out for a temporary one")
    return None

def bench_data(a):
    """A cold data.py run, then a cache hit, in a data dir this function makes: a temporary one (removed at the
    end), or --data-dir, new or empty (kept). Example: -> "     cold:   95.1 s wall (the whole process), ..." """
    data_dir = Path(tempfile.mkdtemp(prefix="amlm_bench_data")) if a.data_dir is None else Path(a.data_dir)
    made, keep = not data_dir.exists() or a.data_dir is None, a.data_dir is not None  # made here: removed unless kept
    in_data = Path("data", a.corpus)  # a corpus name already downloaded into ./data
    corpus = str(in_data.resolve()) if in_data.is_dir() else str(Path(a.corpus).resolve()) if Path(a.corpus).exists() else a.corpus
    args = ["--corpus", corpus, "--data-dir", str(data_dir.resolve()), "--vocab-size", str(a.vocab_size), "--quiet"]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for name in ("cold", "cache hit"):
            secs, gb, out = run_data_py(args)
            print(f"{name:>9}: {secs:6.1f} s wall (the whole process), peak RSS {gb:.2f} GB")
    except BaseException:
        keep = False  # a failed run keeps nothing it made
        raise
    finally:
        if made and not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(out.strip())
    print(f"tokens/word {float(re.search(r'tokens/word ([0-9.]+)', out).group(1)):.3f}")

# -----------------------------------------------------------------------------
# command line

def positive_int(s):
    """Example: "3" -> 3; "0" -> ArgumentTypeError("must be a positive integer, got 0")"""
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v

DTYPES = ("fp32", "bf16")

def dtypes(s):
    """Example: "fp32,bf16" -> ["fp32", "bf16"]; "fp16" -> ArgumentTypeError (only fp32 and bf16 are measured)"""
    names = s.split(",")
    if not all(n in DTYPES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be {' or '.join(DTYPES)}, or both separated by a comma, got {s}")
    return names

def get_parser():
    ap = ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)  # the subcommands' parsers are ArgumentParsers too
    m = sub.add_parser("model", help="training-step throughput against BertForMaskedLM")
    m.add_argument("--rounds", type=positive_int, default=7, help="rounds, each timing every contender (default: %(default)s)")
    m.add_argument("--steps", type=positive_int, default=6, help="timed steps per round (default: %(default)s)")
    m.add_argument("--dtypes", type=dtypes, default=list(DTYPES), help="fp32, bf16 or fp32,bf16 (default: fp32,bf16)")
    m.add_argument("--compile", action="store_true", help="also time the plain model under torch.compile")
    pc = sub.add_parser("pieces", help="lib/fast.py's pieces against their plain twins")
    pc.add_argument("--repeat", type=positive_int, default=20, help="timed calls of each piece (default: %(default)s)")
    d = sub.add_parser("data", help="tokenizer and cache build")
    d.add_argument("--corpus", default="babylm_10M", help="a path, or a corpus name already in data/ (default: %(default)s)")
    d.add_argument("--data-dir", help="a new or empty folder for the cold run, kept (default: a temporary folder, removed)")
    d.add_argument("--vocab-size", type=positive_int, default=16384, help="(default: %(default)s)")
    return ap

def main(argv=None):
    ap = get_parser()
    a = ap.parse_args(argv)
    if a.what == "data" and a.data_dir is not None and (problem := data_dir_problem(a.data_dir)):
        ap.error(problem)
    {"model": bench_model, "pieces": bench_pieces, "data": bench_data}[a.what](a)


if __name__ == "__main__":
    main()
