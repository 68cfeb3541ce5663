"""Evidence at a real budget in one short GPU run: every method's accuracy against its cost on Imagenette, the
speed targets at ImageNet resolution and the dense miniature, within --budget seconds (default 540, compiles
included) on one H100/H200-class GPU; what does not fit is left to a rerun of the stages left.

  python benchmarks/gpu_suite.py --make-data          # here, once: resized JPEG copies -> data/gpu (< 55 MiB)
  python benchmarks/gpu_suite.py --out $OUT/suite     # on the GPU machine, with carry=["data/gpu"]
  python benchmarks/gpu_suite.py --report runs/gpu_suite   # a bundle -> benchmarks/results/gpu_*.md + plot
  python benchmarks/gpu_suite.py --dry-run --out /tmp/gs   # every stage on the CPU at tiny sizes (~30 s)
  python benchmarks/gpu_suite.py --stages speed --budget 300   # some stages (the budget split among them)
  cp -r FIRST $OUT/suite && python benchmarks/gpu_suite.py --out $OUT/suite --stages speed,dense --budget 260
      # the rerun: FIRST holds the first run's <stage>.json (the machine's $OUT starts empty); on the same
      # (still held) machine the finished runs under --work are reused as well

Stages, most valuable first. Each has a fixed share of the budget (SHARES) plus what earlier stages left,
never starts a run whose estimate no longer fits, gives every accuracy run --time-limit (a slower device
trains fewer epochs instead of cutting the suite off), writes <out>/<stage>.json atomically when done and
prints one status line. A rerun skips the stages that finished ok and reuses every finished run (run folders
under --work: /dev/shm/effssl_gpu_suite where RAM allows; checkpoints are deleted after each run).
  smoke     every training script for at most one epoch's steps, with and without --data-on-device, MoCo v3
            also under --compile, and the supervised baseline: losses finite, img/s (they set the epochs).
  accuracy  imagenette (5,000 / 1,000, stored at 160 px, 128-px crops), ResNet-18, batch 256,
            --data-on-device: every method, MoCo v2 (densecl --dense-weight 0) and supervised from scratch for
            the same epochs (as many as fit), kNN every few epochs; then linear probes, an equal-wall-clock
            MoCo v3 row and a second seed of the two closest rows as the budget allows.
  speed     MoCo v3 ResNet-50 at 224 px, in this order: the whole-script runs with --gpu-aug, with
            --data-on-device, DenseCL and MoCo v2 with --data-on-device, the PIL loader; model_cost.py
            (DenseCL against its MoCo v2 mode; the ResNet-18 step of the smoke runs) and kernels.py (the LARS
            step); last, as a slow compile can then cost only itself, the compiled model-only step and
            --gpu-aug --compile. A run stopped at the stage's deadline is reported "killed at the N-s limit".
  dense     benchmarks/dense.py at 64 px, as many epochs as fit (skipped when nothing is left).

--out holds <stage>.json, results.json (every stage, the kNN curves, meta: device, torch, commit, budget),
gpu_knn_time.png and suite.log: 7 files in one folder (the GPU machine returns at most 8). --report writes
benchmarks/results/gpu_{smoke,accuracy,time_to_target,throughput,dense}.md and gpu_knn_time.png
(--results-dir: elsewhere). On the GPU each training run has its own process (the short smoke runs and the
evaluations share one); --dry-run calls every script's main() in this process.
"""
import argparse
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "benchmarks")) if p not in sys.path]
import suite_jobs  # noqa: E402
from suite_jobs import write_json  # noqa: E402

STAGES = ("smoke", "accuracy", "speed", "dense")
# Shares of --budget: a stage's deadline is the sum of the shares up to it, so time a stage leaves passes on
# (a rerun splits the budget among the stages it runs). From the first run (one H200, 16 cores, --budget 480,
# commit 5225d39; results/gpu_*.md): smoke took 76 s (its eleven runs and their process; its compiled run
# did not fit), accuracy 246 s for 15 epochs (it takes as many epochs as its share holds), speed's
# model_cost.py and kernels.py 26 s and its compiled run was still compiling when killed after 91 s; dense
# got 0 s of the 34 its share held, and needs ~55 s before its first epoch (a process and six seg
# evaluations, dense_eval_s) plus ~3 s per epoch. At BUDGET = 540 s these shares give smoke 86 s (its 76 and
# a margin), accuracy 211 s and what smoke leaves (~11 epochs), speed 167 s (a process ~6 s, the five
# uncompiled whole-script runs at speed_s each and the 26 s of model costs) and dense 76 s (~7 epochs) with
# what speed leaves. The compiles (smoke's ResNet-18 one, speed's ResNet-50 pair: ~70 s and ~255 s by their
# estimates) run last in their stages and start only where the time left holds their estimate: on a fast
# device in the first run, else in the rerun.
SHARES = {"smoke": 0.16, "accuracy": 0.39, "speed": 0.31, "dense": 0.14}
# The default --budget: the device is lent for 900 s in all, start-up (~30 s) included. 540 s (and ~25 s of
# the suite's own start and its last stop's grace) leave ~300 s for a rerun of the stages left (--budget 260:
# the compiled pair, whose second run starts if the first compile took no more than its estimate), and keep
# the first run well inside the 600-s limit of one command.
BUDGET = 540
METHODS = ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")  # every training script
# accuracy rows: (name, script, its own flags); MoCo v2 is DenseCL's global loss alone
ROWS = [("mocov3", "mocov3.py", []), ("fast_moco", "fast_moco.py", []), ("densecl", "densecl.py", []),
        ("mocov2", "densecl.py", ["--dense-weight", "0"]), ("detcon", "detcon.py", []),
        ("rotation_aux", "rotation_aux.py", []), ("supervised", "eval_linear.py", [])]
SOURCE = os.path.join(ROOT, "..", "shared", "data", "imagenette2-224")  # SPEC section 10
DATA = os.path.join(ROOT, "data", "gpu")
MAIN_SHARE = 0.75  # of the accuracy budget for the equal-epoch rows; the rest: the equal-wall-clock row
TIME_SLACK = 1.3  # --time-limit over a run's planned training time: a guard against a slow device
WARMUP_SHARE = 0.1  # MoCo v3's warm-up, 10 of 100 epochs in the official recipe, kept as a share of the run
SAVE_MB_S = 1000  # checkpoint.pth written and fsynced once per accuracy run (--save-epochs): ~1 GB/s to RAM
# the compiled whole-script run after the compiled model-only step, in one process: the same graph again, so
# Inductor's FX-graph and AOTAutograd caches should hit while Dynamo still traces; assumed, not measured
WARM_COMPILE = 0.5
LIGHTLY = [("MoCo (v2-style, bank 4096)", 78.6, 87.4), ("SimCLR", 83.5, 88.9), ("BYOL", 70.5, 88.7),
           ("SwAV", 86.1, 90.2), ("VICReg", 76.3, 84.5)]  # SPEC section 11: kNN top-1 at 200 / 800 epochs


