"""Dense transfer in miniature: every method pretrained on the synthetic scenes at equal epochs, then the
frozen linear segmentation probe (`eval_linear.py --mode seg`) and dense retrieval (`--mode seg-knn`),
against random init, over several seeds.

For every seed and method: pretrain with its `cpu` preset hyperparameters at one shared geometry (arch,
stem, image size, batch, number of images: the settings given here), the kNN monitor only at the end
(log.jsonl gives the training seconds), then both dense evaluations of the final backbone with eval_linear's
defaults.
DenseCL runs twice: as published and with --dense-weight 0 (its global loss alone: MoCo v2). Equal
wall-clock: MoCo v3 once more, with as many epochs as fit in the slowest method's training time (as
benchmarks/accuracy.py does; the epochs are fixed on the first seed, rounded up). Every number is a mean
± sd over the seeds (the seed also draws the synthetic images); the papers' comparisons are per-seed
differences, marked (n.r.) where not resolved (bench.resolved). Writes a markdown table (OUT.md), a bar plot
(OUT.png) and the probe's predicted vs ground-truth masks on the first val images of the first seed
(OUT_masks.png).

  python benchmarks/dense.py                 # the miniature, 3 seeds (~90 min on one CPU core)
  python benchmarks/dense.py --reuse         # only run what is not finished yet
  python benchmarks/dense.py --max-steps 2 --synthetic-size 160 --runs /tmp/d --out /tmp/d/x
  python benchmarks/dense.py --memory        # seg-knn memory at VOC size -> OUT_memory.md (~1 min)
"""
import argparse
import math
import os
import shutil
import sys
import time

from bench import ROOT, cpu_note, gain, git_sha, mean_sd, read_log, run_summary  # noqa: E402  (the script's folder)
# (row name, script, extra flags): DenseCL with --dense-weight 0 keeps only its global (MoCo v2) loss
RUNS = [("mocov3", "mocov3", []), ("fast_moco", "fast_moco", []), ("densecl", "densecl", []),
        ("mocov2 (densecl --dense-weight 0)", "densecl", ["--dense-weight", "0"]), ("detcon", "detcon", []),
        ("rotation_aux", "rotation_aux", [])]
N_CLASSES = 11  # synthetic per-pixel labels: background + one class per shape


def run(cmd, cache_dir, reuse=False):
    """A script's JSON summary; with reuse, a finished run of the same command is read back from
    cache_dir instead of run again."""
    return run_summary(cmd[0], cmd[1:], cache_dir, reuse)


def slug(name):
    return name.split(" ")[0]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="mocov3,densecl,mocov2,detcon",
                    help="rows to run: mocov3, fast_moco, densecl, mocov2, detcon, rotation_aux (default: "
                         "the "
                         "papers' dense comparisons)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated --seed values; each row: mean ± sd")
    ap.add_argument("--epochs", type=int, default=2, help="pretraining epochs, equal for every method")
    ap.add_argument("--stem", default="small", help="small at 32 px: DenseCL's and DetCon's cpu presets")
    ap.add_argument("--img-size", type=int, default=32,
                    help="pretraining size; the probes run at it doubled to an 8x8 grid (64 px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--synthetic-size", type=int, default=1280,
                    help="synthetic train images (pretraining and probes)")
    ap.add_argument("--max-steps", type=int, default=0, help="cap every pretraining run (quick smoke mode)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-equal-wall", action="store_true",
                    help="skip the equal wall-clock MoCo v3 row (the train s column still gives each cost)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs of identical commands")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "dense"),
                    help="run directories and the run cache")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "dense"))
    ap.add_argument("--memory", action="store_true",
                    help="only measure seg-knn's memory at VOC size (writes OUT_memory.md)")
    return ap.parse_args()


