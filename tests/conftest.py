"""Shared test helpers: run a script as a user would (subprocess) and read its outputs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Test outputs live in RAM where the machine has a roomy /dev/shm: a tiny run still writes and fsyncs ~200 MB
# of checkpoints, and on a disk that is much of the suite's time. `tmp_path` below removes each passing test's
# outputs, so about 1 GB at most is in use at once; a smaller /dev/shm (Docker's default is 64 MB) is left
# alone. PYTEST_DEBUG_TEMPROOT is pytest's own knob for its temp root.
if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free >= 4 << 30:
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", "/dev/shm")
IMAGENETTE = os.path.join(ROOT, "..", "shared", "data", "imagenette2-224")

# the smallest settings that still exercise everything: 32-px synthetic images, tiny batches
TINY = ["--data", "synthetic", "--synthetic-size", "64", "--img-size", "32", "--batch-size", "8",
        "--workers", "0", "--log-every", "1", "--knn-every", "0", "--mlp-dim", "64"]
# DenseCL and DetCon need a spatial map: the small stem at 16 px gives 2x2 (enough for dense matches and
# masks) at a quarter of 32 px's cost; DenseCL's queue fits the tiny batch
EXTRA = {"densecl": ["--stem", "small", "--img-size", "16", "--queue-size", "64"],
         "detcon": ["--stem", "small", "--img-size", "16"]}


def tiny(method, out, *more):
    """The tiny run of `method` writing to `out`, with `more` flags."""
    return [*TINY, *EXTRA.get(method, []), "--output-dir", str(out), *more]


def run_script(script, *args, env=None, torchrun=0, check=True, timeout=600):
    """Run `python script args` (or torchrun with N CPU processes); returns CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
           os.path.join(ROOT, script)] if torchrun else [sys.executable, os.path.join(ROOT, script)]
    e = {**os.environ, "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"),
         **(env or {})}
    p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, env=e,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


# 16 images / batch 8 = 2 steps per epoch: a stop after step 1 is mid-epoch, and the resumed steps 2 and 3
# cross an epoch boundary
PREEMPT = ["--synthetic-size", "16", "--epochs", "3", "--max-steps", "3"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """method -> the losses of its uninterrupted PREEMPT run (run once; several tests compare with them)."""
    import importlib
    done = {}

    def losses_of(method):
        if method not in done:
            out = tmp_path_factory.mktemp(f"full_{method}")
            importlib.import_module(method).main(tiny(method, out, *PREEMPT))
            done[method] = losses(out)
            shutil.rmtree(out)
        return done[method]
    return losses_of


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return [r["loss"] for r in read_log(out_dir) if "loss" in r and r.get("event") != "summary"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.passed = report.passed  # read by tmp_path's teardown


@pytest.fixture
def tmp_path(tmp_path, request):
    """pytest's tmp_path, removed when the test passes (a failing test's outputs stay for a look)."""
    yield tmp_path
    if getattr(request.node, "passed", False):
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def imagenette():
    if not os.path.isdir(IMAGENETTE):
        pytest.skip("../shared/data/imagenette2-224 not present")
    return IMAGENETTE


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """results.json of tests/dist_harness.py run alone (key 1: in this process, which has imported everything
    already) and under a 2-process torchrun (key 2)."""
    import dist_harness
    one, two = tmp_path_factory.mktemp("world1"), tmp_path_factory.mktemp("world2")
    dist_harness.main(str(one))
    run_script("tests/dist_harness.py", str(two), torchrun=2)
    out = {world: json.load(open(d / "results.json")) for world, d in ((1, one), (2, two))}
    for d in (one, two):
        shutil.rmtree(d)  # the runs' checkpoints: only results.json is read
    return out
