"""The quick start, measured: each method's no-argument run (its `cpu` preset on the built-in
synthetic data) against a random-init backbone under the same protocols, over several seeds.

For every seed and method: `python METHOD.py --seed S` (only --output-dir added), then the kNN top-1 after
each epoch from its log.jsonl, wall-clock seconds and img/s from its summary, and for the methods in
--dense both dense probes of the final backbone (`eval_linear.py --mode seg` and `--mode seg-knn`, their
cpu defaults) at the size eval_linear picks for an 8x8 final grid (64 px for the small stem, 256 px for
the ResNet stem). The floors are `eval_linear.py --pretrained none` at the same arch, stem, sizes and seed
(the seed also draws the synthetic images). Every number is a mean ± sd over the seeds; a gain is the
per-seed difference with random init, marked (n.r.) where it is not resolved (bench.resolved). Writes
markdown tables (benchmarks/results/quickstart_all.md, and quickstart.md with mocov3's row).

  python benchmarks/quickstart.py                    # every method, 3 seeds (~100 min on one CPU core)
  python benchmarks/quickstart.py --methods mocov3 --seeds 0   # the README's first command only
  python benchmarks/quickstart.py --reuse            # finish an interrupted run: finished rows are kept
"""
import argparse
import json
import os
import shutil
import sys
import time

from bench import ROOT, cpu_note, gain, git_sha, mean_sd, read_log, run_summary  # noqa: E402  (the script's folder)


def dense_size(cfg):
    """The size eval_linear evaluates a backbone of this geometry at: doubled until the grid is 8x8."""
    sys.path.insert(0, ROOT)
    import common
    import eval_linear as E
    size = cfg["img_size"]
    while common.final_grid(cfg["arch"], cfg["stem"], size) < E.MIN_GRID:
        size *= 2
    return size


def evaluate(modes, src, cfg, seed, out, cache, reuse):
    """{mode: summary} of eval_linear in each mode for one backbone (a file, or none at cfg's geometry)."""
    flags = ["--seed", str(seed), "--synthetic-size", str(cfg["synthetic_size"])]
    if src == "none":
        flags += ["--arch", cfg["arch"], "--stem", cfg["stem"]]
    res = {}
    for mode in modes:
        size = cfg["img_size"] if mode == "knn" else dense_size(cfg)
        res[mode] = run_summary("eval_linear.py", ["--mode", mode, "--pretrained", src, *flags, "--img-size",
                                                   str(size), "--output-dir", f"{out}_{mode}"], cache, reuse)
    return res