def main():
    a = parse()
    if a.memory:
        return measure_memory(a.out + "_memory.md")
    cache = os.path.join(a.runs, "results")
    geometry = ["--data", "synthetic", "--arch", "resnet18", "--stem", a.stem, "--img-size", str(a.img_size),
                "--synthetic-size", str(a.synthetic_size), "--workers", str(a.workers)]
    train = geometry + ["--preset", "cpu", "--batch-size", str(a.batch_size), "--knn-every", "100000"]
    train += ["--max-steps", str(a.max_steps)] if a.max_steps else []
    a.eval_size = eval_size(a)
    seeds = [int(x) for x in a.seeds.split(",")]
    results, floor, masks = {}, [], {}  # results[name]: one record per seed; floor: (seg, seg-knn) per seed

    def dense(name, pretrained, out, seed):
        """Both dense evaluations of one backbone -> (seg summary, seg-knn summary); keeps the masks PNG."""
        src = ["--pretrained", pretrained, "--img-size", str(a.eval_size), "--workers", str(a.workers),
               "--synthetic-size", str(a.synthetic_size), "--seed", str(seed)]  # one evaluation size
        if pretrained == "none":  # otherwise arch and stem come from the file
            src += ["--arch", "resnet18", "--stem", a.stem]
        png = os.path.join(out, "seg", "masks.png")
        seg = run(["eval_linear.py", *src, "--mode", "seg", "--output-dir",
                   os.path.join(out, "seg"), "--show-seg", png], cache, a.reuse)
        knn = run(["eval_linear.py", *src, "--mode", "seg-knn", "--output-dir", os.path.join(out, "seg_knn")],
                  cache, a.reuse)
        if os.path.isfile(png) and seed == seeds[0]:
            masks[name] = png
        print(name, f"seed {seed}", f"seg mIoU {seg['miou']:.1f}", f"seg-knn mIoU {knn['miou']:.1f}",
              flush=True)
        return seg, knn

    def pretrain(name, script, extra, epochs, seed):
        run_name = slug(name) if epochs == a.epochs else f"{slug(name)}_{epochs}ep"
        out = os.path.join(a.runs, f"s{seed}", run_name)
        cmd = [f"{script}.py", *train, *extra, "--epochs", str(epochs), "--seed", str(seed),
               "--output-dir", out]
        if not (a.reuse and os.path.isfile(os.path.join(out, "backbone.pth"))):
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: log.jsonl must hold this run's record only
        s = run(cmd, cache, a.reuse)
        final = [r for r in read_log(out) if "train_s" in r][-1]  # the end-of-run kNN evaluation
        rec = dict(epochs=epochs, train_s=final["train_s"], knn=final.get("knn_top1"),
                   img_per_s=s["img_per_s"])
        rec["dense"] = dense(name, os.path.join(out, "backbone.pth"), out, seed)
        results.setdefault(name, []).append(rec)

    wanted = a.methods.split(",")
    note, e_eq = "", None
    for seed in seeds:
        floor.append(dense("random init", "none", os.path.join(a.runs, f"s{seed}", "random"), seed))
        for name, script, extra in RUNS:
            if slug(name) in wanted:
                pretrain(name, script, extra, a.epochs, seed)
        if e_eq is None and "mocov3" in results and len(results) > 1 and not (a.max_steps or a.no_equal_wall):
            # equal wall-clock, fixed on the first seed: MoCo v3 given at least the slowest method's time
            t_base = results["mocov3"][0]["train_s"]
            slowest, t_max = max(((n, r[0]["train_s"]) for n, r in results.items()), key=lambda x: x[1])
            e_eq = math.ceil(a.epochs * t_max / t_base)
            note = (f" Equal wall-clock: `mocov3 {e_eq}ep` is MoCo v3 given {e_eq} epochs (its own full "
                    f"cosine "
                    f"schedule): {a.epochs} x the slowest method's ({slug(slowest)}) training time over MoCo "
                    f"v3's on seed {seeds[0]} ({t_max:.0f} s / {t_base:.0f} s), rounded up.")
        if e_eq and e_eq > a.epochs:
            pretrain(f"mocov3 {e_eq}ep", "mocov3", [], e_eq, seed)
    write_outputs(a, floor, [oracle(a, s) for s in seeds], results, masks, note)


def eval_size(a):
    """The size eval_linear evaluates a backbone pretrained at --img-size at: doubled to an 8x8 grid."""
    sys.path.insert(0, ROOT)
    import common
    import eval_linear as E
    size = a.img_size
    while common.final_grid("resnet18", a.stem, size) < E.MIN_GRID:
        size *= 2
    return size


