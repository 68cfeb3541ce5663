"""Cole et al. (CVPR 2022) in miniature: data quantity, domain, quality and label granularity.

Pretrains mocov3.py (or --method) on imagenette at a CPU budget under each setting, then probes
on the clean imagenette val split; the supervised baseline (`eval_linear.py --pretrained none
--mode finetune`) trains on the same (possibly corrupted) images. Every pretraining run gets the
same number of optimizer steps, so the comparison is at equal compute. Writes a markdown table
and a PNG (bars per lens).

  python benchmarks/study.py                       # all lenses, ~1 h on 2 CPU cores
  python benchmarks/study.py --lenses quantity     # one lens
"""
import argparse
import json
import math
import os
import sys

from bench import IMAGENETTE, ROOT, run_summary  # noqa: E402  (benchmarks/ is the script's folder)
# imagenette's 10 classes grouped into 3 coarse classes (the granularity lens)
COARSE = {"n01440764": "animal", "n02102040": "animal", "n02979186": "device", "n03000684": "device",
          "n03394916": "device", "n03445777": "device", "n03028079": "structure_or_vehicle",
          "n03417042": "structure_or_vehicle", "n03425413": "structure_or_vehicle",
          "n03888257": "structure_or_vehicle"}


def run(script, *args):
    return run_summary(script, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=IMAGENETTE)
    ap.add_argument("--method", default="mocov3")
    ap.add_argument("--lenses", default="quantity,quality,domain,granularity")
    ap.add_argument("--steps", type=int, default=80, help="pretraining steps of every run (equal compute)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=48)
    ap.add_argument("--subsets", default="500,1000,2500")
    ap.add_argument("--corruptions", default="jpeg:10,downsample:4,saltpepper:0.1,blur:2")
    ap.add_argument("--probe-epochs", type=int, default=3)
    ap.add_argument("--probe-labels", type=int, default=250,
                    help="labeled images per class for the probes (0: all; 250 = the 2500 pretraining "
                         "images)")
    ap.add_argument("--train-size", type=int, default=2500,
                    help="images for the quality/domain/granularity runs")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "study"))
    a = ap.parse_args()
    data, runs = os.path.abspath(a.data), os.path.join(ROOT, "runs", "study")
    common = ["--arch", "resnet18", "--stem", "imagenet", "--img-size", a.img_size, "--workers", "2"]
    probe = [*common, "--data", data, "--batch-size", 128, "--epochs", a.probe_epochs,
             "--labels-per-class", a.probe_labels]

    def pretrain(name, subset, *extra):
        epochs = math.ceil(a.steps / (subset // a.batch_size))  # the schedule ends where the step budget does
        out = os.path.join(runs, name)
        run(f"{a.method}.py", *common, "--preset", "cpu", "--data", data, "--subset", subset,
            "--epochs", epochs, "--batch-size", a.batch_size, "--max-steps", a.steps, "--knn-every", 0,
            "--output-dir", out, "--overwrite", *extra)  # a rerun of the study replaces its runs
        return os.path.join(out, "backbone.pth")

    def linear(backbone, *extra):
        return run("eval_linear.py", *probe, "--pretrained", backbone, "--mode", "linear",
                   "--output-dir", os.path.join(os.path.dirname(backbone), "linear"), *extra)["top1"]

    def supervised(name, *extra):
        return run("eval_linear.py", *probe, "--pretrained", "none", "--mode", "finetune",
                   "--output-dir", os.path.join(runs, name), *extra)["top1"]

    rows, lenses = [], a.lenses.split(",")
    if "quantity" in lenses:
        for n in map(int, a.subsets.split(",")):
            rows.append(("quantity", f"{n} pretraining images", linear(pretrain(f"n{n}", n)), None))
    if "quality" in lenses:
        clean = pretrain("clean", a.train_size)
        rows.append(("quality", "clean", linear(clean),
                     supervised("sup_clean", "--labels-per-class", a.train_size // 10)))
        for spec in a.corruptions.split(","):
            name = spec.replace(":", "")
            rows.append(("quality", spec, linear(pretrain(name, a.train_size, "--corrupt", spec)),
                         supervised(f"sup_{name}", "--labels-per-class", a.train_size // 10,
                                    "--corrupt", spec)))
    if "domain" in lenses:
        mixed = pretrain("mixed", a.train_size, "--data", f"{data},synthetic",
                         "--synthetic-size", a.train_size)
        rows.append(("domain", f"{a.train_size // 2} imagenette + {a.train_size // 2} synthetic",
                     linear(mixed), None))
        if "quality" not in lenses:
            rows.append(("domain", f"{a.train_size} imagenette", linear(pretrain("clean", a.train_size)),
                         None))
    if "granularity" in lenses:
        cmap = os.path.join(runs, "coarse_map.json")
        os.makedirs(runs, exist_ok=True)
        json.dump(COARSE, open(cmap, "w"))
        backbone = os.path.join(runs, "clean", "backbone.pth")
        backbone = backbone if os.path.exists(backbone) else pretrain("clean", a.train_size)
        for g in ("fine", "coarse"):
            flags = ["--granularity", g, *(["--coarse-map", cmap] if g == "coarse" else [])]  # fine: refused
            rows.append(("granularity", f"{g} labels ({10 if g == 'fine' else 3} classes)",
                         linear(backbone, *flags), supervised(f"sup_{g}", *flags)))
    cmd = "python benchmarks/study.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{cmd.strip()}`. {a.method}.py, ResNet-18, {a.img_size} px, {a.steps} pretraining "
             f"steps at batch {a.batch_size} for every run (equal compute), imagenette train split (subsets "
             f"balanced and nested; quality/domain/granularity runs on {a.train_size} images). SSL column: "
             f"MoCo v3 linear protocol, {a.probe_epochs} epochs on "
             f"{f'{a.probe_labels} labeled images per class of' if a.probe_labels else ''} the clean train "
             f"split, top-1 on the clean val split. Supervised column: ResNet-18 from scratch, "
             f"{a.probe_epochs} epochs on the same (corrupted) images, clean val.",
             "", "| lens | pretraining data | SSL linear top-1 | supervised top-1 |", "|---|---|---|---|"]
    for lens, setting, ssl, sup in rows:
        lines.append(f"| {lens} | {setting} | {ssl:.1f} | {'-' if sup is None else f'{sup:.1f}'} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, a.out + ".png")


def plot(rows, path):
    """One bar group per lens: SSL linear top-1 per setting, the supervised baseline beside it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lenses = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(lenses), figsize=(4 * len(lenses), 4), squeeze=False)
    for ax, lens in zip(axes[0], lenses):
        sel = [r for r in rows if r[0] == lens]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r[2] for r in sel], 0.4, label="SSL + linear probe")
        ax.bar([i + 0.2 for i in x], [r[3] or 0 for r in sel], 0.4, label="supervised")
        ax.set_xticks(list(x), [r[1].replace(" ", "\n", 2) for r in sel], fontsize=7)
        ax.set_title(lens)
        ax.set_ylabel("top-1 (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