@dataclasses.dataclass
class Geometry:
    """The sizes and estimates of every stage: GPU (the real run) or DRY (the CPU, tiny)."""
    stem: str = "imagenet"
    img: int = 128
    store: int = 160  # lightly's Imagenette storage for 128-px crops
    batch: int = 256
    queue: int = 4096  # DenseCL: shorter than the 5,000 images (65,536 keys would hold each image ~13 times)
    smoke_steps: int = 30  # at most: a smoke run ends with its first epoch (its checkpoint is not timed)
    probe_epochs: int = 10  # linear probe: a few epochs of a frozen backbone
    knn_evals: int = 6  # kNN points per accuracy curve (each a pass over the 6,000 stored images)
    max_epochs: int = 0  # 0: as many as the budget gives
    loader_smoke: tuple = METHODS  # the scripts smoke-tested with the loader as well
    speed_densecl: bool = True  # stage speed also times DenseCL and MoCo v2 whole-script
    # stage speed: arch, crop, stored size, batch, steps; the last 20 steps are the sustained rate, after the
    # loader's prefetch buffer (workers x 4 batches, filled during the warm-up) has had time to drain
    speed: tuple = ("resnet50", 224, 224, 256, 100)
    links: int = 26  # the 224-px subset (1,000) listed 26 times: 101 steps of 256 per epoch, none ends inside
    dense: tuple = ("--img-size", "64", "--batch-size", "128")  # an 8x8 final grid (small stem)
    dense_images: int = 1280  # images per dense.py epoch: its --synthetic-size default
    train_extra: tuple = ()  # flags for every training script
    dry_extra: dict = dataclasses.field(default_factory=dict)  # per-script flags of the dry run
    run_s: float = 6.0  # estimate: one smoke run in a shared process (decode, build, steps, checkpoint)
    # estimate: a first torch.compile of the ResNet-18 128-px MoCo v3 step (smoke's), not measured yet (the
    # first run left it out); ResNet-18 has 2/5 of ResNet-50's layers, whose compile took more than 85 s
    compile_s: float = 60.0
    # estimate: a first torch.compile of the ResNet-50 224-px MoCo v3 step (speed's), with its 23 timed steps
    # (~4 s): in the first run (16 cores) the compiled job was still in Inductor's code generation when
    # killed 91 s after its start, ~85 s after its model and loader were up; a margin above that
    compile_speed_s: float = 150.0
    knn_s: float = 0.5  # estimate: one kNN evaluation (forward over 6,000 stored images, the vote)
    probe_s: float = 5.0  # estimate: one linear probe in a shared process (decode, epochs, evaluation)
    speed_s: float = 25.0  # estimate: one sustained ResNet-50 run in a shared process
    cost_s: float = 5.0  # estimate: model_cost.py at the accuracy geometry, kernels.py (H200: 2.1 s, 1.1 s)
    dense_eval_s: float = 8.0  # estimate: seg + seg-knn of one backbone


GPU = Geometry()
# the dry run: ResNet-18 at 16 px; DenseCL and DetCon with the small stem (a 2x2 final grid, their least)
SMALL = ["--stem", "small", "--img-size", "16", "--store-size", "20"]
DRY = Geometry(img=16, store=20, batch=8, queue=64, smoke_steps=2, probe_epochs=1, knn_evals=1, max_epochs=1,
               loader_smoke=("mocov3",), speed_densecl=False, speed=("resnet18", 16, 20, 8, 2), links=2,
               dense=("--img-size", "16", "--batch-size", "8", "--max-steps", "2", "--synthetic-size", "40"),
               dense_images=16,  # --max-steps 2 of batch 8
               train_extra=("--mlp-dim", "64"),
               dry_extra={"densecl.py": [*SMALL, "--shuffle-splits", "2"],
                          "detcon.py": [*SMALL, "--masks", "grid"]},
               run_s=2.0, compile_s=5.0, compile_speed_s=5.0, knn_s=0.2, probe_s=1.0, speed_s=2.0, cost_s=1.0,
               dense_eval_s=2.0)


# ---------------------------------------------------------------------------------------------- data

def make_data(dst=DATA, src=SOURCE, target_mib=52, per_class_224=100, val_224=20):
    """Resized copies for the GPU machine (which takes at most 64 MiB of working tree and carried folders):
    imagenette-160 = every train and val image at 160 px, JPEG at the highest quality whose estimated total
    fits target_mib; imagenette-224 = the first per_class_224 train / val_224 val images of each class,
    byte-for-byte. Written to dst.tmp, then moved to dst. Returns {folder: MiB}."""
    from multiprocessing import Pool
    files = sorted(glob.glob(os.path.join(src, "*", "*", "*.JPEG")))
    if not files:
        raise SystemExit(f"no images under {src} (SPEC section 10: ../shared/data/imagenette2-224)")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for f in first_per_class(files, {"train": per_class_224, "val": val_224}):
        os.makedirs(os.path.join(tmp, "imagenette-224", *f.split(os.sep)[-3:-1]), exist_ok=True)
        shutil.copyfile(f, os.path.join(tmp, "imagenette-224", *f.split(os.sep)[-3:]))
    budget = target_mib * 2**20 - folder_bytes(os.path.join(tmp, "imagenette-224"))
    quality = pick_quality(files[::20], len(files), budget)
    with Pool(os.cpu_count()) as pool:
        pool.starmap(resize_jpeg, [(f, os.path.join(tmp, "imagenette-160", *f.split(os.sep)[-3:]), 160,
                                    quality) for f in files])
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    sizes = {d: folder_bytes(os.path.join(dst, d)) / 2**20 for d in sorted(os.listdir(dst))}
    for d, mib in sizes.items():
        print(f"{os.path.join(dst, d)}: {count_images(os.path.join(dst, d))} images, {mib:.1f} MiB")
    print(f"total {sum(sizes.values()):.1f} MiB (160-px JPEG quality {quality}); carry=[\"data/gpu\"]")
    return sizes


def first_per_class(files, n):
    """The first n[split] files (sorted) of each class folder of each split."""
    out, seen = [], {}
    for f in files:
        split, cls = f.split(os.sep)[-3:-1]
        if seen.setdefault((split, cls), 0) < n.get(split, 0):
            seen[(split, cls)] += 1
            out.append(f)
    return out


def resize_jpeg(src, dst, size, quality):
    from PIL import Image
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    Image.open(src).convert("RGB").resize((size, size), Image.BICUBIC).save(dst, "JPEG", quality=quality)


def pick_quality(sample, n_files, budget_bytes, size=160, qualities=(90, 85, 80, 75, 70)):
    """The highest JPEG quality whose sample-mean file size x n_files fits the byte budget."""
    import io

    from PIL import Image
    for q in qualities:
        total = 0
        for f in sample:
            buf = io.BytesIO()
            Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC).save(buf, "JPEG", quality=q)
            total += buf.tell()
        if total / len(sample) * n_files <= budget_bytes:
            return q
    return qualities[-1]


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def count_images(path, split=None):
    root = os.path.join(path, split) if split else path
    return sum(len(fs) for _, _, fs in os.walk(root, followlinks=True))


