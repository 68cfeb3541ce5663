"""Where a training step's time goes: torch.profiler over the real training loop of one method.

  python benchmarks/profile_step.py mocov3 --preset imagenet --arch resnet50 --img-size 224 \\
      --batch-size 256 --precision bf16 --channels-last --workers 15 --knn-every 0 --synthetic-size 4096 \\
      --max-steps 15 --output-dir runs/profile --overwrite     # --overwrite: a rerun replaces the last one

Runs `<method>.main` with the given flags, skips 6 steps, warms the profiler up for 2 and records 6. Prints
the wall time per recorded step, the device time per step by kind of kernel (batch norm, convolution,
elementwise, optimizer, copies) and the top ops by self device time (CPU time on a CPU run).
"""
import importlib
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

WAIT, WARMUP, ACTIVE = 6, 2, 6
KINDS = [("batch norm", ("batch_norm",)),
         ("convolution", ("convolution", "conv", "xmma", "cutlass", "cudnn")),
         ("matmul", ("mm", "gemm", "linear")),
         ("elementwise (add, relu, ...)", ("add", "threshold", "clamp", "relu", "mul", "elementwise")),
         ("optimizer", ("Optimizer", "foreach", "multi_tensor")), ("copies", ("Memcpy", "copy_", "to_copy"))]


def main():
    method, flags = sys.argv[1], sys.argv[2:]
    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda,
                   schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1))
    step_ends, optimizer_step = [], common.optimizer_step

    def profiled_step(*args, **kwargs):  # the training loops call common.optimizer_step once per step
        optimizer_step(*args, **kwargs)
        step_ends.append(time.perf_counter())
        prof.step()

    common.optimizer_step = profiled_step
    with prof:
        importlib.import_module(method).main(flags)
    if len(step_ends) < WAIT + WARMUP + ACTIVE:
        raise SystemExit(f"needs --max-steps >= {WAIT + WARMUP + ACTIVE}")
    wall = 1000 * (step_ends[WAIT + WARMUP + ACTIVE - 1] - step_ends[WAIT + WARMUP - 1]) / ACTIVE
    # leaf device work only: kernels and copies, not the ProfilerStep / Optimizer.step annotations around them
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.name.startswith(("ProfilerStep", "Optimizer."))] if cuda else []
    busy = sum(e.device_time for e in events) / 1000 / ACTIVE
    print(f"\n{method}: {wall:.1f} ms wall per step; device busy {busy:.1f} ms per step" if cuda else
          f"\n{method}: {wall:.1f} ms wall per step (CPU run: op table below is CPU time)")
    if cuda:
        left = list(events)
        for kind, keys in KINDS:
            mine = [e for e in left if any(k in e.name for k in keys)]
            left = [e for e in left if not any(k in e.name for k in keys)]
            print(f"  {kind:30s} {sum(e.device_time for e in mine) / 1000 / ACTIVE:7.1f} ms/step")
        print(f"  {'other':30s} {sum(e.device_time for e in left) / 1000 / ACTIVE:7.1f} ms/step")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
