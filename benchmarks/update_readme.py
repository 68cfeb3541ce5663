"""Copy the tables the benchmark scripts wrote (benchmarks/results/NAME.md) into README.md, between the
markers <!-- results:NAME --> and <!-- /results:NAME -->, and write RESULTS.md: every table, under a heading,
with a short reading that points at the table instead of restating it. Nothing is typed by hand.

  python benchmarks/update_readme.py
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# (anchor heading, [table names], reading: what to look at, without numbers -- the tables hold those)
SECTIONS = [
    ("Quick start", ["quickstart_all"],
     "Every method's no-argument run against a random-init backbone under the same protocol, over three "
     "seeds, one CPU core per run. The bar is random init, not chance: random convolutions already "
     "separate simple shapes. A gain marked (n.r.) is within the spread over seeds at this budget."),
    ("Dense evaluation", ["dense", "dense_memory"],
     "A miniature of DenseCL's and DetCon's dense-transfer claims on the synthetic scenes: the frozen "
     "linear segmentation probe and training-free dense retrieval (eval_linear.py --mode seg / seg-knn) "
     "of each method's backbone, with random init as the floor. The comparisons the papers make are "
     "DenseCL against its --dense-weight 0 (MoCo v2) mode and DetCon against MoCo v3, at equal epochs and "
     "at equal wall-clock; each is a per-seed difference, marked (n.r.) where the seeds do not resolve it. "
     "![dense probe per method](benchmarks/results/dense.png) "
     "![predicted vs ground-truth masks](benchmarks/results/dense_masks.png)"),
    ("Model cost", ["model_cost_cpu", "model_cost_gpu", "fh_cost"],
     "Forward + backward + optimizer step on the same batch, no data loading, the variants' steps "
     "interleaved. Each method is compared with its own baseline (DenseCL with its MoCo v2 mode, the rest "
     "with MoCo v3); the papers' cost claims are about the GPU setting. Last, DetCon's masks: what the "
     "official full-resolution Felzenszwalb-Huttenlocher call (the imagenet preset) costs the loader "
     "workers in the first epoch, against the small presets' scaled call and the disk cache."),
    ("Kernels", ["kernels_cpu"],
     "The multi-tensor LARS step against the per-parameter loop it replaced, and DenseCL's dense loss "
     "(fp32 log-sum-exp, no concatenation, 1/tau folded into the queries) against the concatenating "
     "cross-entropy, in value, time and memory traffic."),
    ("Loader", ["loader_cpu"],
     "CPU time per image of the MoCo v3 view pair at 224 px on imagenette: the PIL path against the "
     "worker side of --gpu-aug (decode, crop, flip to uint8), the photometric ops then run batched on the "
     "device. On this CPU-only machine the device side ran on the CPU, for reference only."),
    ("Throughput", ["throughput_cpu", "data_paths_cpu", "throughput_gpu", "throughput_gpu_compile"],
     "Whole-script img/s with data loading, on synthetic data. Short runs are served from the loader's "
     "prefetch buffer; the sustained line is the one that includes the data pipeline. The GPU tables "
     "predate --gpu-aug, the multi-tensor LARS and the leaner DenseCL loss. The data-paths table runs each "
     "method's no-argument geometry with the PIL loader workers and with --data-on-device."),
    ("Accuracy", ["accuracy"],
     "kNN and linear accuracy on imagenette at equal epochs and at equal wall-clock (a longer MoCo v3 "
     "run), at a miniature CPU budget. ![kNN vs epochs and wall-clock](benchmarks/results/accuracy.png)"),
    ("GPU suite", ["gpu_smoke", "gpu_accuracy", "gpu_time_to_target", "gpu_throughput", "gpu_dense"],
     "One budgeted run of benchmarks/gpu_suite.py on one GPU: every script's smoke run, every method's kNN "
     "and linear accuracy against its training seconds on imagenette at equal epochs (with an "
     "equal-wall-clock MoCo v3 row and a second seed of the two closest rows where the budget allowed), the "
     "time each method takes to a common kNN target, the speed targets at ImageNet resolution, and the dense "
     "miniature. Each caption names the device, budget, commit and protocol. lightly's Imagenette numbers "
     "sit beside ours for scale, not as a like-for-like comparison: their split is larger, they report the "
     "best epoch and train longer schedules. "
     "![kNN vs training seconds](benchmarks/results/gpu_knn_time.png)"),
    ("Data study", ["study"],
     "The four lenses of Cole et al. in miniature: compare the SSL-supervised gap per row, not rows with "
     "each other. ![data study](benchmarks/results/study.png)"),
]


def table(name):
    path = os.path.join(RESULTS, f"{name}.md")
    return open(path).read().strip() if os.path.exists(path) else None


def existing_pictures(text):
    """Drop the ![...](path) links of pictures a benchmark has not written yet."""
    return re.sub(r" ?!\[[^\]]*\]\(([^)]+)\)",
                  lambda m: m.group(0) if os.path.exists(os.path.join(ROOT, m.group(1))) else "", text)


def fill_blocks(text):
    for name in re.findall(r"<!-- results:(\w+) -->", text):
        body = table(name)
        if body is not None:
            text = re.sub(rf"<!-- results:{name} -->.*?<!-- /results:{name} -->",
                          lambda m: f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->", text,
                          flags=re.S)
            print("README: updated", name)
    return text


def results_md():
    out = ["# Results", "",
           "Every table here is written by a script in `benchmarks/` (its caption names the command, device, "
           "budget and protocol) and collected by `python benchmarks/update_readme.py`. CPU tables come from "
           "a 2-core machine at miniature budgets: they show the pipeline working and relative costs, not "
           "the papers' accuracies.", ""]
    for heading, names, reading in SECTIONS:
        bodies = [(n, table(n)) for n in names]
        if not any(b for _, b in bodies):
            continue
        out += [f"## {heading}", "", existing_pictures(reading), ""]
        for name, body in bodies:
            if body:
                out += [f"<!-- results:{name} -->", body, f"<!-- /results:{name} -->", ""]
    return "\n".join(out).rstrip() + "\n"


def main():
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(fill_blocks(text))
    with open(os.path.join(ROOT, "RESULTS.md"), "w") as f:
        f.write(results_md())
    print("wrote RESULTS.md")


if __name__ == "__main__":
    main()