def pretrain(m, seed, a):
    """One method's no-argument run at one seed -> its record: cfg, wall, img/s, kNN per epoch, probes."""
    out = os.path.join(a.runs, f"{m}_s{seed}")
    record = out + ".json"
    modes = ["seg", "seg-knn"] if m in a.dense.split(",") else []
    if a.reuse and os.path.isfile(record):
        with open(record) as f:
            rec = json.load(f)
        missing = [mode for mode in modes if mode not in rec["probes"]]  # a dense probe asked for later
        if missing:
            with open(os.path.join(out, "args.json")) as f:
                cfg = json.load(f)
            probes = evaluate(missing, os.path.join(out, "backbone.pth"), cfg, seed, out, None, False)
            rec["probes"].update({k: v["miou"] for k, v in probes.items()})
            with open(record, "w") as f:
                json.dump(rec, f)
        return rec
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
    t = time.perf_counter()
    summary = run_summary(f"{m}.py", ["--output-dir", out, "--seed", str(seed), *a.train_flags.split()])
    wall = time.perf_counter() - t
    with open(os.path.join(out, "args.json")) as f:
        cfg = json.load(f)
    knn = [r["knn_top1"] for r in read_log(out) if "knn_top1" in r and "event" not in r]
    probes = evaluate(modes, os.path.join(out, "backbone.pth"), cfg, seed, out, None, False)
    keys = ("arch", "stem", "img_size", "batch_size", "epochs", "synthetic_size")
    rec = dict(cfg={k: cfg[k] for k in keys}, wall=wall, img_per_s=summary["img_per_s"], knn=knn,
               probes={k: v["miou"] for k, v in probes.items()})
    with open(record, "w") as f:
        json.dump(rec, f)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="mocov3,fast_moco,densecl,detcon,rotation_aux")
    ap.add_argument("--dense", default="mocov3,densecl,detcon",
                    help="methods whose backbone also gets both dense probes (dense methods, baseline)")
    ap.add_argument("--train-flags", default="",
                    help="added to every pretraining command (smoke: '--max-steps 2 --synthetic-size 160')")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated --seed values; each row: mean ± sd")
    ap.add_argument("--reuse", action="store_true", help="keep finished (method, seed) runs and evaluations")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "quickstart"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quickstart"),
                    help="writes OUT_all.md (every method) and OUT.md (mocov3's row: the README's first "
                         "command)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(a.runs, exist_ok=True)
    cache = os.path.join(a.runs, "results")  # the random-init evaluations, shared by methods of one geometry
    if not a.reuse:
        shutil.rmtree(cache, ignore_errors=True)
    rows, dense = [], bool(set(a.dense.split(",")) & set(a.methods.split(",")))  # any dense columns
    for m in a.methods.split(","):
        recs = [pretrain(m, s, a) for s in seeds]
        cfg = recs[0]["cfg"]
        geometry = f"random_{cfg['arch']}_{cfg['stem']}_{cfg['img_size']}_{cfg['synthetic_size']}"
        floors = [evaluate(["knn", *recs[0]["probes"]], "none", cfg, s,
                           os.path.join(a.runs, f"{geometry}_s{s}"), cache, True) for s in seeds]
        final = [r["knn"][-1] for r in recs]
        knn0 = [f["knn"]["top1"] for f in floors]
        per_epoch = " → ".join(mean_sd([r["knn"][e] for r in recs]) for e in range(len(recs[0]["knn"])))
        row = [m, f"{cfg['arch']}, {cfg['stem']} stem, {cfg['img_size']} px, batch {cfg['batch_size']}, "
                  f"{cfg['epochs']} ep on {cfg['synthetic_size']} images",
               mean_sd([r["wall"] / 60 for r in recs]), mean_sd([r["img_per_s"] for r in recs]), per_epoch,
               mean_sd(knn0), gain(final, knn0)]
        for mode in ("seg", "seg-knn") if dense else ():
            if mode in recs[0]["probes"]:
                got, rand = [r["probes"][mode] for r in recs], [f[mode]["miou"] for f in floors]
                row += [mean_sd(got, 2), mean_sd(rand, 2), gain(got, rand, 2)]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    import torch
    lines = [f"Command: `python METHOD.py --seed S` (no other arguments: `cpu` preset, built-in synthetic "
             f"data, 10 classes, chance 10 %, val split = a fifth of the train size), seeds {a.seeds}; each "
             f"number "
             f"is the mean ± sd over the seeds (the seed also draws the synthetic images); {cpu_note()}, "
             f"torch {torch.__version__}. kNN: weighted kNN (k=200, T=0.1) on backbone features, after each "
             f"epoch. seg / seg-kNN: `eval_linear.py --mode seg` (frozen linear segmentation probe: the "
             f"final "
             f"maps cached, a 1x1 conv fit by L-BFGS to convergence) and `--mode seg-knn` (dense retrieval, "
             f"k=5), their cpu defaults, at the size giving an 8x8 final grid (small stem 64 px, ResNet stem "
             f"256 px); 11 classes = background + 10 shapes; mIoU in %; background predicted everywhere "
             f"scores "
             f"about 7.4. Random init: `eval_linear.py --pretrained none` at the same arch, stem, sizes and "
             f"seed. Gain: the per-seed difference with random init, mean ± sd; (n.r.) = not resolved "
             f"(a seed "
             f"disagrees in sign or the mean does not exceed the sd). Generated by `"
             + " ".join(["python benchmarks/quickstart.py", *[x for x in sys.argv[1:] if x != "--reuse"]])
             + f"` at commit {git_sha()}.", "",
             "| method | preset | wall min | img/s | kNN top-1 per epoch | kNN random init | kNN gain | "
             + ("seg mIoU | seg random init | seg gain | seg-kNN mIoU | seg-kNN random init | seg-kNN gain |"
                if dense else ""), "|" + "---|" * (13 if dense else 7)]
    if not dense:  # kNN only: the dense probes of these backbones are benchmarks/dense.py's
        lines[0] = lines[0][:lines[0].index(" seg / seg-kNN:")] + lines[0][lines[0].index(" Random init:"):]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    for path, keep in ((a.out + "_all.md", rows if len(rows) > 1 else []),
                       (a.out + ".md", [r for r in rows if r[0] == "mocov3"])):
        if keep:
            with open(path, "w") as f:
                f.write("\n".join(lines + [f"| {' | '.join(r)} |" for r in keep]) + "\n")
    print("\n".join(lines + [f"| {' | '.join(r)} |" for r in rows]))


if __name__ == "__main__":
    main()
