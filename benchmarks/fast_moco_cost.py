"""Step time of fast_moco.py vs mocov3.py at the same arch, global batch, image size and precision.

The issue's target: Fast-MoCo's step <= 1.10x MoCo v3's (its 4 patches carry the pixels of 1 view;
only the heads see 6x more rows). Builds both models, each with its own heads, optimizer and
preset (MoCo v3: LARS, 2-layer heads; Fast-MoCo: SGD + grad clipping, 3-layer projector), then times
full optimizer steps on the same random batch, alternating the variants so drifting machine load hits
them alike, and reports the median step time of each and its ratio to MoCo v3. Flags are
fast_moco.py's (--preset, --arch, --img-size, --batch-size, --precision, --channels-last ...):

  python benchmarks/fast_moco_cost.py                                 # cpu preset (ResNet-18, 64 px, batch 64)
  python benchmarks/fast_moco_cost.py --img-size 32 --batch-size 32   # the README's small CPU setting
  python benchmarks/fast_moco_cost.py --preset imagenet --batch-size 128 --channels-last   # GPU: R50, 224 px

REPS=N sets the timed steps per variant (default 10).

Variants: mocov3; fast_moco (2x2 grid, pairs); fast_moco_g1 (--grid 1 --combine 1: the same heads,
loss and optimizer on full views, which isolates the cost of cutting into patches). Last line: JSON.
"""
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import fast_moco  # noqa: E402
import mocov3  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    reps = int(os.environ.get("REPS", 10))
    args = common.parse_args(fast_moco.Args, fast_moco.PRESETS, argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    # MoCo v3 from its own preset of the same name, with the shared settings forced equal
    same = {k: getattr(args, k) for k in ("arch", "stem", "img_size", "batch_size", "precision", "channels_last")}
    m3 = dataclasses.replace(common.parse_args(mocov3.Args, mocov3.PRESETS, ["--preset", args.preset]), **same)
    run = common.Run(args, "bench", 0, 1, device, "")
    variants = {
        "mocov3": (lambda: mocov3.MoCoV3(m3), m3, lambda model: [p for p in model.parameters() if p.requires_grad]),
        "fast_moco": (lambda: fast_moco.FastMoCo(args), args, fast_moco.param_groups),
        "fast_moco_g1": (lambda: fast_moco.FastMoCo(dataclasses.replace(args, grid=1, combine=1)), args,
                         fast_moco.param_groups),
    }
    setups = {}
    for name, (build, a, groups) in variants.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        clip = getattr(a, "clip_grad", 0.0)
        setups[name] = (model, common.build_optimizer(a, groups(model)), clip,
                        [p for p in model.parameters() if p.requires_grad])
    scaler = common.grad_scaler(run)
    x1, x2 = (run.to_device(torch.randn(args.batch_size, 3, args.img_size, args.img_size)) for _ in range(2))

    def step(name):
        model, opt, clip, params = setups[name]
        with run.autocast():
            loss = model(x1, x2, 0.99)
        common.optimizer_step(loss, opt, scaler, params, clip)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times = {name: [] for name in setups}
    for name in setups:  # warm-up (allocator, cudnn autotune)
        step(name), step(name)
    for _ in range(reps):
        for name in setups:
            sync()
            t = time.perf_counter()
            step(name)
            sync()
            times[name].append(1000 * (time.perf_counter() - t))
    ms = {name: statistics.median(v) for name, v in times.items()}
    peak = {}
    if cuda:  # peak memory of one step, per variant
        for name in setups:
            torch.cuda.reset_peak_memory_stats()
            step(name)
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
    for name in setups:
        print(f"{name:14s} {ms[name]:9.1f} ms/step  x{ms[name] / ms['mocov3']:.2f}"
              + (f"  peak {peak[name]:.0f} MiB" if peak else ""), flush=True)
    print(json.dumps({"event": "summary", "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "threads": torch.get_num_threads(), "arch": args.arch, "img_size": args.img_size,
                      "batch": args.batch_size, "precision": args.precision, "reps": reps, "step_ms": ms,
                      "ratio": {k: v / ms["mocov3"] for k, v in ms.items()}, "peak_mem_mb": peak or None}))


if __name__ == "__main__":
    main()
