"""DetCon's mask cost in the first epoch: Felzenszwalb-Huttenlocher per image in one process (= one loader
worker), for the imagenet preset (the official call: full resolution, scale 1000, min_size 1000, sigma 0.8)
and for the small presets' setting (<= 128 px, parameters scaled to the pixels), on imagenette2-224 images and
on scikit-image's photos of ImageNet size; with the cost of a cache hit (every later epoch) and the adjusted
Rand index of the small setting's segments against the official ones. Writes benchmarks/results/fh_cost.md.

  python benchmarks/fh_cost.py
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import common  # noqa: E402
import detcon  # noqa: E402
from bench import IMAGENETTE  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's photos: 512x512 to 640x427
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's train split, for the first-epoch estimate


def ari(a, b):
    """Adjusted Rand index of two labelings of the same pixels: 1 = the same partition, ~0 = unrelated."""
    def pairs(counts):
        counts = counts.astype(np.float64)
        return (counts * (counts - 1) / 2).sum()
    both = pairs(np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0, return_counts=True)[1])
    pa, pb = pairs(np.unique(a, return_counts=True)[1]), pairs(np.unique(b, return_counts=True)[1])
    expected = pa * pb / pairs(np.array([a.size]))
    return (both - expected) / ((pa + pb) / 2 - expected)


def timed(masker, images, reps):
    """(median over `reps` passes of ms per image, the masks of the last pass)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        masks = [masker.mask(im).numpy() for im in images]
        times.append(1000 * (time.perf_counter() - t) / len(images))
    return statistics.median(times), masks


def rows_for(name, images, reps):
    """Table rows of one image set: the official setting (with its cache hit) and the small presets'."""
    official = common.parse_args(detcon.Args, detcon.PRESETS, ["--preset", "imagenet"])
    small = common.parse_args(detcon.Args, detcon.PRESETS, ["--preset", "cpu"])
    ms, ref = timed(detcon.MaskedImages([], official), images, reps)  # no cache folder: computed
    with tempfile.TemporaryDirectory() as d:
        cached = detcon.MaskedImages([], official, d, 0)
        timed(cached, images, 1)  # the first epoch fills the cache
        hit, _ = timed(cached, images, reps)
    ms_small, out = timed(detcon.MaskedImages([], small), images, reps)
    w, h = images[0].size
    f = min(1.0, small.fh_size / max(w, h))
    segs = lambda masks: np.mean([len(np.unique(m)) for m in masks])  # noqa: E731
    ari_small = np.mean([ari(a, b) for a, b in zip(out, ref)])
    return ms, [f"| {name} | {w}x{h} | official (imagenet preset) | {w}x{h} | {ms:.1f} | {hit:.1f} | "
                f"{segs(ref):.1f} | 1 |",
                f"| {name} | {w}x{h} | scaled (cifar, cpu presets) | {round(w * f)}x{round(h * f)} | "
                f"{ms_small:.1f} | - | {segs(out):.1f} | {ari_small:.2f} |"]


@common.user_errors
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16, help="imagenette2-224 train images (2 per class)")
    ap.add_argument("--reps", type=int, default=3, help="timed passes; the median is reported")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fh_cost.md"))
    a = ap.parse_args(argv)
    detcon._felzenszwalb()  # BadInput without scikit-image
    from skimage import data
    sets = [(p, [Image.fromarray(getattr(data, p)())]) for p in PHOTOS]
    if os.path.isdir(IMAGENETTE):
        train = os.path.join(IMAGENETTE, "train")
        files = [os.path.join(train, c, f) for c in sorted(os.listdir(train))
                 for f in sorted(os.listdir(os.path.join(train, c)))[:2]][:a.images]
        sets.insert(0, (f"imagenette2-224 ({len(files)} images)", [common.load_image(f) for f in files]))
    lines, photo_ms = [], []
    for name, images in sets:
        ms, rows = rows_for(name, images, a.reps)
        lines += rows
        photo_ms += [ms] if name in PHOTOS else []
        print(*rows, sep="\n", flush=True)
    per = statistics.mean(photo_ms)
    hours = per * IMAGENET_TRAIN / 1000 / 3600
    caption = (
        f"Device: CPU ({platform.machine()}; scikit-image's felzenszwalb is single-threaded). Command: "
        f"`python benchmarks/fh_cost.py`. DetCon's Felzenszwalb-Huttenlocher masks, ms per image in one "
        f"process (= one loader worker), median of {a.reps} passes. Official: full resolution, scale 1000, "
        f"min_size 1000, sigma 0.8 (the imagenet preset); scaled: the image scaled to <= 128 px, scale and "
        f"min_size scaled to its pixels (--fh-size 128 --fh-scale 0 --fh-min-size 0, the cifar and cpu "
        f"presets). Cache hit: reading the 16-bit PNG back in every epoch after the first (--mask-cache). "
        f"ARI: adjusted Rand index of the scaled segments (upsampled nearest, as training uses them) against "
        f"the official ones; 1 = the same partition. On the ImageNet-size photos the official call costs "
        f"{per:.0f} ms per image on average, so the first epoch of ImageNet-1k ({IMAGENET_TRAIN:,} images) "
        f"spends about {hours:.0f} worker-hours on masks: {hours * 60 / 64:.0f} min with 8 loader workers on "
        f"each of 8 GPUs, on top of decoding and augmenting; later epochs read the cache.")
    table = [caption, "", "| images | size | FH | FH runs at | ms/image | cache hit ms | segments/image | "
             "ARI vs official |", "|---|---|---|---|---|---|---|---|", *lines]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(table) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
