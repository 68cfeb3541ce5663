"""Model-only step time of every method at the same arch, global batch, image size and precision.

Each method's model gets its own heads, optimizer and preset (--preset, default cpu) with arch, stem, img
size, batch, precision and channels_last forced equal; full optimizer steps (forward + backward + step, no
data loading) are timed on the same random batch, alternating the variants so drifting machine load hits
them alike. Reports each median and its ratio to its baseline, plus DetCon's Felzenszwalb-Huttenlocher mask
cost (paid in the loader workers, so not in the steps); writes markdown, prints it, ends with a JSON line.

  python benchmarks/model_cost.py --other-arch regnet_y_400mf  # CPU: cpu preset (ResNet-18, 64 px, batch 32)
  python benchmarks/model_cost.py --img-size 32 --stem small --methods densecl,detcon
  python benchmarks/model_cost.py --preset imagenet --arch resnet50 --img-size 224 --batch-size 128 \\
      --precision bf16 --channels-last                        # one GPU

REPS=N or --reps N: timed steps per variant (default 10). --methods: comma list of mocov3, fast_moco, densecl,
detcon, rotation_aux (mocov3 joins when a method measured against it is picked). Other flags are the training
scripts' common ones (e.g. --mlp-dim), given to every method. Variants (vs): fast_moco and fast_moco --grid 1
--combine 1 (the patches' cost alone), detcon --variant B / S on precomputed grid masks, rotation_aux with
full-size and img_size/2 rotated views (vs mocov3); densecl (vs its --dense-weight 0 mode, MoCo v2). A method
that does not fit the settings (DenseCL, DetCon need a final feature grid >= 2x2) is skipped with a note.
--other-arch NAME (any torchvision classification model, e.g. regnet_y_400mf) adds a row per method: its main
variant on that backbone, against the same variant on --arch.
"""
import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import bench  # noqa: E402
import common  # noqa: E402
import densecl  # noqa: E402
import detcon  # noqa: E402
import fast_moco  # noqa: E402
import mocov3  # noqa: E402
import rotation_aux  # noqa: E402
from throughput import device_name  # noqa: E402

METHODS = ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")
SHARED = ("arch", "stem", "img_size", "batch_size", "precision", "channels_last")
TARGETS = {"fast_moco": 1.10, "densecl": 1.05, "detcon --variant B": 1.10, "detcon --variant S": 1.10,
           "rotation_aux": 1.9}
IMAGENETTE = os.path.join(bench.IMAGENETTE, "train")  # README: where the 224-px copy comes from


def plan(flags, same, run, x1, x2, other=""):
    """[(variant, method, baseline, build)]; build() -> (model, its Args, forward inputs) or raises
    BadInput. `other`: an arch each method's main variant is also timed with (vs the same variant)."""
    def margs(mod, **over):  # the method's own preset and flags, the shared settings forced equal
        return dataclasses.replace(common.parse_args(mod.Args, mod.PRESETS, flags), **{**same, **over})

    def views(mod, model, check=None, **over):  # mocov3, fast_moco, rotation_aux: forward(x1, x2, m)
        a = margs(mod, **over)
        if check:
            check(a)
        return model(a), a, (x1, x2, a.momentum)

    def dense(**over):
        a = margs(densecl, **over)
        s = common.final_grid(a.arch, a.stem, a.img_size)  # BadInput for an arch without a spatial map
        why = [w for w, bad in [(f"a final grid >= 2x2, not {s}x{s}", s < 2),
                                (f"--shuffle-splits {a.shuffle_splits} to divide the batch",
                                 a.batch_size % a.shuffle_splits)] if bad]
        if why:  # the checks of densecl.main()
            raise common.BadInput("densecl needs " + " and ".join(why))
        return densecl.DenseCL(a), a, (x1, x2, a.momentum, a.dense_weight)

    def det(variant, **over):
        a = margs(detcon, variant=variant, masks="grid", **over)
        s = detcon.check_args(a)
        # masks come from the loader workers in training: built once here, outside the timed step
        cells = detcon.reduce_mask(
            torch.from_numpy(detcon.grid_mask(a.img_size, a.img_size, a.grid_masks)), s)
        ids = torch.unique(cells, return_inverse=True)[1]  # ids 0..U-1 < 2 S^2, as JointViews relabels them
        m = run.to_device(ids.expand(a.batch_size, s, s).contiguous())  # [N, S, S]
        return detcon.DetCon(a), a, (x1, m, x2, m, a.momentum)

    half = same["img_size"] // 2
    fast = lambda **over: views(fast_moco, fast_moco.FastMoCo, fast_moco.check_args, **over)  # noqa: E731
    rot = lambda size, **over: views(rotation_aux, rotation_aux.RotationAux,  # noqa: E731
                                     rot_size=size, **over)
    on = {"arch": other}  # each method's main variant on --other-arch, against the same variant on --arch
    others = [(f"{v} --arch {other}", v.split()[0], v, b) for v, b in [
        ("mocov3", lambda: views(mocov3, mocov3.MoCoV3, **on)), ("fast_moco", lambda: fast(**on)),
        ("densecl", lambda: dense(**on)), ("detcon --variant B", lambda: det("B", **on)),
        ("rotation_aux", lambda: rot(0, **on))]] if other else []
    return [("mocov3", "mocov3", None, lambda: views(mocov3, mocov3.MoCoV3)),
            ("fast_moco", "fast_moco", "mocov3", fast),
            ("fast_moco --grid 1 --combine 1", "fast_moco", "mocov3", lambda: fast(grid=1, combine=1)),
            ("densecl --dense-weight 0", "densecl", None, lambda: dense(dense_weight=0.0)),
            ("densecl", "densecl", "densecl --dense-weight 0", dense),
            ("detcon --variant B", "detcon", "mocov3", lambda: det("B")),
            ("detcon --variant S", "detcon", "mocov3", lambda: det("S")),
            ("rotation_aux", "rotation_aux", "mocov3", lambda: rot(0)),
            (f"rotation_aux --rot-size {half}", "rotation_aux", "mocov3", lambda: rot(half)), *others]