def tiny_data(dst, per_class=1, px=20):
    """The dry run's ImageFolder: the synthetic scenes, `per_class` train and 1 val image per class."""
    import common
    if os.path.isdir(dst):
        return dst
    for split, n in (("train", per_class), ("val", 1)):
        ds = common.Synthetic(n * len(common.SHAPES), split)
        for i in range(len(ds)):
            img, label = ds[i]
            folder = os.path.join(dst + ".tmp", split, common.SHAPES[label])
            os.makedirs(folder, exist_ok=True)
            img.resize((px, px)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    os.replace(dst + ".tmp", dst)
    return dst


def linked(src, dst, copies):
    """An ImageFolder whose train split lists every train image of src `copies` times (symlinks)."""
    if os.path.isdir(dst):
        return dst
    shutil.rmtree(dst + ".tmp", ignore_errors=True)
    for cls in sorted(os.listdir(os.path.join(src, "train"))):
        os.makedirs(os.path.join(dst + ".tmp", "train", cls))
        for name in sorted(os.listdir(os.path.join(src, "train", cls))):
            for c in range(copies):
                os.symlink(os.path.abspath(os.path.join(src, "train", cls, name)),
                           os.path.join(dst + ".tmp", "train", cls, f"{c}_{name}"))
    os.replace(dst + ".tmp", dst)
    return dst


def work_dir(dry):
    """Run folders: in RAM where /dev/shm has room (every epoch's fsynced checkpoint is inside train_s)."""
    name = "effssl_gpu_suite" + ("_dry" if dry else "")
    roomy = os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free >= 8 << 30
    return os.path.join("/dev/shm" if roomy else tempfile.gettempdir(), name)


# ---------------------------------------------------------------------------------------------- running

@dataclasses.dataclass
class Ctx:
    dry: bool
    out: str
    work: str
    geo: Geometry
    budget: float
    t0: float
    data: dict
    workers: int
    stages: dict = dataclasses.field(default_factory=dict)  # stage -> its result (finished or loaded)
    overhead: float = 12.0  # seconds a training process spends outside training: measured by smoke
    meta: dict = dataclasses.field(default_factory=dict)

    def left(self, deadline):
        return deadline - time.monotonic()


def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def job(ctx, stage, name, script, argv, estimate_s, time_limit=None):
    """A job; the repository's scripts get their folder as --output-dir, and --time-limit when given."""
    d = os.path.join(ctx.work, stage, slug(name))
    argv = [str(a) for a in argv]
    if not script.startswith(("benchmarks/", "model_only")):
        argv += ["--output-dir", d]
    if time_limit is not None:
        argv += ["--time-limit", f"{max(time_limit, 1):.0f}"]
    return {"name": name, "script": script, "argv": argv, "dir": d, "estimate_s": round(estimate_s, 1)}


def run_key(j):
    """What identifies a run for reuse: the script and its flags, without --time-limit (set by the budget)."""
    argv = j["argv"]
    i = argv.index("--time-limit") if "--time-limit" in argv else len(argv)
    return [j["script"], *argv[:i], *argv[i + 2:]]


def execute(ctx, jobs, deadline, label, keep_backbone=False):
    """Run `jobs` in order (finished ones reused; a job is not started when its estimate no longer fits) ->
    {name: result}. Dry run: in this process. GPU: one child process for the lot, stopped (SIGTERM, then
    SIGKILL) at the deadline; what it finished is kept."""
    results, todo = {}, []
    for j in jobs:
        rec = os.path.join(j["dir"], "suite_run.json")
        old = json.load(open(rec)) if os.path.isfile(rec) else None
        if old and old["key"] == run_key(j) and old["result"]["ok"]:
            results[j["name"]] = {**old["result"], "reused": True}
        else:
            shutil.rmtree(j["dir"], ignore_errors=True)  # a fresh run: log.jsonl holds this run only
            todo.append(j)
    left, fresh = ctx.left(deadline), []
    if todo and all(j["estimate_s"] > left for j in todo):  # no process started for nothing
        fresh = [suite_jobs.not_started(j, left) for j in todo]
    elif todo:
        until = time.time() + left
        fresh = suite_jobs.run_jobs(todo, until) if ctx.dry else launch(ctx, todo, until, label)
    for j, r in zip(todo, fresh):
        results[j["name"]] = r
        ck = os.path.join(j["dir"], "checkpoint.pth")
        if os.path.isfile(ck):
            r["checkpoint_mb"] = round(os.path.getsize(ck) / 2**20, 1)
        for name in ("checkpoint.pth",) + (() if keep_backbone else ("backbone.pth",)):
            if os.path.isfile(os.path.join(j["dir"], name)):
                os.remove(os.path.join(j["dir"], name))  # read here: log.jsonl (probes: backbone.pth)
        if r["ok"]:
            r["last_img_per_s"] = last_rate(j["dir"])
            write_json(os.path.join(j["dir"], "suite_run.json"), {"key": run_key(j), "result": r})
    return {j["name"]: results[j["name"]] for j in jobs}


def launch(ctx, jobs, until, label):
    """The jobs in one child process (benchmarks/suite_jobs.py) -> their results in order; `until`: unix time.
    The child's own start-up and exit (interpreter, imports, CUDA) go to `process_s` of the first result."""
    base = os.path.join(ctx.work, "jobs", slug(label))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    write_json(base + ".jobs.json", {"deadline": until, "jobs": jobs})
    if os.path.exists(base + ".results.json"):
        os.remove(base + ".results.json")
    t, stopped = time.monotonic(), None
    with open(base + ".log", "w") as log:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "suite_jobs.py"),
                              base + ".jobs.json", base + ".results.json"], cwd=ROOT, stdout=log, stderr=log,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            p.wait(timeout=max(1.0, until - time.time()))
        except subprocess.TimeoutExpired:
            stopped = time.time()
            os.killpg(p.pid, signal.SIGTERM)  # a training script finishes its step, checkpoints and exits
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    path = base + ".results.json"
    done = json.load(open(path)) if os.path.isfile(path) else []
    why = f"the child process ended (exit {p.returncode}): {suite_jobs.tail(base + '.log', 1500)}"
    res = settle(jobs, done, until, stopped, why)
    if res:
        res[0]["process_s"] = round(time.monotonic() - t - sum(r["wall_s"] for r in res), 2)
    return res


def settle(jobs, done, until, stopped, why):
    """Every job's result from those the child wrote (`done`, in order; its last entry {name, running,
    started} when a job was under way). stopped: when (unix time) the child was stopped at its deadline
    `until`, None when it ended by itself (`why` says how). A job under way at the stop, or failing after it,
    was killed at its limit (until - its start): skipped, as a rerun tries it again; one the child never
    reached was not started (skipped after a stop; failed after a crash)."""
    out = []
    for j, r in zip(jobs, done):
        if r.get("running"):
            end = stopped or time.time()
            r = {"name": j["name"], "ok": False, "skipped": False, "summary": None, "started": r["started"],
                 "ended": end, "wall_s": max(end - r["started"], 0.0), "error": "under way when the child "
                 "process ended" + ("" if stopped else f"; {why}")}
        if stopped and not r["ok"] and r.get("started") is not None and r["ended"] >= stopped:
            limit = max(until - r["started"], 0.0)
            r.update(skipped=True, killed_at_s=round(limit),
                     error=f"killed at the {limit:.0f}-s limit (the stage's deadline): {r['error']}")
        out.append(r)
    gone = ("not started: the child process was stopped at the stage's deadline" if stopped
            else f"not started: {why}")
    return out + [{"name": j["name"], "ok": False, "skipped": bool(stopped), "summary": None, "error": gone,
                   "wall_s": 0.0} for j in jobs[len(done):]]


def log_records(run_dir):
    """The records of a run's log.jsonl (a torn last line skipped), [] without one."""
    import common
    path = os.path.join(run_dir, "log.jsonl")
    return common.read_jsonl(path)[0] if os.path.isfile(path) else []


def curve(run_dir):
    """[[epoch, train_s, kNN top-1]] of a run's kNN evaluations."""
    return [[r["epoch"], round(r["train_s"], 2), r["knn_top1"]] for r in log_records(run_dir)
            if "knn_top1" in r and "train_s" in r and r.get("event") != "summary"]


def last_rate(run_dir):
    """img/s of the last logged interval (the steps since the previous log line), None without one."""
    steps = [r for r in log_records(run_dir) if "img_per_s" in r and r.get("event") != "summary"]
    return steps[-1]["img_per_s"] if len(steps) > 1 else None  # the first interval holds the warm-up


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_row(r):
    """The numbers the tables read from one result."""
    s = r.get("summary") or {}
    keys = ("img_per_s", "step_ms", "data_time_frac", "loss", "knn_top1", "epochs", "train_s", "top1",
            "steps", "peak_mem_mb")
    row = {"ok": r["ok"], "skipped": r.get("skipped", False), "wall_s": round(r.get("wall_s", 0.0), 2),
           "last_img_per_s": r.get("last_img_per_s"), "checkpoint_mb": r.get("checkpoint_mb"),
           **{k: s.get(k) for k in keys}}
    if not r["ok"]:
        row["error"] = r.get("error")
    if r.get("killed_at_s") is not None:
        row["killed_at_s"] = r["killed_at_s"]
    return row


def killed_at(r):
    """The limit (s) a run was killed at, None if it was not. Bundles written before killed_at_s existed
    marked a killed run as not started, but it had run: its wall_s, the seconds it had."""
    if r.get("killed_at_s") is not None:
        return r["killed_at_s"]
    return round(r["wall_s"]) if not r.get("ok") and r.get("skipped") and (r.get("wall_s") or 0) > 0 else None


def outcome(runs):
    """A stage's status from its runs: failed if any failed, partial if some were stopped by the budget (not
    started or killed at the deadline: a rerun tries them again), else ok."""
    if any(not r["ok"] and not r["skipped"] for r in runs.values()):
        return "failed"
    return "partial" if any(r["skipped"] for r in runs.values()) or not runs else "ok"


def problems(runs):
    """The headline's tail: the runs failed, killed at their limit, not started."""
    failed = [n for n, r in runs.items() if not r["ok"] and not r["skipped"]]
    killed = [f"{n} killed at the {killed_at(r)}-s limit" for n, r in runs.items()
              if r["skipped"] and killed_at(r) is not None]
    skipped = [n for n, r in runs.items() if r["skipped"] and killed_at(r) is None]
    return ((f"; failed: {', '.join(failed)}" if failed else "") + "".join(f"; {k}" for k in killed)
            + (f"; not started (budget): {', '.join(skipped)}" if skipped else ""))


# ---------------------------------------------------------------------------------------------- flags

