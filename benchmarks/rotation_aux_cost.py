"""Step time of rotation_aux.py vs mocov3.py at the same settings (the README's cost numbers).

Builds both models from the same Args, then times full optimizer steps (forward, backward, LARS)
on the same random batch, alternating the variants so drifting machine load hits them alike, and
reports the median step time of each and its ratio to MoCo v3. Flags are the training scripts'
(--preset, --arch, --img-size, --batch-size, --mlp-dim, --precision, --channels-last ...), plus:

  python benchmarks/rotation_aux_cost.py                          # cpu preset (ResNet-18, 64 px, batch 64)
  python benchmarks/rotation_aux_cost.py --preset imagenet --batch-size 128 --channels-last  # GPU: R50, 224 px

REPS=N sets the timed steps per variant (default 10).

Variants: mocov3, rotation_aux (full-size rotated views), rotation_aux --rot-size img_size/2.
Last line: a JSON summary.
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
import mocov3  # noqa: E402
import rotation_aux  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    reps = int(os.environ.get("REPS", 10))
    args = common.parse_args(rotation_aux.Args, rotation_aux.PRESETS, argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    run = common.Run(args, "bench", 0, 1, device, "")
    n = args.batch_size
    variants = {"mocov3": lambda: mocov3.MoCoV3(mocov3.Args(**{f.name: getattr(args, f.name) for f in dataclasses.fields(mocov3.Args)})),
                "rotation_aux": lambda: rotation_aux.RotationAux(dataclasses.replace(args, rot_size=0)),
                f"rotation_aux_rot{args.img_size // 2}": lambda: rotation_aux.RotationAux(dataclasses.replace(args, rot_size=args.img_size // 2))}
    setups = {}
    for name, build in variants.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = common.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
        setups[name] = (model, opt)
    x1, x2 = (run.to_device(torch.randn(n, 3, args.img_size, args.img_size)) for _ in range(2))

    def step(name):
        model, opt = setups[name]
        with run.autocast():
            out = model(x1, x2, 0.99)
        loss = out[0] if isinstance(out, tuple) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times = {name: [] for name in setups}
    for name in setups:  # warm-up (allocator, cudnn autotune)
        step(name), step(name)
    peak = {}
    for r in range(reps):
        for name in setups:
            sync()
            t = time.perf_counter()
            step(name)
            sync()
            times[name].append(1000 * (time.perf_counter() - t))
    ms = {name: statistics.median(v) for name, v in times.items()}
    if cuda:  # peak memory of one step, per variant
        for name in setups:
            torch.cuda.reset_peak_memory_stats()
            step(name)
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
    for name in setups:
        print(f"{name:24s} {ms[name]:9.1f} ms/step  x{ms[name] / ms['mocov3']:.2f}"
              + (f"  peak {peak[name]:.0f} MiB" if peak else ""), flush=True)
    print(json.dumps({"event": "summary", "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "threads": torch.get_num_threads(), "arch": args.arch, "img_size": args.img_size,
                      "batch": n, "precision": args.precision, "reps": reps, "step_ms": ms,
                      "ratio": {k: v / ms["mocov3"] for k, v in ms.items()}, "peak_mem_mb": peak or None}))


if __name__ == "__main__":
    main()
