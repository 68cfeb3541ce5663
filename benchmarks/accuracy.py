"""Accuracy per compute: each method pretrained on the same data and budget, then kNN (and linear).

For every method: pretrain for --epochs with the kNN monitor after every epoch (log.jsonl gives
kNN top-1 and training seconds per epoch), then `eval_linear.py --mode linear` on the final
backbone. Random init (`eval_linear.py --pretrained none`) is the floor. Equal epochs: every
method at --epochs. Equal wall-clock: MoCo v3 once more, with as many epochs as fit in the slowest
method's training time. Writes a markdown table and a PNG of kNN top-1 vs epochs and vs training
seconds.

  python benchmarks/accuracy.py                                   # imagenette, 64 px, CPU budget (~25 min)
  python benchmarks/accuracy.py --methods mocov3 --epochs 3       # one method
  python benchmarks/accuracy.py --reuse                           # only run what is not finished yet
"""
import argparse
import os
import shutil
import sys

from bench import IMAGENETTE, ROOT, cached, read_log, run_summary  # noqa: E402  (benchmarks/: the script's)
METHODS = ["mocov3", "fast_moco", "densecl", "detcon", "rotation_aux"]
RESULTS = os.path.join(ROOT, "runs", "acc", "results")  # --reuse: the summaries of finished commands


def run(cmd, reuse=False):
    """A script's JSON summary; with reuse, a finished run of the same command is read back from
    runs/acc/results/ instead of run again."""
    return run_summary(cmd[0], cmd[1:], RESULTS, reuse)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=IMAGENETTE)
    ap.add_argument("--methods", default=",".join(m for m in METHODS
                                                  if os.path.exists(os.path.join(ROOT, f"{m}.py"))))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--subset", type=int, default=1000,
                    help="pretrain on a balanced subset of the train split (0: all)")
    ap.add_argument("--linear-epochs", type=int, default=5)
    ap.add_argument("--probe-labels", type=int, default=100,
                    help="labeled images per class for the linear probe (0: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--extra", default="", help="extra flags for every training script")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs of identical commands (runs/acc/results)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "accuracy"))
    a = ap.parse_args()
    data = os.path.abspath(a.data)
    base = ["--data", data, "--arch", "resnet18", "--stem", "imagenet", "--img-size", str(a.img_size),
            "--workers", str(a.workers)]
    train = base + ["--preset", "cpu", "--batch-size", str(a.batch_size), "--knn-every", "1",
                    "--subset", str(a.subset), *a.extra.split()]
    evals = base + ["--batch-size", "128", "--labels-per-class", str(a.probe_labels)]
    linear = ["--epochs", str(a.linear_epochs)]  # eval_linear refuses a flag that does nothing in the mode
    curves = {}

    def pretrain(name, script, epochs):
        """Train, then linear-probe; returns a table row and records the kNN curve."""
        out = os.path.join(ROOT, "runs", "acc", name)
        cmd = [f"{script}.py", *train, "--epochs", str(epochs), "--output-dir", out]
        if not (a.reuse and cached(cmd, RESULTS, True)[1]):  # it will run: into an empty folder
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: log.jsonl must hold this run's curve only
        s = run(cmd, a.reuse)
        log = read_log(out)
        curves[name] = [(r["epoch"], r["train_s"], r["knn_top1"]) for r in log
                        if "knn_top1" in r and "train_s" in r]
        lin = run(["eval_linear.py", "--pretrained", os.path.join(out, "backbone.pth"), "--mode", "linear",
                   *evals, *linear, "--output-dir", os.path.join(out, "linear")], a.reuse)
        print(name, curves[name], lin["top1"], flush=True)
        return (name, str(epochs), f"{curves[name][-1][1]:.0f}", curves[name][-1][2], lin["top1"],
                f"{s['img_per_s']:.1f}")

    floor_knn = run(["eval_linear.py", "--pretrained", "none", "--mode", "knn", *evals,
                     "--output-dir", os.path.join(ROOT, "runs", "acc", "random_knn")], a.reuse)
    floor_lin = run(["eval_linear.py", "--pretrained", "none", "--mode", "linear", *evals, *linear,
                     "--output-dir", os.path.join(ROOT, "runs", "acc", "random_linear")], a.reuse)
    rows = [("random init", "-", "-", floor_knn["top1"], floor_lin["top1"], "-")]
    rows += [pretrain(m, m, a.epochs) for m in a.methods.split(",")]
    note = ""
    if "mocov3" in curves and len(curves) > 1:
        # equal wall-clock: MoCo v3 with as many epochs as fit in the slowest method's training time
        t_base, t_max = curves["mocov3"][-1][1], max(c[-1][1] for c in curves.values())
        e_eq = round(a.epochs * t_max / t_base)
        if e_eq > a.epochs:
            rows.append(pretrain(f"mocov3_{e_eq}ep", "mocov3", e_eq))
            note = (f" Equal wall-clock: `mocov3_{e_eq}ep` is MoCo v3 given {e_eq} epochs (its own full "
                    f"cosine schedule), about the slowest method's training time; compare each method with "
                    f"the MoCo v3 row closest to its train seconds.")
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`. Data: {os.path.basename(data.rstrip('/'))}"
        f"{f' (balanced subset of {a.subset})' if a.subset else ''}, ResNet-18, imagenet stem, "
        f"{a.img_size} px, global batch {a.batch_size}, each method's `cpu` preset hyperparameters, "
        f"one CPU process ({os.cpu_count()} cores). kNN: weighted kNN (k=200, T=0.1), full train split as "
        f"the bank, val split. Linear: MoCo v3 linear protocol, {a.linear_epochs} epochs on "
        f"{f'{a.probe_labels} labeled images per class' if a.probe_labels else 'the full train split'}"
        f", val split. Train s: pretraining seconds without the kNN evaluations.{note}", "",
        "| method | epochs | train s | kNN top-1 | linear top-1 | img/s |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in row) + " |")
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