def mask_cost(a, img_size, n=16):
    """DetCon FH masks, one process (= one loader worker): ms/image and masks/image, as table lines."""
    if os.path.isdir(IMAGENETTE):
        files = [os.path.join(IMAGENETTE, c, f) for c in sorted(os.listdir(IMAGENETTE))
                 for f in sorted(os.listdir(os.path.join(IMAGENETTE, c)))[:2]][:n]
        imgs, source = [common.load_image(f) for f in files], "imagenette2-224 train images"
    else:
        imgs, source = [common.render_synthetic(0, i, px=224)[0] for i in range(n)], "synthetic 224-px images"

    def timed(masker, images):
        t = time.perf_counter()
        ids = [masker.mask(im) for im in images]
        return (1000 * (time.perf_counter() - t) / len(images),
                np.mean([len(np.unique(m.numpy())) for m in ids]))

    def fh_at(im):
        f = min(1.0, a.fh_size / max(im.size)) if a.fh_size else 1.0
        return f"{round(im.width * f)}x{round(im.height * f)}"

    small = [im.resize((img_size, img_size), Image.BILINEAR) for im in imgs]
    rows = [(f"{img_size}x{img_size} (benchmark --img-size)", fh_at(small[0]),
             *timed(detcon.MaskedImages([], a), small)),
            (f"{imgs[0].width}x{imgs[0].height} (native)", fh_at(imgs[0]),
             *timed(detcon.MaskedImages([], a), imgs))]
    with tempfile.TemporaryDirectory() as d:
        cached = detcon.MaskedImages([], a, d, 0)
        timed(cached, imgs)  # fills the cache
        rows.append((f"{imgs[0].width}x{imgs[0].height} (native), cache hit", "- (16-bit PNG read)",
                     *timed(cached, imgs)))
    return ([f"DetCon mask cost (Felzenszwalb-Huttenlocher, --fh-size {a.fh_size} --fh-scale {a.fh_scale} "
             f"--fh-min-size {a.fh_min_size}; one process = one loader "
             f"worker; {len(imgs)} {source}). Paid in the loader workers, not in the step times above.", "",
             "| image | FH runs at | ms/image | masks/image |", "|---|---|---|---|",
             *(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} |" for r in rows)],
            {r[0]: round(r[2], 2) for r in rows})


@common.user_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 10)),
                    help="timed steps per variant")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--other-arch", default="", help="also time each method with this torchvision backbone "
                    "(e.g. regnet_y_400mf), against the same method on --arch")
    ap.add_argument("--out", default="",
                    help="markdown file (default benchmarks/results/model_cost_{cpu,gpu}.md)")
    opts, rest = ap.parse_known_args(argv)
    wanted = set(filter(None, opts.methods.split(",")))
    if wanted - set(METHODS):
        raise common.BadInput(f"unknown --methods {','.join(sorted(wanted - set(METHODS)))}; "
                              f"choose from {', '.join(METHODS)}")
    if wanted & {"fast_moco", "detcon", "rotation_aux"}:
        wanted.add("mocov3")  # their ratios are against it
    flags = ["--preset", opts.preset, *rest]
    # the shared settings: mocov3's preset + flags
    base = common.parse_args(mocov3.Args, mocov3.PRESETS, flags)
    device = bench.cuda_device(base)
    cuda = device.type == "cuda"
    same = {k: getattr(base, k) for k in SHARED}
    run = common.Run(base, "bench", 0, 1, device, "")
    scaler = common.grad_scaler(run)
    x1, x2 = (run.to_device(torch.randn(base.batch_size, 3, base.img_size, base.img_size)) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(name):
        model, opt, clip, params, inputs = setups[name]
        with run.autocast():
            out = model(*inputs)
        # densecl, detcon, rotation_aux return (loss, extras...)
        loss = out[0] if isinstance(out, tuple) else out
        common.optimizer_step(loss, opt, scaler, params, clip)

    setups, baseline, skipped = {}, {}, {}
    for name, method, ref, build in plan(flags, same, run, x1, x2, opts.other_arch):
        if method not in wanted:
            continue
        torch.manual_seed(0)
        try:
            model, a, inputs = build()
        except common.BadInput as e:
            skipped[name] = str(e)
            print(f"skip {name}: {e}", flush=True)
            continue
        model = model.to(device, memory_format=torch.channels_last if base.channels_last
                         else torch.preserve_format).train()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = fast_moco.param_groups(model) if method == "fast_moco" else params
        setups[name], baseline[name] = (
            model, common.build_optimizer(a, groups, getattr(a, "trust_coefficient", 0.001)),
            getattr(a, "clip_grad", 0.0), params, inputs), ref
        sync()
        t = time.perf_counter()
        step(name), step(name)  # warm-up: allocator, cudnn autotune
        sync()
        print(f"{name}: built ({a.optimizer}), 2 warm-up steps "
              f"{1000 * (time.perf_counter() - t) / 2:.0f} ms/step", flush=True)

    times = {name: [] for name in setups}
    for _ in range(opts.reps):
        for name in setups:
            sync()
            t = time.perf_counter()
            step(name)
            sync()
            times[name].append(1000 * (time.perf_counter() - t))
    ms = {name: statistics.median(v) for name, v in times.items()}
    ratio = {n: ms[n] / ms[r] for n, r in baseline.items() if r in ms}
    peak = {}
    # one step's peak above what is resident, plus this variant's own state
    for name in setups if cuda else ():
        model, opt = setups[name][:2]
        own = [*model.parameters(), *model.buffers(),
               *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(name)
        peak[name] = (torch.cuda.max_memory_allocated() - before
                      + sum(t.numel() * t.element_size() for t in own)) / 2**20

    cmd = " ".join(["python benchmarks/model_cost.py", *map(shlex.quote, argv)])
    lines = [f"Device: {device_name()}. Command: `{cmd}`. {base.arch}, {base.stem} stem, {base.img_size} px, "
             f"global batch {base.batch_size}, {base.precision}, "
             f"channels_last {'on' if base.channels_last else 'off'}, --preset {base.preset}; model-only "
             f"step (forward + backward + optimizer step, no data loading), median of {opts.reps} "
             f"alternating steps.", "",
             "| variant | step ms | ratio | vs | target |", "|---|---|---|---|---|"]
    for name in setups:
        r = f"{ratio[name]:.2f}x" if name in ratio else "-"
        lines.append(f"| {name} | {ms[name]:.1f} | {r} | {baseline[name] if name in ratio else '-'} | "
                     f"{f'<= {TARGETS[name]:.2f}x' if name in TARGETS else '-'} |")
    if skipped:
        lines += [""] + [f"- skipped {name}: {why}" for name, why in skipped.items()]
    if peak:
        lines += ["", "Peak GPU memory per variant (its weights, grads and optimizer state + one step's "
                  "peak): " + ", ".join(f"{n} {v:.0f} MiB" for n, v in peak.items()) + "."]
    mask_ms = None
    if "detcon" in wanted:
        a = dataclasses.replace(common.parse_args(detcon.Args, detcon.PRESETS, flags), **same)
        try:
            table, mask_ms = mask_cost(a, base.img_size)
            lines += [""] + table
        except common.BadInput as e:  # scikit-image missing
            lines += ["", f"DetCon mask cost not measured: {e}"]
    out = opts.out or os.path.join(ROOT, "benchmarks", "results", f"model_cost_{'gpu' if cuda else 'cpu'}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n(wrote {out})")
    print(json.dumps({"event": "summary", "device": device_name(), "threads": torch.get_num_threads(), **same,
                      "preset": base.preset, "reps": opts.reps, "step_ms": ms, "ratio": ratio,
                      "peak_mem_mb": peak or None, "skipped": skipped, "mask_ms_per_image": mask_ms}),
          flush=True)


if __name__ == "__main__":
    main()
