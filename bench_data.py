"""
Benchmark for data.py (not a test): a cold `python data.py` run (tokenizer training + encoding the corpus)
into a fresh data dir, then a second run that must hit the cache. Each run is a child process, timed by wall
clock, with its peak memory read from the kernel (os.wait4 -> ru_maxrss).

Run:  python bench_data.py --corpus ../shared/data/babylm_10M --data-dir /tmp/bench_data --vocab-size 16384
Targets (issue 2, 2-core machine): cold < 5 min and < 4 GB peak, cache hit < 10 s, tokens/word 1.2-1.8.
"""
import argparse, os, re, shutil, subprocess, sys, time


def run(args):
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "data.py", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"data.py failed:\n{out}")
    return time.time() - t0, usage.ru_maxrss / 2**20, out  # ru_maxrss is in KiB on Linux


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="../shared/data/babylm_10M")
    ap.add_argument("--data-dir", default="/tmp/bench_data")
    ap.add_argument("--vocab-size", default="16384")
    a = ap.parse_args()
    shutil.rmtree(a.data_dir, ignore_errors=True)  # cold: no cache
    args = ["--corpus", a.corpus, "--data-dir", a.data_dir, "--vocab-size", a.vocab_size, "--quiet"]
    for name in ["cold", "cache hit"]:
        secs, gb, out = run(args)
        print(f"{name:>9}: {secs:6.1f} s wall (process incl. imports), peak RSS {gb:.2f} GB")
    print(out.strip())
    tpw = float(re.search(r"tokens/word ([\d.]+)", out).group(1))
    print(f"tokens/word {tpw:.3f} ({'in' if 1.2 <= tpw <= 1.8 else 'OUTSIDE'} the 1.2-1.8 target); load: {os.getloadavg()}")
