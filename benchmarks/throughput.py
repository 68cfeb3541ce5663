"""Throughput of every method at the same arch, global batch, image size and precision.

Runs each training script for --steps optimizer steps on synthetic data (kNN off) and reads the
JSON summary line: source images/s, step time and the share of it spent waiting for data, measured
after 2 warm-up steps and up to the last step (the final checkpoint and export are not counted);
peak memory (CUDA allocator peak on GPU, process peak RSS on CPU). Short runs are served mostly from
the loader's prefetch buffer, so they time the training step; --sustained N adds a long MoCo v3 run
that shows whether the loader keeps up. Writes a markdown table as it goes (and prints it):

  python benchmarks/throughput.py --repeats 1 --switches --sustained 40      # CPU: resnet18, 64 px, batch 32
  python benchmarks/throughput.py --preset imagenet --arch resnet50 --img-size 224 --batch-size 256 \\
      --steps 30 --precision bf16 --channels-last --workers 15 --repeats 1 --sustained 150 --switches \\
      --out benchmarks/results/throughput_gpu.md                                # one GPU

--switches: MoCo v3 without channels_last and compile, then with each and both, and in fp32 when
--precision is lower. Each configuration runs --repeats times; the table reports the median step time.

--data-paths N: every method for N steps (more than the loader's prefetch buffer holds, so the data pipeline
is in the number) with the PIL loader workers and with --data-on-device, the two runs of a method alternating
--repeats times, into its own table (default benchmarks/results/data_paths_DEVICE.md):

  python benchmarks/throughput.py --data-paths 40 --repeats 2      # CPU: the cpu presets' geometry
"""
import argparse
import os
import platform
import sys

from bench import ROOT, run_summary  # noqa: E402  (benchmarks/ is the script's folder)
# (label, script, extra flags, baseline label): the overhead targets of the issues
CONFIGS = [
    ("mocov3", "mocov3.py", [], None),
    ("fast_moco", "fast_moco.py", [], "mocov3"),
    ("densecl (MoCo v2 mode, --dense-weight 0)", "densecl.py", ["--dense-weight", "0"], None),
    ("densecl", "densecl.py", [], "densecl (MoCo v2 mode, --dense-weight 0)"),
    ("detcon (grid masks)", "detcon.py", ["--masks", "grid"], "mocov3"),
    ("detcon (fh masks)", "detcon.py", ["--masks", "fh"], "mocov3"),
    ("rotation_aux", "rotation_aux.py", [], "mocov3"),
]
TARGETS = {"fast_moco": 1.10, "densecl": 1.05, "detcon (grid masks)": 1.10, "detcon (fh masks)": 1.10,
           "rotation_aux": 1.9}


def run(script, flags, env=None):
    return run_summary(os.path.join(ROOT, script), flags, env=env)


