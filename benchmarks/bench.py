"""Shared by the benchmark scripts: where the repository and the imagenette copy are, and "run a script,
read its JSON summary" (optionally cached, so --reuse can skip finished runs)."""
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the 224-px imagenette copy beside the checkout (README: where it comes from, how to make one)
IMAGENETTE = os.path.join(ROOT, "..", "shared", "data", "imagenette2-224")


def cached(cmd, cache_dir, reuse):
    """(the cache file of a command under cache_dir or None, its stored summary when reuse finds one)."""
    if not cache_dir:
        return None, None
    cache = os.path.join(cache_dir, hashlib.sha1(json.dumps(cmd).encode()).hexdigest()[:12] + ".json")
    if reuse and os.path.isfile(cache):
        with open(cache) as f:
            return cache, json.load(f)
    return cache, None


def cuda_device(args):
    """The device of a model-only benchmark, with the training scripts' CUDA settings and precision."""
    import torch
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    return torch.device("cuda" if cuda else "cpu")


def run_summary(script, args, cache_dir=None, reuse=False, env=None):
    """`python script args` in the repository root -> its JSON summary (the last line it prints). With
    cache_dir the summary is stored under a hash of the command; with reuse a stored one is read back."""
    cmd = [script, *map(str, args)]
    cache, stored = cached(cmd, cache_dir, reuse)
    if stored:
        return stored
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        with open(cache, "w") as f:
            json.dump(summary, f)
    return summary


def read_log(out_dir):
    """The records of a run's log.jsonl (common.read_jsonl: a torn line is skipped and counted)."""
    sys.path.insert(0, ROOT)
    import common
    return common.read_jsonl(os.path.join(out_dir, "log.jsonl"))[0]


def add_data_flag(parser, default=IMAGENETTE,
                  what="the imagenette2-224 copy (ImageFolder with train/ and val/)"):
    parser.add_argument("--data", default=default, help=f"{what}; default: {default}")


def mean_sd(xs, digits=1):
    """"m ± sd" over seeds (sample sd, n - 1); a single value is printed alone; "-" if one is missing."""
    import statistics
    if any(x is None for x in xs):
        return "-"
    xs = [float(x) for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def resolved(diffs):
    """Whether per-seed paired differences show a difference at all: every seed has the same sign and the
    mean exceeds the spread (|mean| > sd). With fewer than 3 seeds nothing is resolved."""
    import statistics
    if len(diffs) < 3:
        return False
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return same_sign and abs(statistics.mean(diffs)) > statistics.stdev(diffs)


def gain(xs, ys, digits=1):
    """The per-seed difference xs - ys as "+m ± sd", followed by " (n.r.)" where it is not resolved."""
    if any(v is None for v in [*xs, *ys]):
        return "-"
    diffs = [x - y for x, y in zip(xs, ys)]
    text = mean_sd(diffs, digits)
    text = text if text.startswith("-") else "+" + text
    return text if resolved(diffs) else text + " (n.r.)"


def cpu_note():
    """How many cores and threads the runs of a CPU benchmark had (taskset and OMP_NUM_THREADS carry over)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS")
    per_process = f", {threads} thread(s) per process" if threads else ""
    return f"{cores} of {os.cpu_count()} CPU cores{per_process}"


def git_sha():
    """The short commit of the checkout the benchmark runs from (its tables name it)."""
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return p.stdout.strip() or "unknown"
