"""Method-side misuse: DetCon's mask cache after the images change, segmentation folders given to a training
script, method flags out of range (declared in each method's Args), and advice that fits the run."""
import dataclasses
import importlib
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import common
import densecl
import detcon
from conftest import tiny

METHODS = ("mocov3", "fast_moco", "densecl", "detcon", "rotation_aux")


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Training scripts run in-process here install SIGTERM/SIGUSR1 handlers: put the defaults back."""
    yield
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def refused(script, argv, capsys):
    """main(argv) of `script` in this process -> its one stderr line; it must exit with code 2."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------- DetCon's mask cache

def two_colour_images(folder, vertical, n=8, side=24):
    """n two-colour images written as folder/<i>.png: split left | right (vertical) or top / bottom."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = np.zeros((side, side, 3), np.uint8)
        img[...] = (40 + 20 * i, 200, 30)
        if vertical:
            img[:, side // 2 + i % 3:] = (250, 20, 200 - 10 * i)
        else:
            img[side // 2 - i % 3:] = (10, 60 + 15 * i, 240)
        Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))


class _Stop(Exception):
    pass


def stop(*args, **kwargs):
    raise _Stop


def masks_of_a_run(folder, cache, out, monkeypatch):
    """detcon.main on `folder` into the shared --mask-cache, stopped once its training data is built ->
    (the masked dataset it trains on, the masks it gives, number of FH calls it made)."""
    seen, calls, pretrain_data, fh_segments = {}, [], common.pretrain_data, detcon.fh_segments
    with monkeypatch.context() as m:
        m.setattr(common, "pretrain_data", lambda *a, **k: seen.setdefault("out", pretrain_data(*a, **k)))
        m.setattr(common, "knn_monitor", stop)  # called right after the masks are set up
        m.setattr(detcon, "fh_segments", lambda *a, **k: calls.append(1) or fh_segments(*a, **k))
        with pytest.raises(_Stop):
            detcon.main(tiny("detcon", out, "--preset", "cpu", "--data", str(folder), "--masks", "fh",
                             "--fh-size", "0", "--mask-cache", str(cache)))
        masked = seen["out"][0].base  # (dataset, steps per epoch): main then wraps the images in MaskedImages
        assert isinstance(masked, detcon.MaskedImages) and masked.cache_dir  # the cached path is tested
        masks = [masked[i][0][1] for i in range(len(masked))]
    return masked, masks, len(calls)


def test_mask_cache_recomputes_swapped_images_and_reuses_unchanged_ones(tmp_path, monkeypatch):
    """The images of a folder are replaced (same names, same mtimes, as a copy that keeps them would leave)
    between two runs sharing one --mask-cache: the second run's masks are a fresh computation on the new
    images, and a third run on the unchanged images computes nothing."""
    folder, cache = tmp_path / "data", tmp_path / "cache"
    two_colour_images(folder, vertical=True)
    stamps = {f: os.stat(folder / f).st_mtime_ns for f in os.listdir(folder)}
    _, first, n_first = masks_of_a_run(folder, cache, tmp_path / "run1", monkeypatch)
    assert n_first == len(first) == 8  # every mask computed once, then cached

    two_colour_images(folder, vertical=False)  # the swap: other pictures under the same names
    for f, ns in stamps.items():
        os.utime(folder / f, ns=(ns, ns))
    masked, second, _ = masks_of_a_run(folder, cache, tmp_path / "run2", monkeypatch)
    fresh = detcon.MaskedImages(common.FlatFolder(str(folder)), masked.args)  # no cache folder: computed
    for i, mask in enumerate(second):
        assert torch.equal(mask, fresh[i][0][1]), i  # the new image's masks ...
        assert not torch.equal(mask, first[i]), i  # ... which differ from the old image's

    _, third, n_third = masks_of_a_run(folder, cache, tmp_path / "run3", monkeypatch)
    assert n_third == 0 and all(torch.equal(a, b) for a, b in zip(third, second))  # cache hits


# ---------------------------------------------------------------------------- segmentation folders as --data

def segmentation_folder(root, n=8):
    """root/train/images/<i>.png and root/train/masks/<i>.png (eval_linear.py's seg layout)."""
    for sub in ("images", "masks"):
        os.makedirs(root / "train" / sub)
    for i in range(n):
        Image.new("RGB", (16, 16), (30 * i, 90, 200)).save(root / "train" / "images" / f"{i}.png")
        Image.new("L", (16, 16), i % 3).save(root / "train" / "masks" / f"{i}.png")


def voc_root(root, n=8):
    """root/VOCdevkit/VOC2012 with JPEGImages, SegmentationClass and ImageSets/Segmentation lists."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(voc / sub)
    for i in range(n):
        Image.new("RGB", (16, 16), (30 * i, 90, 200)).save(voc / "JPEGImages" / f"{i}.jpg")
        Image.new("P", (16, 16), i % 3).save(voc / "SegmentationClass" / f"{i}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in range(n)))
    return voc


@pytest.mark.parametrize("given", ["root", "root/train"])
def test_images_and_masks_folder_is_refused_naming_its_images(given, tmp_path, capsys):
    segmentation_folder(tmp_path / "root")
    data = tmp_path / given
    err = refused("mocov3", tiny("mocov3", tmp_path / "run", "--preset", "cpu", "--max-steps", "1",
                                 "--data", str(data)), capsys)
    images = tmp_path / "root" / "train" / "images"
    assert "segmentation folder" in err and err.endswith(f"give --data {images} to pretrain on its images")
    ds = common.load_folder(str(images), "train")  # the advice: the images, unlabeled, no mask among them
    assert len(ds) == 8 and set(ds.targets) == {-1}
    assert all(os.path.dirname(f) == str(images) for f in ds.files)


@pytest.mark.parametrize("given", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_is_refused_saying_what_training_expects(given, tmp_path, capsys):
    voc = voc_root(tmp_path)
    err = refused("densecl", tiny("densecl", tmp_path / "run", "--preset", "cpu", "--max-steps", "1",
                                  "--data", str(tmp_path / given)), capsys)
    assert "PASCAL VOC" in err and "expects a folder of images" in err and "ImageSets" not in err, err
    assert err.endswith(f"give --data {voc / 'JPEGImages'} to pretrain on its images")


# ---------------------------------------------------------------------------- method flag ranges

# one bad value per method flag that had no range check (and a value the old check let through)
NEWLY_CHECKED = [
    ("densecl", "--dense-weight", "2", ">= 0 and <= 1"),  # a negative weight on the global loss
    ("densecl", "--dense-weight", "-0.5", ">= 0 and <= 1"),
    ("densecl", "--dense-warmup-steps", "-3", ">= 0"),
    ("detcon", "--fh-size", "-5", ">= 0"),  # FH on a 1x1 image: one mask per image
    ("detcon", "--warmup-epochs", "-2", ">= 0 (or -1)"),  # only -1 means 1% of --epochs
    ("fast_moco", "--pred-dim", "-1", ">= 1 (or 0)"),
]
# entries moved from common.py's table into their methods': still checked, the inherited ones too
MOVED = [
    ("mocov3", "--temperature", "0", "> 0"), ("rotation_aux", "--trust-coefficient", "0", "> 0"),
    ("rotation_aux", "--rot-weight", "-1", ">= 0"), ("fast_moco", "--clip-grad", "-1", ">= 0"),
    ("fast_moco", "--grid", "0", ">= 1"), ("densecl", "--queue-size", "0", ">= 1"),
    ("densecl", "--shuffle-splits", "0", ">= 1"), ("detcon", "--grid-masks", "0", ">= 1"),
    ("detcon", "--momentum", "1.5", ">= 0 and <= 1"), ("detcon", "--crop-min", "nan", "> 0 and <= 1"),
]


@pytest.mark.parametrize("script,flag,value,bound", NEWLY_CHECKED + MOVED,
                         ids=[f"{s} {f} {v}" for s, f, v, _ in NEWLY_CHECKED + MOVED])
def test_method_flag_out_of_range_one_line_exit_2_before_any_work(script, flag, value, bound, tmp_path,
                                                                    capsys):
    err = refused(script, tiny(script, tmp_path / "run", flag, value), capsys)
    assert err.startswith(f"error: {flag} ") and err.endswith(f"is out of range: it must be {bound}"), err
    assert not (tmp_path / "run").exists()  # refused while parsing: nothing built or written


@pytest.mark.parametrize("script", METHODS)
def test_every_numeric_method_flag_has_a_range_in_its_method(script):
    """Each number a method's Args adds to the shared flags has a range in that method's Args.RANGES (or
    in a check that needs another flag, listed here); the shared flags keep theirs in common.py."""
    args = importlib.import_module(script).Args
    shared = {f.name for f in dataclasses.fields(common.CommonArgs)} | set(common.RANGES)
    checked_with_another_flag = {"rot_size", "combine"}  # --img-size, --grid: the methods' check_args
    numeric = {f.name for f in dataclasses.fields(args) if f.type in (int, float, "int", "float")}
    declared = {k for klass in args.__mro__ for k in vars(klass).get("RANGES", {})}
    assert numeric - shared - checked_with_another_flag <= declared
    assert not declared & (set(common.RANGES) - {"warmup_epochs"})  # detcon's -1: its own range


def test_dense_weight_at_its_bounds_is_accepted():
    for w in ("0", "1"):
        args = common.parse_args(densecl.Args, densecl.PRESETS, ["--dense-weight", w])
        assert args.dense_weight == float(w)
    args = common.parse_args(detcon.Args, detcon.PRESETS, ["--warmup-epochs", "-1"])
    assert args.warmup_epochs == -1  # detcon.check_args makes it 1% of --epochs


# ---------------------------------------------------------------------------- advice that fits the run

ADVICE = [("small", "7", "(use --img-size 9 or more)"),
          ("imagenet", "16", "(use --img-size 33 or more, or --stem small)")]


@pytest.mark.parametrize("stem,size,advice", ADVICE)
def test_densecl_too_small_image_advice_fits_the_stem(stem, size, advice, tmp_path, capsys):
    err = refused("densecl", tiny("densecl", tmp_path / "run", "--stem", stem, "--img-size", size), capsys)
    assert err.endswith(advice), err
    smallest = int(advice.split()[2])
    grid = [common.final_grid("resnet18", stem, s) for s in (smallest - 1, smallest)]
    assert grid == [1, 2]  # the advice is the smallest size that works


def test_densecl_blur_help_says_what_the_presets_do():
    doc = common.field_docs(densecl.Args)["blur"]
    for preset in densecl.PRESETS:
        assert common.parse_args(densecl.Args, densecl.PRESETS, ["--preset", preset]).blur, preset
    assert "every preset keeps it" in doc and "off for 32-px" not in doc