def measure(script, flags, repeats):
    recs = [run(script, flags) for _ in range(repeats)]
    rec = sorted(recs, key=lambda r: r["step_ms"])[len(recs) // 2]  # the median run
    rec["step_ms_all"] = [round(r["step_ms"], 1) for r in recs]
    return rec


def device_name():
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu",
                    help="every script's preset (heads, optimizer); flags below override it")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stem", default="imagenet")
    ap.add_argument("--methods", default="", help="comma-separated labels to run (default: all present)")
    ap.add_argument("--switches", action="store_true",
                    help="also measure channels_last and compile on mocov3")
    ap.add_argument("--sustained", type=int, default=0,
                    help="also run mocov3 for N steps, long enough to drain the loader's prefetch buffer "
                         "(data rate)")
    ap.add_argument("--data-paths", type=int, default=0,
                    help="only compare the PIL loader with --data-on-device, N steps per run")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.data_paths:
        return data_paths(a)
    a.out = a.out or os.path.join(ROOT, "benchmarks", "results", "throughput_cpu.md")
    common = ["--data", "synthetic", "--preset", a.preset, "--arch", a.arch, "--stem", a.stem,
              "--img-size", str(a.img_size), "--batch-size", str(a.batch_size), "--max-steps", str(a.steps),
              "--precision", a.precision, "--workers", str(a.workers), "--knn-every", "0",
              "--log-every", str(a.steps), "--output-dir", os.path.join(ROOT, "runs", "bench"), "--overwrite",
              "--synthetic-size", str(a.batch_size * (a.steps + 1))]
    common += ["--channels-last"] * a.channels_last + ["--compile"] * a.compile
    wanted = set(a.methods.split(",")) if a.methods else None
    results = {}
    for label, script, extra, _ in CONFIGS:
        if not os.path.exists(os.path.join(ROOT, script)) or (wanted and label not in wanted):
            continue
        results[label] = measure(script, common + extra, a.repeats)
        print(label, results[label]["step_ms_all"], flush=True)
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    lines = [f"Device: {device_name()}. Command: `{cmd.strip()}`. `{a.preset}` presets, {a.arch}, "
             f"{a.stem} stem, {a.img_size} px, "
             f"global batch {a.batch_size}, {a.precision}{', channels_last' if a.channels_last else ''}"
             f"{', compile' if a.compile else ''}; {a.steps} steps per run (2 warm-up steps excluded), "
             f"median of {a.repeats} runs. Short runs are mostly served from the loader's prefetch buffer "
             f"({a.workers} workers x 4 batches, filled during warm-up): they measure the training step, not "
             f"the data pipeline.", "",
             "| method | img/s | step ms | data wait | peak mem MB | vs baseline | target |",
             "|---|---|---|---|---|---|---|"]
    for label, script, extra, base in CONFIGS:
        if label not in results:
            continue
        r = results[label]
        ratio = (f"{r['step_ms'] / results[base]['step_ms']:.2f}x {base.split(' ')[0]}" if base in results
                 else "-")
        target = f"<= {TARGETS[label]:.2f}x" if label in TARGETS else "-"
        lines.append(f"| {label} | {r['img_per_s']:.1f} | {r['step_ms']:.0f} | "
                     f"{100 * r['data_time_frac']:.0f}% | {r['peak_mem_mb']:.0f} | {ratio} | {target} |")
    write(a.out, lines)
    print("\n".join(lines), flush=True)
    if a.sustained:  # steps >> workers x prefetch: the loader must keep up on its own
        flags = with_values(common, {"--max-steps": a.sustained, "--log-every": a.sustained,
                                     "--synthetic-size": a.batch_size * (a.sustained + 1)})
        r = measure("mocov3.py", flags, 1)
        lines += ["", f"Sustained, data loading included: mocov3.py over {a.sustained} steps with "
                  f"{a.workers} loader workers ({os.cpu_count()} CPU cores): {r['img_per_s']:.1f} img/s, "
                  f"{r['step_ms']:.0f} ms/step, data wait {100 * r['data_time_frac']:.0f}%."]
        write(a.out, lines)
    if a.switches:  # each switch on mocov3.py against the same settings without channels_last and compile
        plain = [f for f in common if f not in ("--channels-last", "--compile")]
        rows = [("none", plain)] + [(" ".join(f), plain + f) for f in
                                    (["--channels-last"], ["--compile"], ["--channels-last", "--compile"])]
        if a.precision != "fp32":  # what the lower precision itself brings
            rows.append((f"--precision fp32 (not {a.precision})",
                         with_values(plain, {"--precision": "fp32"})))
        lines += ["", f"Speed switches on mocov3.py ({a.precision}; gain = step time of none / step time):",
                  "",
                  "| switch | img/s | step ms | data wait | gain |", "|---|---|---|---|---|"]
        base_ms = None
        for name, flags in rows:
            same = results.get("mocov3") if flags == common else None  # already measured above
            r = same or measure("mocov3.py", flags, a.repeats)
            base_ms = base_ms or r["step_ms"]
            print("switch", name, r["step_ms_all"], flush=True)
            lines.append(f"| {name} | {r['img_per_s']:.1f} | {r['step_ms']:.0f} | "
                         f"{100 * r['data_time_frac']:.0f}% | {base_ms / r['step_ms']:.2f}x |")
            write(a.out, lines)


def data_paths(a):
    """Each method's own preset geometry (as its no-argument run) for a.data_paths steps: PIL loader workers
    against --data-on-device, alternating, median step time of each."""
    dev = "gpu" if "CPU" not in device_name() else "cpu"
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"data_paths_{dev}.md")
    steps = a.data_paths
    lines = [f"Device: {device_name()}. Command: `python benchmarks/throughput.py "
             f"{' '.join(sys.argv[1:])}`. Each method's `{a.preset}` preset (its own arch, stem, image size "
             f"and "
             f"batch), {steps} steps per run (2 warm-up steps excluded; more than the {a.workers} workers "
             f"x 4 batches the loader prefetches, so the data pipeline is in the number), kNN off; the PIL "
             f"loader "
             f"with {a.workers} workers against --data-on-device (the split decoded once, before the clock "
             f"starts), the two alternating, the fastest of {a.repeats} runs each (the least disturbed on a "
             f"shared machine).", "",
             "| method | PIL img/s | PIL data wait | --data-on-device img/s | its data wait | speed-up |",
             "|---|---|---|---|---|---|"]
    for label, script, extra, _ in CONFIGS:
        if a.methods and label not in a.methods.split(","):
            continue
        flags = ["--preset", a.preset, "--max-steps", str(steps), "--log-every", str(steps),
                 "--knn-every", "0",
                 "--workers", str(a.workers), "--output-dir", os.path.join(ROOT, "runs", "bench"),
                 "--overwrite", *extra]
        recs = {"pil": [], "device": []}
        for _ in range(a.repeats):
            recs["pil"].append(run(script, flags))
            recs["device"].append(run(script, flags + ["--data-on-device"]))
        pil, dev_ = (min(r, key=lambda r: r["step_ms"]) for r in recs.values())  # the least disturbed run
        print(label, *([round(r["step_ms"]) for r in recs[k]] for k in ("pil", "device")),
              flush=True)
        lines.append(f"| {label} | {pil['img_per_s']:.1f} | {100 * pil['data_time_frac']:.0f}% | "
                     f"{dev_['img_per_s']:.1f} | {100 * dev_['data_time_frac']:.0f}% | "
                     f"{pil['step_ms'] / dev_['step_ms']:.2f}x |")
        write(out, lines)


def with_values(flags, values):
    """A copy of the flag list with the values of the given flags replaced."""
    flags = list(flags)
    for flag, value in values.items():
        flags[flags.index(flag) + 1] = str(value)
    return flags


def write(path, lines):
    """Write the table so far (a later, slower measurement that fails leaves the earlier ones)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