def train_flags(ctx, script, data, dod=True, seed=0, geometry=None):
    """The shared flags of a training (or eval_linear) run at the accuracy geometry, or at `geometry` =
    (arch, crop, stored size, batch)."""
    g = ctx.geo
    arch, img, store, batch = geometry or ("resnet18", g.img, g.store, g.batch)
    flags = ["--data", data, "--arch", arch, "--stem", g.stem, "--img-size", img, "--batch-size", batch,
             "--workers", ctx.workers, "--channels-last", "--seed", seed]
    flags += ["--data-on-device", "--store-size", store] if dod else []
    if script == "eval_linear.py":
        return flags
    return flags + ["--preset", "imagenet", *g.train_extra, *g.dry_extra.get(script, [])]


def row_flags(ctx, name, script, extra, epochs):
    """Each row's own flags over its `imagenet` preset: what a 5,000-image run of tens of epochs changes."""
    if name == "supervised":
        return ["--mode", "finetune", "--pretrained", "none", "--epochs", epochs]
    flags = ["--epochs", epochs, "--save-epochs", epochs, *extra]  # short epochs: one checkpoint, at the end
    if script in ("mocov3.py", "rotation_aux.py"):
        flags += ["--warmup-epochs", f"{WARMUP_SHARE * epochs:g}"]
    if script == "densecl.py":  # MoCo v2's 65,536-key queue and m 0.999 are for 1.28 M images and 200 epochs
        flags += ["--queue-size", ctx.geo.queue, "--momentum", "0.99"]
    return flags


def without(flags, names):
    """The flags without `names` and their values."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


def flags_text(argv):
    """A run's flags as a caption shows them: without paths and plumbing."""
    hidden = ("--data", "--output-dir", "--workers", "--log-every", "--pretrained", "--time-limit", "--runs",
              "--out", "--seed")
    return " ".join(f for f in without(argv, hidden) if f not in ("--channels-last", "--reuse"))


# ---------------------------------------------------------------------------------------------- stages