def oracle(a, seed):
    """Reference row: every val cell predicted with its true label shares (the histogram of its mask pixels),
    upsampled and argmaxed like the probes' scores: what a perfect per-cell predictor reaches at this grid."""
    import torch
    sys.path.insert(0, ROOT)
    import common
    import eval_linear as E
    grid = common.final_grid("resnet18", a.stem, a.eval_size)
    base = E.SegData(common.load_dataset(E.Args(synthetic_size=a.synthetic_size, seed=seed), "val"),
                     N_CLASSES)
    val = E.SegViews(base, E.SegTransform(a.eval_size))
    ids = torch.stack([val[i][1] for i in range(len(val))])  # [N, H, W]
    counts = E.cell_histograms(ids, N_CLASSES, grid).float()  # [N, S*S, C]
    shares = counts / counts.sum(-1, keepdim=True).clamp(min=1)  # [N, S*S, C]
    shares = shares.reshape(len(ids), grid, grid, N_CLASSES).permute(0, 3, 1, 2)  # [N, C, S, S]
    pred = E.upsample(shares, ids.shape[-2:]).argmax(1)  # [N, H, W]
    m = E.seg_metrics(E.confusion_matrix(pred, ids, N_CLASSES))
    return {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "grid": grid}


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_memory(path, train_images=1464, img_size=448, stride=32, dim=2048, n_classes=21):
    """seg-knn at PASCAL VOC size with ResNet-50: the bank computed analytically, then built at that size from
    random vectors on the CPU (centred and normalised in place, as eval_linear does), and the peak resident
    memory of one chunked vote measured on top of it; the seg probe's cache computed analytically."""
    import torch
    sys.path.insert(0, ROOT)
    import common
    import eval_linear as E
    torch.manual_seed(0)
    k, t = E.SEG_KNN["knn_k"], E.SEG_KNN["knn_t"]
    grid = img_size // stride
    cells = train_images * grid * grid
    bank_mb = cells * (dim + n_classes) * 4 / 2**20  # fp32 features + label distributions
    base = peak_rss_mb()
    bank = torch.empty(cells, dim).normal_()  # filled in place: no second copy inflates the peak
    mean = bank.mean(0)
    E.unit_cells(bank, mean)
    dist = torch.softmax(torch.randn(cells, n_classes), 1)  # [M, C]
    resident = peak_rss_mb() - base
    n_val = E.QUERY_CHUNK // (grid * grid)  # the val images of one query chunk
    feats = torch.randn(n_val, dim, grid, grid)  # [n, D, S, S] a val batch's feature map
    before = peak_rss_mb()
    t = time.perf_counter()
    scores = E.knn_scores(feats, mean, bank, dist, k, t)  # [n, C, S, S]
    seconds = time.perf_counter() - t
    vote_mb = peak_rss_mb() - before
    assert scores.shape == (n_val, n_classes, grid, grid)
    sim_mb = E.QUERY_CHUNK * common.BANK_CHUNK * 4 / 2**20
    aug_gib = 10582 * grid * grid * (dim + n_classes) * 4 / 2**30
    probe_mb = 10582 * grid * grid * dim * 2 / 2**20  # fp16 cells on CUDA
    masks_mb = 10582 * 100 * 100 * 4 / 2**20  # int32 masks at --seg-res 100
    text = [
        f"Generated by `python benchmarks/dense.py --memory` (torch {torch.__version__}, CPU, "
        f"{os.cpu_count()} cores). seg-knn (`eval_linear.py --mode seg-knn`) at PASCAL VOC 2012 size with "
        f"ResNet-50: {train_images} train images at {img_size} px -> {grid}x{grid} final cells of {dim} "
        f"channels, {n_classes} classes, k={k}; and the seg probe's cache (`--mode seg`) for train_aug.",
        f"The vote's peak does not grow with the bank or the val split: queries are taken {E.QUERY_CHUNK} "
        f"cells at a time and the bank is scanned {common.BANK_CHUNK} cells at a time with a running top-k. "
        f"The bank dominates: about {(bank_mb + vote_mb) / 1024:.1f} GiB in all for VOC train (train_aug's "
        f"10,582 images: {aug_gib:.1f} GiB of bank) besides the backbone and one val batch. Under torchrun "
        f"every rank holds the whole gathered bank (plus the padded copies while gathering). The seg probe "
        f"keeps every train cell (fp32 on a CPU: twice the fp16 figure) and evaluates its loss "
        f"{E.PROBE_CHUNK} images at a time; every rank holds the gathered cache and fits the same probe."]
    rows = [
        (f"bank: {cells:,} cells x ({dim} features + {n_classes} label shares) x 4 B",
         "computed (every cell kept: an upper bound, cells with only ignore pixels are left out)", bank_mb),
        ("bank, resident", "measured: peak RSS rise while building a random bank of that size", resident),
        (f"one similarity block: {E.QUERY_CHUNK} query cells x {common.BANK_CHUNK} bank cells x 4 B",
         "computed (eval_linear.QUERY_CHUNK, common.BANK_CHUNK)", sim_mb),
        (f"one chunked vote: {n_val} val images = {n_val * grid * grid} query cells against the whole bank",
         f"measured: peak RSS rise during knn_scores, bank already resident ({seconds:.0f} s on this CPU)",
         vote_mb),
        (f"seg probe cache: 10,582 train_aug images x {grid * grid} cells x {dim} channels x 2 B",
         "computed (fp16 on CUDA; every cell, 255-only cells included)", probe_mb),
        ("seg probe masks: 10,582 x 100 x 100 x 4 B", "computed (int32, resized to --seg-res 100)", masks_mb)]
    lines = [text[0], "", "| quantity | how | MiB |", "|---|---|---|",
             *[f"| {q} | {how} | {mb:.0f} |" for q, how, mb in rows], "", text[1]]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def result_flags(argv):
    """The flags that change the results: --reuse and --runs only say where runs are kept and read back."""
    out, skip = [], False
    for flag in argv:
        if skip or flag == "--reuse" or flag.startswith("--runs="):
            skip = False
            continue
        skip = flag == "--runs"
        if not skip:
            out.append(flag)
    return out


