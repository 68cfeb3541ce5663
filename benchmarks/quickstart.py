"""The quick start, measured: each method's no-argument run (its `cpu` preset on the built-in
synthetic data) against a random-init backbone under the same protocols.

For every method: `python METHOD.py` (only --output-dir added), then the kNN top-1 after each epoch
from its log.jsonl, wall-clock seconds and img/s from its summary, and the frozen linear segmentation
probe (`eval_linear.py --mode seg`, its cpu defaults) of the final backbone on a 4x4 feature grid (the
image size is raised to 128 px for the ResNet stem, whose 64-px grid is 2x2). The floors are
`eval_linear.py --pretrained none` (kNN and seg) at the same arch, stem and image size. Writes markdown
tables (benchmarks/results/quickstart_all.md, and quickstart.md with mocov3's row).

  python benchmarks/quickstart.py                    # every method (~20 min on 2 CPU cores)
  python benchmarks/quickstart.py --methods mocov3   # the README's first command only (~4 min)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench import ROOT, read_log, run_summary  # noqa: E402  (benchmarks/ is the script's folder)

DENSE_GRID = 4  # the seg probe's feature grid: DenseCL's and DetCon's cpu presets (small stem, 32 px)


def git_sha():
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return p.stdout.strip() or "unknown"


def run(cmd):
    """(JSON summary, wall-clock seconds) of one script run."""
    t = time.perf_counter()
    return run_summary(cmd[0], cmd[1:]), time.perf_counter() - t


def dense_size(cfg):
    """Image size giving the seg probe a DENSE_GRID x DENSE_GRID grid: stride 8 (small stem) or 32."""
    return DENSE_GRID * (8 if cfg["stem"] == "small" else 32)


def floors(cfg, out):
    """(kNN top-1, seg mIoU) of a random-init backbone at the run's arch, stem and sizes."""
    geometry = ["--arch", cfg["arch"], "--stem", cfg["stem"], "--synthetic-size", str(cfg["synthetic_size"])]
    knn, _ = run(["eval_linear.py", "--mode", "knn", "--pretrained", "none", *geometry,
                  "--img-size", str(cfg["img_size"]), "--output-dir", out + "_knn"])
    seg, _ = run(["eval_linear.py", "--mode", "seg", "--pretrained", "none", *geometry,
                  "--img-size", str(dense_size(cfg)), "--output-dir", out + "_seg"])
    return knn["top1"], seg["miou"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="mocov3,fast_moco,densecl,detcon,rotation_aux")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quickstart"),
                    help="writes OUT_all.md (every method) and OUT.md (mocov3's row: the README's first "
                         "command)")
    a = ap.parse_args()
    random_init, rows = {}, []
    for m in a.methods.split(","):
        out = os.path.join(ROOT, "runs", "quickstart", m)
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
        summary, wall = run([f"{m}.py", "--output-dir", out])
        with open(os.path.join(out, "args.json")) as f:
            cfg = json.load(f)
        seg, _ = run(["eval_linear.py", "--mode", "seg", "--pretrained", os.path.join(out, "backbone.pth"),
                      "--img-size", str(dense_size(cfg)), "--synthetic-size", str(cfg["synthetic_size"]),
                      "--output-dir", out + "_seg"])
        key = (cfg["arch"], cfg["stem"], cfg["img_size"], cfg["synthetic_size"])
        if key not in random_init:
            random_init[key] = floors(cfg, os.path.join(ROOT, "runs", "quickstart", "random_" + m))
        knn_floor, seg_floor = random_init[key]
        knn = [r["knn_top1"] for r in read_log(out) if "knn_top1" in r and "event" not in r]
        rows.append((m, f"{cfg['arch']}, {cfg['stem']} stem, {cfg['img_size']} px, "
                        f"batch {cfg['batch_size']}, {cfg['epochs']} ep on {cfg['synthetic_size']} images",
                     f"{wall / 60:.1f}",
                     f"{summary['img_per_s']:.1f}", " → ".join(f"{k:.1f}" for k in knn), f"{knn_floor:.1f}",
                     f"{knn[-1] - knn_floor:+.1f}", f"{seg['miou']:.2f}", f"{seg_floor:.2f}",
                     f"{seg['miou'] - seg_floor:+.2f}"))
        print(rows[-1], flush=True)
    import torch
    lines = [f"Command: `python METHOD.py` (no arguments: `cpu` preset, built-in synthetic data, 10 classes, "
             f"chance 10 %, val split = a fifth of the train size); {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}. kNN: weighted kNN (k=200, T=0.1) on backbone features, after each epoch. "
             f"seg: `eval_linear.py --mode seg` (frozen linear segmentation probe, its cpu defaults; 11 "
             f"classes = background + 10 shapes; mIoU in %) on a {DENSE_GRID}x{DENSE_GRID} feature grid "
             f"(ResNet stem: --img-size {DENSE_GRID * 32}). Random init: `eval_linear.py --pretrained none` "
             f"at the same arch, stem and image size. Generated by `"
             + " ".join(["python benchmarks/quickstart.py", *sys.argv[1:]])
             + f"` at commit {git_sha()}.", "",
             "| method | preset | wall min | img/s | kNN top-1 per epoch | kNN random init | kNN gain | "
             "seg mIoU | seg random init | seg gain |", "|---|---|---|---|---|---|---|---|---|---|"]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    for path, keep in ((a.out + "_all.md", rows if len(rows) > 1 else []),
                       (a.out + ".md", [r for r in rows if r[0] == "mocov3"])):
        if keep:
            with open(path, "w") as f:
                f.write("\n".join(lines + [f"| {' | '.join(r)} |" for r in keep]) + "\n")
    print("\n".join(lines + [f"| {' | '.join(r)} |" for r in rows]))


if __name__ == "__main__":
    main()