def stage_smoke(ctx, deadline):
    """Every script for one epoch's steps at most, with and without --data-on-device; MoCo v3 compiled."""
    g, data = ctx.geo, ctx.data["acc"]
    n_train = count_images(data, "train")
    # the run ends with (or within) its first epoch: the epoch-end checkpoint falls outside the timed steps
    steps = max(1, min(g.smoke_steps, n_train // g.batch))
    short = ["--max-steps", steps, "--log-every", "10"]

    def smoke(label, name, script, extra, dod=True, more=()):
        no_knn = [] if script == "eval_linear.py" else ["--knn-every", "0"]  # eval_linear has no monitor
        flags = train_flags(ctx, script, data, dod) + row_flags(ctx, name, script, extra, 100) + short
        flags += no_knn
        return job(ctx, "smoke", label, script, flags + list(more), g.run_s)

    scripts = [r for r in ROWS if r[0] != "mocov2"]  # DenseCL's script: its --dense-weight 0 mode costs less
    jobs = [smoke(r[0], *r) for r in scripts]  # --data-on-device first: they calibrate the accuracy stage
    jobs += [smoke(f"{r[0]} (loader)", *r, dod=False) for r in scripts if r[0] in g.loader_smoke]
    jobs[0]["estimate_s"] += ctx.overhead  # the child process's start-up
    res = execute(ctx, jobs, deadline, "smoke")
    process = max([r.get("process_s") or 0 for r in res.values()] + [0])  # interpreter, imports, CUDA
    compiled = smoke("mocov3 --compile", *ROWS[0], more=[] if ctx.dry else ["--compile"])  # dry run: eager
    compiled["estimate_s"] = ctx.overhead + g.compile_s
    res.update(execute(ctx, [compiled], deadline, "smoke compile"))
    runs = {n: {**run_row(r), "finite": finite((r.get("summary") or {}).get("loss"))} for n, r in res.items()}
    fresh = [n for n, r in res.items() if r["ok"] and not r.get("reused") and n != compiled["name"]]
    outside = sorted(runs[n]["wall_s"] - (runs[n]["train_s"] or 0) for n in fresh)
    if outside:  # a training process's seconds outside training: start-up, decode, build, checkpoint
        ctx.overhead = process + outside[len(outside) // 2]
    for r in runs.values():
        if r["ok"] and not r["finite"]:
            r["ok"], r["error"] = False, "loss not finite"
    m = runs.get("mocov3", {})
    head = (f"mocov3 {fmt(m.get('img_per_s'), '.0f')} img/s with --data-on-device; "
            f"{sum(r['ok'] for r in runs.values())}/{len(runs)} runs ok, losses finite" + problems(runs))
    return {"status": outcome(runs), "headline": head, "runs": runs, "overhead_s": round(ctx.overhead, 2),
            "steps": steps, "data": os.path.basename(data), "n_train": n_train,
            "n_val": count_images(data, "val"), "geometry": accuracy_geometry(g)}


def accuracy_geometry(g):
    return {"arch": "resnet18", "stem": g.stem, "img": g.img, "store": g.store, "batch": g.batch}


def smoke_rate(run, batch):
    """img/s of a smoke run: its summary's (after the warm-up steps), else steps x batch / train_s (warm-up
    included: a run no longer than the warm-up has no other), None without a finished run."""
    if not run.get("ok"):
        return None
    if finite(run.get("img_per_s")):
        return run["img_per_s"]
    if finite(run.get("steps")) and finite(run.get("train_s")):
        return run["steps"] * batch / run["train_s"]
    return None


def epochs_for(budget_s, epoch_s, per_run_s, lo=1, hi=0):
    """Equal epochs E for every row: floor((budget - rows x per-run cost) / sum of the rows' seconds per
    epoch), within [lo, hi] (hi 0: no cap)."""
    spare = budget_s - per_run_s * len(epoch_s)
    e = int(spare // sum(epoch_s.values())) if spare > 0 and epoch_s else 0
    return max(lo, min(e, hi) if hi else e)


def closest_pair(knn):
    """The two names whose values are closest ({name: kNN top-1}); None with fewer than two."""
    names = sorted(knn, key=knn.get)
    pairs = [(knn[b] - knn[a], a, b) for a, b in zip(names, names[1:])]
    return min(pairs)[1:] if pairs else None


def stage_accuracy(ctx, deadline):
    """Every row for the same epochs, then the probes, the equal-wall-clock row and the second seeds."""
    g, data = ctx.geo, ctx.data["acc"]
    smoke = ctx.stages.get("smoke", {}).get("runs", {})
    n_train = count_images(data, "train")
    source = {n: smoke.get("densecl" if n == "mocov2" else n) or {} for n, _, _ in ROWS}
    img_s = {n: smoke_rate(source[n], g.batch) for n in source}
    rows = [r for r in ROWS if img_s[r[0]]]  # a row whose script has no smoke measurement is not planned
    # seconds per epoch: the steps at the smoke run's rate (one checkpoint per run: --save-epochs)
    epoch_s = {n: n_train / img_s[n] for n, _, _ in rows}
    ck_s = max([(source[n].get("checkpoint_mb") or 0) / SAVE_MB_S for n, _, _ in rows] + [0])
    per_run = ctx.overhead + ck_s + (g.knn_evals + 1) * g.knn_s
    n_ssl = len([r for r in rows if r[0] != "supervised"])
    budget = MAIN_SHARE * ctx.left(deadline) - (ctx.overhead + (n_ssl + 1) * g.probe_s)
    # a rerun keeps the first attempt's epochs, so its finished runs are reused
    epochs = ((ctx.stages.get("accuracy") or {}).get("epochs")
              or epochs_for(budget, epoch_s, per_run, hi=g.max_epochs))
    knn_every = max(1, epochs // g.knn_evals)
    table = {n: {"ok": False, "skipped": True, "method": n, "seed": 0, "error": "no smoke measurement (its "
                 "smoke run failed or did not run)"} for n, _, _ in ROWS if not img_s[n]}

    def train(name, script, extra, e, seed=0, limit=None):
        label = name + (f" {e}ep" if e != epochs else "") + (f" seed {seed}" if seed else "")
        planned = e * epoch_s[name]
        flags = train_flags(ctx, script, data, seed=seed) + row_flags(ctx, name, script, extra, e)
        flags += [] if name == "supervised" else ["--knn-every", knn_every, "--log-every", 50]
        j = job(ctx, "accuracy", label, script, flags, per_run + planned, limit or TIME_SLACK * planned + 5)
        r = execute(ctx, [j], deadline, f"accuracy {label}", keep_backbone=True)[label]
        points = curve(j["dir"])
        table[label] = {**run_row(r), "method": name, "seed": seed, "flags": flags_text(j["argv"]),
                        "curve": points, "dir": j["dir"]}
        return table[label]

    for name, script, extra in rows:
        train(name, script, extra, epochs)
    # random init's kNN and linear probes of the finished SSL rows, in one process
    ssl = {n: t for n, t in table.items() if t["ok"] and t["method"] != "supervised"}
    evals = [job(ctx, "accuracy", "random init", "eval_linear.py", ["--mode", "knn", "--pretrained", "none"]
                 + train_flags(ctx, "eval_linear.py", data), ctx.overhead + g.probe_s)]
    evals += [job(ctx, "accuracy", f"{n} linear", "eval_linear.py",
                  ["--mode", "linear", "--pretrained", os.path.join(t["dir"], "backbone.pth"), "--epochs",
                   g.probe_epochs, "--log-every", 50]
                  + without(train_flags(ctx, "eval_linear.py", data), ("--arch", "--stem", "--img-size")),
                  g.probe_s, 4 * g.probe_s) for n, t in ssl.items()]
    probes = execute(ctx, evals, deadline, "accuracy evals")
    for name, r in probes.items():
        top1 = (r.get("summary") or {}).get("top1")
        if name == "random init":
            table[name] = {**run_row(r), "method": name, "knn_top1": top1}
        else:
            row = table[name[:-len(" linear")]]
            row["linear"] = top1
            row["linear_error"] = None if r["ok"] else r.get("error")
    # equal wall-clock: MoCo v3 given the slowest SSL row's training time, its own full schedule
    knn = {n: t["knn_top1"] for n, t in ssl.items() if finite(t.get("knn_top1"))}
    if "mocov3" in ssl and finite(ssl["mocov3"]["train_s"]) and ssl["mocov3"]["train_s"] > 0:
        slowest = max(t["train_s"] or 0 for t in ssl.values())
        e_eq = int(epochs * slowest / ssl["mocov3"]["train_s"])
        if e_eq > epochs:
            train("mocov3", "mocov3.py", [], e_eq, limit=TIME_SLACK * slowest)["equal_wall_clock"] = True
    # a second seed of the two rows closest in final kNN
    pair = closest_pair(knn)
    for name in pair or ():
        script, extra = next((s, x) for n, s, x in ROWS if n == name)
        ssl[name]["seed1_knn"] = train(name, script, extra, epochs, seed=1)["knn_top1"]
    order = [n for n, _, _ in ROWS] + ["random init"]
    table = dict(sorted(table.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    result = {"epochs": epochs, "knn_every": knn_every, "n_train": n_train,
              "n_val": count_images(data, "val"),
              "probe_epochs": g.probe_epochs, "epoch_s": {k: round(v, 3) for k, v in epoch_s.items()},
              "rows": table, "seed_pair": list(pair) if pair else None, "data": os.path.basename(data),
              "geometry": accuracy_geometry(g)}
    write_plot(result, os.path.join(ctx.out, "gpu_knn_time.png"), ctx.meta)
    best = max(knn, key=knn.get) if knn else None
    runs = {**table, **{n: run_row(r) for n, r in probes.items()}}
    head = (f"{epochs} epochs each" + (f"; best final kNN {best} {knn[best]:.1f}" if best else "")
            + problems(runs))
    return {"status": outcome(runs), "headline": head, **result}


def speed_jobs(ctx):
    """Stage speed's jobs as [(label, jobs)], one child process each, in the order they run: the uncompiled
    whole-script runs (the sustained rates, DenseCL against MoCo v2), the model costs, then the compiled pair,
    so that a slow compile stopped at the deadline costs only itself."""
    g = ctx.geo
    arch, img, store, batch, steps = g.speed
    geometry = (arch, img, store, batch)
    many = ctx.data["speed_links"]
    short = ["--max-steps", steps, "--knn-every", "0", "--log-every", min(20, steps)]
    shape = ["--preset", "imagenet", "--arch", arch, "--stem", g.stem, "--img-size", img,
             "--batch-size", batch, "--channels-last", *g.train_extra]
    r18 = ["--preset", "imagenet", "--arch", "resnet18", "--stem", g.stem, "--img-size", g.img,
           "--batch-size", g.batch, "--channels-last", *g.train_extra]
    reps = ["--reps", "1" if ctx.dry else "20"]
    md = lambda name: os.path.join(ctx.work, "speed", name)  # noqa: E731

    def script(name, file, extra, dod=False, estimate=g.speed_s):
        flags = train_flags(ctx, file, many, dod, geometry=geometry) + short + extra
        return job(ctx, "speed", name, file, flags, estimate)

    whole = [script("mocov3 --gpu-aug", "mocov3.py", ["--gpu-aug"]),
             script("mocov3 --data-on-device", "mocov3.py", [], dod=True)]
    if g.speed_densecl:
        whole += [script("densecl --data-on-device", "densecl.py", [], dod=True),
                  script("mocov2 --data-on-device", "densecl.py", ["--dense-weight", "0"], dod=True)]
    whole.append(script("mocov3 PIL loader", "mocov3.py", []))
    costs = [job(ctx, "speed", "model_cost speed", "benchmarks/model_cost.py",
                 ["--methods", "mocov3,densecl", *shape, *reps, "--out", md("mc_speed.md")], g.speed_s),
             job(ctx, "speed", "model_cost accuracy", "benchmarks/model_cost.py",
                 ["--methods", "mocov3", *r18, *reps, "--out", md("mc_accuracy.md")], g.cost_s)]
    if not ctx.dry:  # kernels.py times ResNet-18/50-size LARS steps and the dense loss: ~1 min on a CPU
        costs.append(job(ctx, "speed", "kernels", "benchmarks/kernels.py",
                         ["--reps", "20", "--out", md("kernels.md")], g.cost_s))
    compile_ = [] if ctx.dry else ["--compile"]
    # the model-only step first: no loader to start, its compile_s measured alone, and the whole-script run
    # after it finds the compiled graph in the caches (WARM_COMPILE)
    pair = [job(ctx, "speed", "model-only --compile", "model_only", [*shape, *compile_, *reps],
                g.compile_speed_s),
            script("mocov3 --gpu-aug --compile", "mocov3.py", ["--gpu-aug", *compile_],
                   estimate=WARM_COMPILE * g.compile_speed_s + g.speed_s)]
    groups = [("uncompiled", whole + costs), ("compiled", pair)]
    for _, jobs in groups:
        jobs[0]["estimate_s"] = round(jobs[0]["estimate_s"] + ctx.overhead, 1)  # the child process's start-up
    return groups


def stage_speed(ctx, deadline):
    """MoCo v3 ResNet-50 at 224 px: the loaders, DenseCL whole-script, model-only costs, the compiled pair."""
    g = ctx.geo
    arch, img, store, batch, steps = g.speed
    res = {}
    for label, jobs in speed_jobs(ctx):
        res.update(execute(ctx, jobs, deadline, f"speed {label}"))
    runs = {n: run_row(r) for n, r in res.items()}
    for n, r in res.items():
        s = r.get("summary") or {}
        if n.startswith("model_cost"):
            runs[n].update(step_ms=s.get("step_ms"), ratio=s.get("ratio"))
        elif n == "kernels":
            runs[n]["lars"] = s.get("lars")
        elif n.startswith("model-only"):
            runs[n].update(img_per_s=s.get("img_per_s"), compile_s=s.get("compile_s"))
    sustained = {n: fmt(runs.get(f"mocov3 {n}", {}).get("last_img_per_s"), ".0f")
                 for n in ("--gpu-aug", "--gpu-aug --compile")}
    head = (f"{arch} {img} px sustained img/s: --gpu-aug {sustained['--gpu-aug']}, compiled "
            f"{sustained['--gpu-aug --compile']}" + problems(runs))
    return {"status": outcome(runs), "headline": head, "runs": runs,
            "geometry": {"arch": arch, "img": img, "store": store, "batch": batch, "steps": steps},
            "links": g.links, "n_speed_train": count_images(ctx.data["speed"], "train"),
            "n_links_train": count_images(ctx.data["speed_links"], "train")}


def dense_plan(ctx, left):
    """(methods, seconds before the first epoch, epochs) of stage dense with `left` seconds: as many epochs
    as fit at the smoke stage's MoCo v3 rate (0: none fits); a rerun keeps the first attempt's epochs."""
    g = ctx.geo
    smoke = ctx.stages.get("smoke", {}).get("runs", {}).get("mocov3", {})
    methods = ["mocov3"] if ctx.dry else ["mocov3", "densecl", "mocov2", "detcon"]  # the dense claims' rows
    # the small stem at 64 px has 4x the feature-map pixels of the imagenet stem at 128 px (smoke's runs)
    img_s = (smoke_rate(smoke, g.batch) or 1000.0) / 4
    fixed = ctx.overhead + (len(methods) + 2) * g.dense_eval_s  # + random init's and equal wall-clock's evals
    epochs = (ctx.stages.get("dense") or {}).get("epochs") or epochs_for(
        left - fixed, {m: g.dense_images / img_s for m in methods}, 0, lo=0, hi=g.max_epochs or 50)
    return methods, fixed, epochs


def stage_dense(ctx, deadline):
    """benchmarks/dense.py, as many epochs as fit (none: skipped)."""
    g = ctx.geo
    methods, fixed, epochs = dense_plan(ctx, ctx.left(deadline))
    if epochs < 1:
        return {"status": "skipped", "headline": f"no budget left ({ctx.left(deadline):.0f} s)", "epochs": 0}
    # one seed: the stage's share of the budget holds one pass of the rows (its differences are all n.r.)
    argv = ["--methods", ",".join(methods), "--seeds", "0", "--stem", "small", *g.dense, "--epochs", epochs,
            "--workers",
            ctx.workers, "--reuse", "--runs", os.path.join(ctx.work, "dense", "runs"), "--out",
            os.path.join(ctx.work, "dense", "dense")]
    j = job(ctx, "dense", "dense.py", "benchmarks/dense.py", argv, fixed)
    r = execute(ctx, [j], deadline, "dense")["dense.py"]
    for ck in glob.glob(os.path.join(ctx.work, "dense", "runs", "s*", "*", "checkpoint.pth")):
        os.remove(ck)  # dense.py's --reuse reads backbone.pth
    runs = {"dense.py": run_row(r)}
    return {"status": outcome(runs), "headline": f"{epochs} epochs, {len(methods)} methods" + problems(runs),
            "epochs": epochs, "methods": methods, "table": (r.get("summary") or {}).get("table", ""),
            "error": r.get("error"), "command": "python benchmarks/dense.py " + flags_text(j["argv"])}


# ---------------------------------------------------------------------------------------------- the suite

def device_meta(ctx, commit):
    import torch
    import torchvision

    from throughput import device_name
    return {"device": device_name(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit,
            "budget_s": ctx.budget, "shares": SHARES, "dry_run": ctx.dry, "workers": ctx.workers,
            "precision": "bf16" if torch.cuda.is_available() else "fp32", "work": ctx.work,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:])}


def git_commit():
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                           timeout=5)
        return p.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def status_line(ctx, stage, result):
    line = (f"[gpu_suite] {stage:9s} {result['status']:8s} {result.get('seconds', 0):6.0f} s  "
            f"{result['headline']}")
    print(line, flush=True)
    with open(os.path.join(ctx.out, "suite.log"), "a") as f:
        f.write(line + "\n")


def save_bundle(ctx):
    write_json(os.path.join(ctx.out, "results.json"), {"meta": ctx.meta, "stages": ctx.stages})


def run_suite(a):
    import common
    import torch
    geo = DRY if a.dry_run else GPU
    work = a.work or work_dir(a.dry_run)
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = 0 if a.dry_run else max(1, cores - 1)  # every core but the one driving the device
    ctx = Ctx(a.dry_run, a.out, work, geo, a.budget, time.monotonic(), {}, workers)
    if a.dry_run:
        acc = speed = tiny_data(os.path.join(work, "tiny"))
    else:
        acc, speed = os.path.join(DATA, "imagenette-160"), os.path.join(DATA, "imagenette-224")
        for d in (acc, speed):
            if not os.path.isdir(os.path.join(d, "train")):
                raise SystemExit(f"{d} missing: run `python benchmarks/gpu_suite.py --make-data` here first, "
                                 f"and carry data/gpu")
    ctx.data = {"acc": acc, "speed": speed,
                "speed_links": linked(speed, os.path.join(work, f"{os.path.basename(speed)}x{geo.links}"),
                                      geo.links)}
    for stage in STAGES:
        path = os.path.join(a.out, f"{stage}.json")
        if os.path.isfile(path):
            ctx.stages[stage] = json.load(open(path))
    ctx.overhead = ctx.stages.get("smoke", {}).get("overhead_s", ctx.overhead)
    plot_curves, threads = common.plot_curves, torch.get_num_threads()
    if a.dry_run:
        common.plot_curves = lambda *args, **kwargs: None  # the runs' curves.png (~0.3 s each): not read here
        # one thread: tiny steps gain nothing from two, and on a busy machine OpenMP threads wait on each
        # other
        torch.set_num_threads(1)
    ctx.meta = device_meta(ctx, a.commit or git_commit())
    try:
        run_stages(ctx, a)
    finally:
        common.plot_curves = plot_curves
        torch.set_num_threads(threads)
    save_bundle(ctx)
    print(f"[gpu_suite] {time.monotonic() - ctx.t0:.0f} s in all; bundle "
          f"{os.path.join(a.out, 'results.json')}", flush=True)
    return ctx


def stage_deadlines(budget, stages, t0=0.0):
    """{stage: its deadline}: t0 + the budget split among `stages` (those to run) by SHARES, in order."""
    total, deadline, out = sum(SHARES[s] for s in stages), t0, {}
    for stage in stages:
        deadline += budget * SHARES[stage] / total
        out[stage] = deadline
    return out


def run_stages(ctx, a):
    wanted = [s for s in STAGES if s in a.stages.split(",")]
    done = [s for s in wanted if (ctx.stages.get(s) or {}).get("status") == "ok" and not a.force]
    # the budget goes to the stages that run: a rerun skips those finished ok, and spends nothing on them
    deadlines = stage_deadlines(a.budget, [s for s in wanted if s not in done], ctx.t0)
    for stage in wanted:
        if stage in done:
            status_line(ctx, stage, {**ctx.stages[stage], "status": "done", "seconds": 0})
            continue
        deadline = deadlines[stage]
        t = time.monotonic()
        result = globals()[f"stage_{stage}"](ctx, deadline)
        result["seconds"] = round(time.monotonic() - t, 1)
        ctx.stages[stage] = result
        write_json(os.path.join(a.out, f"{stage}.json"), result)
        save_bundle(ctx)
        status_line(ctx, stage, result)


# ---------------------------------------------------------------------------------------------- report

def write_plot(acc, path, meta):
    """kNN top-1 against training seconds for every accuracy run (supervised: its final top-1, one marker)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    g = acc.get("geometry", {})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in acc.get("rows", {}).items():
        c = r.get("curve") or []
        if c:
            ax.plot([p[1] for p in c], [p[2] for p in c], marker="o", ms=3, label=name,
                    ls="--" if r.get("seed") or r.get("equal_wall_clock") else "-")
        elif r.get("method") == "supervised" and finite(r.get("top1")) and finite(r.get("train_s")):
            ax.plot([r["train_s"]], [r["top1"]], marker="*", ms=12, ls="none", color="black",
                    label="supervised (fine-tune top-1)")
        elif name == "random init" and finite(r.get("knn_top1")):
            ax.axhline(r["knn_top1"], color="gray", ls=":", label="random init")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"{acc.get('data')}, {g.get('arch')} {g.get('img')} px, {acc.get('epochs')} epochs each; "
                 f"{meta.get('device')}, commit {meta.get('commit')}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def fmt(v, spec=".1f"):
    return format(v, spec) if finite(v) else "-"


def percent(v):
    return fmt(100 * v, ".0f") + "%" if finite(v) else "-"


def state(r):
    if r.get("ok"):
        return "yes"
    if killed_at(r) is not None:
        return f"killed at the {killed_at(r)}-s limit"
    return "not started" if r.get("skipped") else "failed"


def why_not(r):
    """A run's state, and the last line of its error where that says more."""
    what, error = state(r), short_error(r.get("error"))
    return what if not error or error.startswith(what) else f"{what}: {error}"


def short_error(error):
    """The last line of an error, shortened for a table cell."""
    lines = (error or "").strip().splitlines()
    return lines[-1].replace("|", "/")[:120] if lines else ""


def caption(meta, what):
    return (f"Device: {meta['device']} (torch {meta['torch']}, {meta['cpus']} CPU cores). Generated by "
            f"`{meta['command']}` at commit {meta['commit']}, {meta['started']}, budget "
            f"{meta['budget_s']:.0f} s for the whole suite"
            f"{' (DRY RUN: CPU, tiny sizes)' if meta.get('dry_run') else ''}. {what}")


def geometry_text(st, meta):
    g = st.get("geometry", {})
    return (f"{st.get('data')} ({st.get('n_train')} train / {st.get('n_val')} val images, stored at "
            f"{g.get('store')} px, {g.get('img')}-px crops), {g.get('arch')} ({g.get('stem')} stem), batch "
            f"{g.get('batch')}, {meta.get('precision')}, channels-last, one process")


def smoke_table(meta, st):
    lines = [caption(meta, (
        f"Smoke: every script for {st.get('steps')} steps (at most one epoch: the epoch-end checkpoint is "
        f"not timed) at the accuracy geometry ({geometry_text(st, meta)}), with --data-on-device and with "
        f"the loader (PIL, {meta.get('workers')} workers; such short runs are served from its prefetch "
        "buffer), and MoCo v3 with --compile. img/s counts source images after 2 warm-up steps; the "
        "--data-on-device rows set the accuracy stage's epochs.")), "",
        "| run | ok | loss | img/s | step ms | data wait | peak MB |", "|---|---|---|---|---|---|---|"]
    for name, r in st.get("runs", {}).items():
        lines.append(f"| {name} | {state(r)} | {fmt(r.get('loss'), '.3f')} | "
                     f"{fmt(r.get('img_per_s'), '.0f')} | {fmt(r.get('step_ms'))} | "
                     f"{percent(r.get('data_time_frac'))} | "
                     f"{fmt(r.get('peak_mem_mb'), '.0f')} |")
    return lines


def flag_pairs(argv):
    """[(flag, value or None)]: a flag followed by its value, or a switch."""
    out, i = [], 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        out.append((argv[i], value))
        i += 2 if value is not None else 1
    return out


def show(pairs):
    return " ".join(k if v is None else f"{k} {v}" for k, v in pairs)


def own_flags(rows):
    """({name: its flags beyond the common ones}, the flags every equal-epoch SSL row has)."""
    main = [flag_pairs(r["flags"].split()) for r in rows.values() if r.get("flags") and r.get("seed") == 0
            and not r.get("equal_wall_clock") and r.get("method") not in ("supervised", "random init")]
    common = [p for p in main[0] if all(p in q for q in main)] if main else []
    return ({n: show(p for p in flag_pairs(r["flags"].split()) if p not in common)
             for n, r in rows.items() if r.get("flags")}, show(common))


def accuracy_table(meta, st):
    rows, g = st.get("rows", {}), st.get("geometry", {})
    own, common = own_flags(rows)
    lines = [caption(meta, (
        f"Accuracy against cost: {geometry_text(st, meta)}; {st.get('epochs')} epochs each, as many as fit "
        f"the stage's budget at the img/s the smoke stage measured. Flags of every method: `{common}`; each "
        "method's `imagenet` preset otherwise (lr per 256 images, scaled by batch / 256: "
        f"{g.get('batch', 256) / 256:g} here). Own flags: the warm-up of MoCo v3 and rotation_aux stays a "
        "tenth of the run (official: 10 of 100 epochs); DenseCL's queue is shorter than the data set and "
        "its momentum lower (MoCo v2's 65,536 keys and m 0.999 are for 1.28 M images over 200 epochs). "
        "kNN: weighted kNN (k=200, T=0.1) on the pooled backbone output, the train split as the bank, "
        f"every {st.get('knn_every')} epochs and at the end (the final value, not the best). Linear: "
        f"`eval_linear.py --mode linear`, {st.get('probe_epochs')} epochs, frozen backbone. Supervised: "
        "`eval_linear.py --mode finetune --pretrained none`, same data and epochs, its fine-tune top-1 in "
        "the linear column. Train s: training wall-clock without evaluation (each epoch's checkpoint "
        f"included; run folders in {meta.get('work')}). `mocov3 Nep`: MoCo v3 given about the slowest "
        "method's training time, its own full schedule; `seed 1`: the two rows closest in final kNN again "
        "with --seed 1.")), "",
        "| method | epochs | train s | img/s | kNN top-1 | kNN seed 1 | linear top-1 | own flags |",
        "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if not r.get("ok"):
            lines.append(f"| {name} | {why_not(r)} | - | - | - | - | - | - |")
            continue
        lin = fmt(r.get("top1")) + " (fine-tune)" if r.get("method") == "supervised" else fmt(r.get("linear"))
        lines.append(f"| {name} | {fmt(r.get('epochs'), 'g')} | {fmt(r.get('train_s'), '.0f')} | "
                     f"{fmt(r.get('img_per_s'), '.0f')} | {fmt(r.get('knn_top1'))} | "
                     f"{fmt(r.get('seed1_knn'))} | {lin} | {own.get(name, '')} |")
    lines += ["", "lightly's Imagenette benchmark (SPEC section 11), their protocol: ResNet-18, 128-px "
              "crops of 160-px images, batch 256, one GPU, fp32, weighted kNN (k=200, T=0.1) on the pooled "
              "backbone output, the best epoch, on all 9,469 train / 3,925 val images (ours: the "
              f"{st.get('n_train')} / {st.get('n_val')} split above, the final epoch). The official BYOL "
              "Imagenette recipe (ResNet-18, 128 px, 1000 epochs) reaches ~92.3 online linear.", "",
              "| lightly method | kNN top-1, 200 epochs | kNN top-1, 800 epochs |", "|---|---|---|"]
    return lines + [f"| {n} | {a} | {b} |" for n, a, b in LIGHTLY]


def time_to_target(rows):
    """(target, {name: (train_s, epoch) of the first kNN evaluation at or above it, or None}): the target is
    the lowest final kNN among the equal-epoch SSL rows, so every one of them reaches it."""
    ssl = {n: r for n, r in rows.items() if r.get("ok") and r.get("curve") and r.get("seed") == 0
           and not r.get("equal_wall_clock")}
    if not ssl:
        return None, {}
    target = min(r["curve"][-1][2] for r in ssl.values())
    return target, {n: next(((p[1], p[0]) for p in r["curve"] if p[2] >= target), None)
                    for n, r in ssl.items()}


def target_table(meta, st):
    target, times = time_to_target(st.get("rows", {}))
    lines = [caption(meta, (
        "Time to a fixed kNN target, in the DAWNBench manner: the training seconds (evaluation excluded) "
        f"and epoch of the first kNN evaluation (every {st.get('knn_every')} epochs) at or above the "
        f"target. The target is the lowest final kNN top-1 among the rows ({fmt(target)}), so every row "
        "reaches it; the runs and protocol of the accuracy table.")), "",
        "| method | train s to target | epoch | final kNN top-1 | final train s |", "|---|---|---|---|---|"]
    rows = st.get("rows", {})
    for name, hit in sorted(times.items(), key=lambda kv: kv[1][0] if kv[1] else math.inf):
        r = rows[name]
        seconds, epoch = hit or (None, None)
        lines.append(f"| {name} | {fmt(seconds, '.0f')} | {fmt(epoch, 'g')} | {fmt(r.get('knn_top1'))} | "
                     f"{fmt(r.get('train_s'), '.0f')} |")
    return lines


def ratio(a, b):
    return a / b if finite(a) and finite(b) and b else None


def targets(stages):
    """[(measurement, value, target, met: True / False / None)] from the smoke and speed stages; value None
    where not measured. Shares and ratios as fractions, rates in img/s."""
    smoke = stages.get("smoke", {}).get("runs", {})
    speed = stages.get("speed", {}).get("runs", {})
    sg, pg = stages.get("smoke", {}).get("geometry", {}), stages.get("speed", {}).get("geometry", {})
    small, big = f"{sg.get('arch')} {sg.get('img')} px", f"{pg.get('arch')} {pg.get('img')} px"
    m, mc = smoke.get("mocov3", {}), smoke.get("mocov3 --compile", {})
    only18 = ratio(((speed.get("model_cost accuracy") or {}).get("step_ms") or {}).get("mocov3"),
                   m.get("step_ms"))
    costs = speed.get("model_cost speed") or {}
    lars = next((c for c in (speed.get("kernels") or {}).get("lars") or [] if c["arch"] == "resnet50"), {})
    rows = [(f"MoCo v3 {small}, --data-on-device: img/s (smoke)", m.get("img_per_s"), ">= 10,000",
             lambda v: v >= 10000),
            (f"MoCo v3 {small}, --data-on-device --compile: img/s (smoke)", mc.get("img_per_s"), ">= 10,000",
             lambda v: v >= 10000),
            (f"data and augmentation on the device, share of the MoCo v3 {small} step: 1 - model-only step "
             f"(model_cost.py) / whole step (smoke)", 1 - only18 if only18 is not None else None, "<= 10%",
             lambda v: v <= 0.10),
            (f"MoCo v3 {big} compiled with --gpu-aug, sustained (last 20 steps) / compiled model-only, img/s",
             ratio(speed.get("mocov3 --gpu-aug --compile", {}).get("last_img_per_s"),
                   speed.get("model-only --compile", {}).get("img_per_s")), ">= 0.90", lambda v: v >= 0.9),
            (f"DenseCL / its MoCo v2 mode, {big}, model-only step (model_cost.py)",
             (costs.get("ratio") or {}).get("densecl"), "<= 1.05", lambda v: v <= 1.05),
            (f"DenseCL / its MoCo v2 mode, {big}, whole script with --data-on-device, step time",
             ratio(speed.get("densecl --data-on-device", {}).get("step_ms"),
                   speed.get("mocov2 --data-on-device", {}).get("step_ms")), "<= 1.05", lambda v: v <= 1.05),
            (f"LARS step (kernels.py, ResNet-50's parameters) / MoCo v3 {big} model-only step",
             ratio(lars.get("new_ms"), (costs.get("step_ms") or {}).get("mocov3")), "<= 2%",
             lambda v: v <= 0.02)]
    return [(what, v if finite(v) else None, target, bool(ok(v)) if finite(v) else None)
            for what, v, target, ok in rows]


def throughput_table(meta, st, stages):
    g, runs = st.get("geometry", {}), st.get("runs", {})
    lines = [caption(meta, (
        f"Speed: MoCo v3 (`--preset imagenet`), {g.get('arch')}, {g.get('img')} px, batch {g.get('batch')}, "
        f"{meta.get('precision')}, channels-last, {g.get('steps')} steps per run. img/s: after the 2 "
        "warm-up steps; sustained: the last 20 steps, after the loader's prefetch buffer "
        f"({meta.get('workers')} workers x 4 batches) has had time to drain; data waits included. The runs "
        f"read the 224-px imagenette subset ({st.get('n_speed_train')} images) listed {st.get('links')} "
        f"times ({st.get('n_links_train')} entries), so no epoch ends (and no checkpoint is written) inside "
        f"a run; --data-on-device stores it at {g.get('store')} px. DenseCL and MoCo v2 (`densecl.py "
        "--dense-weight 0`) with their `imagenet` presets.")), "",
        "| run | ok | img/s | sustained img/s | step ms | data wait |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if not name.startswith(("model_cost", "kernels", "model-only")):
            lines.append(f"| {name} | {state(r)} | {fmt(r.get('img_per_s'), '.0f')} | "
                         f"{fmt(r.get('last_img_per_s'), '.0f')} | {fmt(r.get('step_ms'))} | "
                         f"{percent(r.get('data_time_frac'))} |")
    lines += ["", "Model-only steps (forward + backward + optimizer step on one random batch, no data): "
              "`benchmarks/model_cost.py` (uncompiled, the median of its alternating steps) and the suite's "
              "own compiled timing (model_cost.py has no compile switch).", "",
              "| measurement | variant | step ms | img/s |", "|---|---|---|---|"]
    at_smoke = stages.get("smoke", {}).get("geometry", {})
    for name, at in (("model_cost speed", g), ("model_cost accuracy", at_smoke), ("model-only --compile", g)):
        r, where = runs.get(name, {}), f"{at.get('arch')} {at.get('img')} px, batch {at.get('batch')}"
        if not r.get("ok"):
            lines.append(f"| {name}, {where} | {state(r)} | - | - |")
        elif name.startswith("model_cost"):
            steps = (r["step_ms"] or {}).items()
            lines += [f"| model_cost.py, {where} | {variant} | {fmt(ms)} | "
                      f"{fmt(1000 * at['batch'] / ms, '.0f')} |" for variant, ms in steps]
        else:  # its first 3 steps: the compile, cudnn's autotuning, the allocator
            first = f" (first 3 steps {r['compile_s']:.0f} s)" if finite(r.get("compile_s")) else ""
            lines.append(f"| compiled, {where} | mocov3{first} | {fmt(r.get('step_ms'))} | "
                         f"{fmt(r.get('img_per_s'), '.0f')} |")
    lines += ["", "Targets:", "", "| measurement | value | target | met |", "|---|---|---|---|"]
    for what, v, target, met in targets(stages):
        shown = percent(v) if "%" in target else fmt(v, ".0f" if "," in target else ".2f")
        lines.append(f"| {what} | {shown} | {target} | {'-' if met is None else ('yes' if met else 'no')} |")
    return lines


def dense_table(meta, st):
    if not st.get("table"):
        why = short_error(st.get("error")) or st.get("headline") or "not run"
        return [caption(meta, f"Dense miniature (`benchmarks/dense.py`): not measured ({why}).")]
    return [caption(meta, f"Dense miniature on the device: `{st.get('command')}`. dense.py's own caption "
                          "follows (its CPU wording: this run is the device's)."), "", st["table"].strip()]


def report(out, results_dir):
    """The bundle out/results.json -> gpu_*.md tables and gpu_knn_time.png in results_dir; returns paths."""
    bundle = json.load(open(os.path.join(out, "results.json")))
    meta, stages = bundle["meta"], bundle["stages"]
    os.makedirs(results_dir, exist_ok=True)
    tables = {"gpu_smoke": smoke_table(meta, stages.get("smoke", {})),
              "gpu_accuracy": accuracy_table(meta, stages.get("accuracy", {})),
              "gpu_time_to_target": target_table(meta, stages.get("accuracy", {})),
              "gpu_throughput": throughput_table(meta, stages.get("speed", {}), stages),
              "gpu_dense": dense_table(meta, stages.get("dense", {}))}
    paths = []
    for name, lines in tables.items():
        paths.append(os.path.join(results_dir, f"{name}.md"))
        with open(paths[-1], "w") as f:
            f.write("\n".join(lines) + "\n")
    png = write_plot(stages.get("accuracy", {}), os.path.join(results_dir, "gpu_knn_time.png"), meta)
    for p in paths + [png]:
        print("wrote", p)
    return paths + ([png] if png else [])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_suite"),
                    help="results: <stage>.json, results.json, gpu_knn_time.png, suite.log")
    ap.add_argument("--work", default="", help="run folders (default: /dev/shm or $TMPDIR, effssl_gpu_suite)")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole suite")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    ap.add_argument("--force", action="store_true", help="rerun stages that finished ok (runs still reused)")
    ap.add_argument("--commit", default="", help="the commit the captions name (default: git's HEAD)")
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes, in-process")
    ap.add_argument("--make-data", action="store_true",
                    help="write data/gpu from ../shared/data/imagenette2-224")
    ap.add_argument("--report", metavar="OUT", help="write the tables and the plot from OUT/results.json")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args(argv)
    if a.make_data:
        return make_data()
    if a.report:
        return report(a.report, a.results_dir)
    return run_suite(a)


if __name__ == "__main__":
    main()
