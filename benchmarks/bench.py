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
