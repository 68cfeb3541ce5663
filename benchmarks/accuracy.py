"""Accuracy per compute: each method pretrained on the same data and budget, then kNN (and linear).

For every method: pretrain for --epochs with the kNN monitor after every epoch (log.jsonl gives
kNN top-1 and training seconds per epoch), then `eval_linear.py --mode linear` on the final
backbone. Random init (`eval_linear.py --pretrained none`) is the floor. Reports kNN at equal
epochs and at equal wall-clock (the fastest method's total training time), writes a markdown
table and a PNG of kNN top-1 vs epochs and vs training seconds.

  python benchmarks/accuracy.py                                   # imagenette, 64 px, CPU budget
  python benchmarks/accuracy.py --methods mocov3 --epochs 3       # one method
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.path.join(ROOT, "..", "shared", "data", "imagenette2-224")
METHODS = ["mocov3", "fast_moco", "densecl", "detcon", "rotation_aux"]


def run(cmd):
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=IMAGENETTE)
    ap.add_argument("--methods", default=",".join(m for m in METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--subset", type=int, default=1000, help="pretrain on a balanced subset of the train split (0: all)")
    ap.add_argument("--linear-epochs", type=int, default=5)
    ap.add_argument("--probe-labels", type=int, default=100, help="labeled images per class for the linear probe (0: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra flags for every training script")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "accuracy"))
    a = ap.parse_args()
    data = os.path.abspath(a.data)
    base = ["--data", data, "--arch", "resnet18", "--stem", "imagenet", "--img-size", str(a.img_size),
            "--workers", str(a.workers)]
    train = base + ["--preset", "cpu", "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                    "--knn-every", "1", "--subset", str(a.subset), *a.extra.split()]
    evals = base + ["--batch-size", "128", "--epochs", str(a.linear_epochs), "--labels-per-class", str(a.probe_labels)]
    rows, curves = [], {}
    floor_knn = run(["eval_linear.py", "--pretrained", "none", "--mode", "knn", *evals,
                     "--output-dir", os.path.join(ROOT, "runs", "acc", "random_knn")])
    floor_lin = run(["eval_linear.py", "--pretrained", "none", "--mode", "linear", *evals,
                     "--output-dir", os.path.join(ROOT, "runs", "acc", "random_linear")])
    rows.append(("random init", "-", floor_knn["top1"], "-", floor_lin["top1"], "-"))
    for m in a.methods.split(","):
        out = os.path.join(ROOT, "runs", "acc", m)
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: log.jsonl must hold this run's curve only
        s = run([f"{m}.py", *train, "--output-dir", out])
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        curves[m] = [(r["epoch"], r["train_s"], r["knn_top1"]) for r in log if "knn_top1" in r and "train_s" in r]
        lin = run(["eval_linear.py", "--pretrained", os.path.join(out, "backbone.pth"), "--mode", "linear", *evals,
                   "--output-dir", os.path.join(out, "linear")])
        rows.append((m, f"{curves[m][-1][1]:.0f}", curves[m][-1][2], None, lin["top1"], f"{s['img_per_s']:.1f}"))
        print(m, curves[m], lin["top1"], flush=True)
    t_equal = min(c[-1][1] for c in curves.values())  # the fastest method's total training time
    rows = [r if r[3] != None else (*r[:3], max([k for _, t, k in curves[r[0]] if t <= t_equal * 1.02] or [float("nan")]), *r[4:])
            for r in rows]
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{cmd.strip()}`. Data: {os.path.basename(data.rstrip('/'))}"
             f"{f' (balanced subset of {a.subset})' if a.subset else ''}, ResNet-18, imagenet stem, {a.img_size} px, "
             f"{a.epochs} pretraining epochs at global batch {a.batch_size} with each method's `cpu` preset "
             f"hyperparameters, one CPU process. kNN: weighted kNN (k=200, T=0.1) on the val split. Linear: "
             f"MoCo v3 linear protocol, {a.linear_epochs} epochs on "
             f"{f'{a.probe_labels} labeled images per class' if a.probe_labels else 'the full train split'}. Equal wall-clock: the best kNN reached within "
             f"{t_equal:.0f} s of training (the fastest method's total).", "",
             f"| method | train s | kNN top-1 @ {a.epochs} ep | kNN top-1 @ {t_equal:.0f} s | linear top-1 | img/s |",
             "|---|---|---|---|---|---|"]
    for name, secs, knn, knn_t, lin, ips in rows:
        f = lambda v: v if isinstance(v, str) else f"{v:.1f}"
        lines.append(f"| {name} | {secs} | {f(knn)} | {f(knn_t)} | {f(lin)} | {ips} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, c in curves.items():
        axes[0].plot([e for e, _, _ in c], [k for _, _, k in c], marker="o", label=m)
        axes[1].plot([t for _, t, _ in c], [k for _, _, k in c], marker="o", label=m)
    for ax, xl in zip(axes, ("epoch", "training seconds")):
        ax.axhline(floor_knn["top1"], color="gray", ls="--", label="random init")
        ax.set_xlabel(xl)
        ax.set_ylabel("kNN top-1 (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)


if __name__ == "__main__":
    main()