def write_outputs(a, floor, ref, results, masks, note):
    sys.path.insert(0, ROOT)
    import eval_linear as E
    budget = (f"ResNet-18, {a.stem} stem, {a.img_size} px, {a.synthetic_size} synthetic images, "
              f"{a.epochs} pretraining epochs" + (f" capped at {a.max_steps} steps" if a.max_steps else ""))
    cmd = " ".join(["python benchmarks/dense.py", *result_flags(sys.argv[1:])])
    grid = ref[0]["grid"]
    columns = ["method", "epochs", "train s", "kNN top-1", "seg mIoU", "seg pixel acc", "seg-kNN mIoU",
               "seg-kNN pixel acc"]
    lines = [
        f"Command: `{cmd}` at commit {git_sha()}. A miniature, not a VOC result: {budget}, global batch "
        f"{a.batch_size}, each "
        f"method's `cpu` preset hyperparameters otherwise, seeds {a.seeds} (the seed also draws the "
        f"synthetic "
        f"images; every number is the mean ± sd over them), {cpu_note()}. Dense "
        f"data: the synthetic scenes' per-pixel labels ({N_CLASSES} classes: background + 10 shapes; val = a "
        f"fifth of the train size), the same train images as pretraining, at {a.eval_size} px. Seg: "
        f"`eval_linear.py --mode seg` (frozen backbone, the final {grid}x{grid} maps cached once, a 1x1 conv "
        f"on the standardised maps fit by L-BFGS to convergence, wd {E.PROBE_WD}). Seg-kNN: `--mode seg-knn` "
        f"(k={E.SEG_KNN['knn_k']}, T={E.SEG_KNN['knn_t']}, a bank of every final-grid cell of the train "
        f"images, centred). mIoU over the classes present in ground truth or prediction, and pixel "
        f"accuracy, in percent, on the val split; background predicted everywhere scores "
        f"{floor[0][0]['floor_miou']:.1f} mIoU. "
        f"Train s: pretraining seconds without the kNN evaluation; kNN: the final weighted kNN top-1 (k=200, "
        f"T=0.1). Reference row: each val cell given its true label shares, upsampled and argmaxed as the "
        f"probes' scores are (what a perfect per-cell predictor reaches at this grid).{note} "
        f"The papers' dense claims, at full scale and with other protocols (their numbers are not "
        f"comparable with these): DenseCL (R50, ImageNet 200 ep) over MoCo v2, fine-tuned: VOC segmentation "
        f"+3.0 mIoU, VOC detection +2.0 AP; DetCon_B (R50, ImageNet 1000 ep): COCO 42.7 AP box / 38.2 AP "
        f"mask, the transfer accuracy of SimCLR/BYOL with up to 10x less pretraining; frozen linear VOC "
        f"probe anchors: VICRegL R50 55.9, VICReg ~47.8 mIoU.", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def probe_cells(pairs):  # pairs: one (seg summary, seg-knn summary) per seed
        return [mean_sd([p[i][key] for p in pairs]) for i in (0, 1) for key in ("miou", "pixel_acc")]

    lines.append("| " + " | ".join(["random init", "-", "-", "-", *probe_cells(floor)]) + " |")
    for name, recs in results.items():
        knn = mean_sd([r["knn"] for r in recs]) if recs[0]["knn"] is not None else "-"
        cells = [name, str(recs[0]["epochs"]), mean_sd([r["train_s"] for r in recs], 0), knn,
                 *probe_cells([r["dense"] for r in recs])]
        lines.append("| " + " | ".join(cells) + " |")
    refs = [mean_sd([r[key] for r in ref]) for key in ("miou", "pixel_acc")]
    lines.append(f"| reference: true label shares of each {grid}x{grid} cell, upsampled | - | - | - | "
                 + " | ".join(refs + refs) + " |")
    # the comparisons: per-seed differences (same seed = same images), each method against random init
    # and the papers' pairs
    pairs = [(n, "random init") for n in results]
    pairs += [(x, y) for x, y in [("densecl", "mocov2 (densecl --dense-weight 0)"), ("detcon", "mocov3")]
              + [("detcon", n) for n in results if n.startswith("mocov3 ")] if x in results and y in results]
    lines += ["", "Differences per seed (mean ± sd; (n.r.) = not resolved: a seed disagrees in sign or the "
              "mean does not exceed the sd):", "",
              "| comparison | kNN top-1 | seg mIoU | seg-kNN mIoU |", "|---|---|---|---|"]
    for x, y in pairs:
        xs = results[x]
        ys = floor if y == "random init" else [r["dense"] for r in results[y]]
        knn = gain([r["knn"] for r in xs], [r["knn"] for r in results[y]]) if y in results else "-"
        seg, sk = (gain([r["dense"][i]["miou"] for r in xs], [p[i]["miou"] for p in ys]) for i in (0, 1))
        lines.append(f"| {x} − {y} | {knn} | {seg} | {sk} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import statistics

    def stat(pairs, i):  # (mean, sd) of one probe's mIoU over seeds
        xs = [p[i]["miou"] for p in pairs]
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    per_row = [("random init", floor)] + [(n, [r["dense"] for r in recs]) for n, recs in results.items()]
    names = [n for n, _ in per_row]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4))
    x, w = range(len(names)), 0.38  # two bars per method
    for i, (off, label) in enumerate(((-w / 2, "seg (linear probe)"), (w / 2, "seg-kNN (retrieval)"))):
        st = [stat(p, i) for _, p in per_row]
        ax.bar([j + off for j in x], [m for m, _ in st], w, yerr=[sd for _, sd in st], capsize=3, label=label)
    ax.axhline(stat(floor, 0)[0], color="gray", ls="--", lw=1, label="random init, seg")
    ax.axhline(statistics.mean(r["miou"] for r in ref), color="black", ls=":", lw=1,
               label=f"true {grid}x{grid} cell label shares")
    ax.set_xticks(list(x), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"Dense transfer, miniature: {budget}; mean ± sd over seeds {a.seeds}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)
    if masks:
        fig, axes = plt.subplots(1, len(masks), figsize=(2.2 * len(masks), 5.5), squeeze=False)
        for ax, (name, png) in zip(axes[0], masks.items()):
            ax.imshow(plt.imread(png))
            ax.set_title(name.replace(" (", "\n("), fontsize=7)
            ax.axis("off")
        fig.suptitle("Seg probe on the first val images (image | ground truth | prediction). "
                     f"Miniature: {budget}", fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out + "_masks.png", dpi=120)


if __name__ == "__main__":
    main()
