"""--gpu-aug: the batched device ops against torchvision's functional ops, per-sample parameters, the PIL
path's recipes and distribution, seeding, and a resumed --gpu-aug run against the uninterrupted one."""
import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from PIL import Image, ImageFilter

import common
import mocov3
from conftest import TINY, losses

KERNEL = 13  # the kernel rule: 2 * ceil(3 * 2.0) + 1 taps for every sigma (3 sigma of the largest one)
TOL = 1e-5  # float32 formulas re-ordered (closed-form HSV, separable blur) vs torchvision's


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quantised_batch(n, size=16, seed=0):
    """Random images on a 1/8 grid of levels: many grey pixels and channel ties, the edge cases of HSV."""
    return (torch.rand(n, 3, size, size, generator=gen(seed)) * 8).round() / 8  # [n, 3, size, size]


def real_image(imagenette, size, k=0):
    root = os.path.join(imagenette, "train", "n01440764")
    img = Image.open(os.path.join(root, sorted(os.listdir(root))[k])).convert("RGB")
    return img.resize((size, size), Image.BILINEAR)


def to_float(img):
    return TF.pil_to_tensor(img).float() / 255  # [3, H, W]


def augment(x, recipe, seed):
    """The device pipeline on x [N, 3, H, W] with parameters drawn from a generator seeded with `seed`."""
    return common.apply_photometric(x, common.sample_photometric(recipe, x.shape[0], gen(seed)), recipe)


def unnormalize(y):
    std, mean = torch.tensor(common.STD)[:, None, None], torch.tensor(common.MEAN)[:, None, None]  # [3, 1, 1]
    return y * std + mean  # [N, 3, H, W]


TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def reference(x, p, i, recipe):
    """Sample i of the device pipeline, op by op with torchvision on the single image x [3, H, W]."""
    if p["jitter"][i]:
        for j in p["order"][i].tolist():
            x = TV_JITTER[j](x, float(p["factors"][i, j]))
    if p["gray"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if recipe.blur_p > 0 and p["blur"][i]:
        x = TF.gaussian_blur(x, [KERNEL, KERNEL], [float(p["sigma"][i])] * 2)
    if recipe.solarize_p > 0 and p["solarize"][i]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, common.MEAN, common.STD)


def bcs(op):
    """common.adjust_bcs (the op the device pipeline runs) with every sample on one op: 0 brightness,
    1 contrast, 2 saturation; f [N] the per-sample factors."""
    def run(x, f):
        factors = torch.ones(len(f), 4)
        factors[:, op] = f
        return common.adjust_bcs(x, torch.full((len(f),), op), factors)
    return run


@pytest.mark.parametrize("name,ours,theirs,factors", [
    ("brightness", bcs(0), TF.adjust_brightness, [0.6, 1.0, 1.23, 1.4]),
    ("contrast", bcs(1), TF.adjust_contrast, [0.6, 0.91, 1.0, 1.4]),
    ("saturation", bcs(2), TF.adjust_saturation, [0.0, 0.8, 1.0, 1.4]),
    ("hue", common.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.07, 0.5]),
])
def test_jitter_ops_equal_torchvision_per_sample(name, ours, theirs, factors):
    x = quantised_batch(4)
    got = ours(x, torch.tensor(factors))  # [4, 3, H, W]: one factor per sample
    for i, f in enumerate(factors):
        torch.testing.assert_close(got[i], theirs(x[i], f), rtol=0, atol=TOL, msg=f"{name} factor {f}")


def test_factor_one_is_the_identity_exactly():
    x = quantised_batch(2)
    one = torch.ones(2)
    for fn in (bcs(0), bcs(1), bcs(2)):
        assert torch.equal(fn(x, one), x)  # what lets the pipeline skip an op by its factor
    assert torch.equal(common.adjust_bcs(x, torch.full((2,), -1), torch.full((2, 4), 0.5)), x)  # op -1: none


def test_grayscale_solarize_and_flip_equal_torchvision():
    x = quantised_batch(3)
    # the device path calls torchvision's batched grayscale and solarize: each image as the per-image call
    for i in range(3):
        gray = F2.rgb_to_grayscale(x)[i].expand(3, -1, -1)
        torch.testing.assert_close(gray, TF.rgb_to_grayscale(x[i], num_output_channels=3), rtol=0, atol=TOL)
        assert torch.equal(F2.solarize(x, 128 / 255)[i], TF.solarize(x[i], 128 / 255))
    # flip: done in the worker, which is right only if it commutes with the whole device pipeline
    recipe = common.Photometric(blur_p=1.0, solarize_p=1.0)
    p = common.sample_photometric(recipe, 3, gen(3))
    p["jitter"][:] = True
    flipped_after = TF.hflip(common.apply_photometric(x, p, recipe))
    flipped_before = common.apply_photometric(TF.hflip(x), p, recipe)
    torch.testing.assert_close(flipped_before, flipped_after, rtol=0, atol=TOL)


def test_blur_equals_torchvision_gaussian_blur_with_the_13_tap_kernel():
    x = quantised_batch(4, size=20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = common.gaussian_blur(x, sigma)
    for i in range(4):
        want = TF.gaussian_blur(x[i], [KERNEL, KERNEL], [float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, rtol=0, atol=TOL)


def test_blur_close_to_pils_radius_blur_of_the_pil_path(imagenette):
    """The PIL path's GaussianBlur(radius=sigma) is an extended box blur in uint8: away from the borders
    (where the paddings differ) the device Gaussian is within 1 grey level on average, 4 at worst."""
    img = real_image(imagenette, 96)
    x = to_float(img)[None]
    for s in (0.5, 1.0, 2.0):
        ours = common.gaussian_blur(x, torch.tensor([s]))[0]
        pil = to_float(img.filter(ImageFilter.GaussianBlur(radius=s)))
        d = (ours - pil)[:, 8:-8, 8:-8].abs() * 255  # grey levels
        assert d.mean() < 1.0 and d.max() < 4.0, (s, float(d.mean()), float(d.max()))


def test_pipeline_equals_torchvision_op_by_op_in_each_samples_order():
    x = quantised_batch(12, size=16, seed=1)
    for recipe in (common.Photometric(blur_p=0.5, solarize_p=0.5), common.Photometric((0.4, 0.4, 0.4, 0.1))):
        p = common.sample_photometric(recipe, 12, gen(2))
        got = common.apply_photometric(x, p, recipe)
        for i in range(12):
            torch.testing.assert_close(got[i], reference(x[i], p, i, recipe), rtol=0, atol=1e-4,
                                       msg=f"sample {i}")  # 1e-4: TOL divided by the std (~0.22)


def test_two_samples_of_a_batch_get_their_own_parameters():
    recipe = common.Photometric(blur_p=1.0)
    p = common.sample_photometric(recipe, 2, gen(0))
    assert (p["factors"][0] != p["factors"][1]).all() and p["sigma"][0] != p["sigma"][1]
    p["jitter"][:] = True
    x = quantised_batch(1).expand(2, -1, -1, -1)  # the same image twice
    y = common.apply_photometric(x, p, recipe)
    assert not torch.allclose(y[0], y[1], atol=1e-2)


def test_jitter_order_is_a_permutation_drawn_per_sample_and_applied():
    recipe = common.Photometric()
    p = common.sample_photometric(recipe, 256, gen(0))
    order = p["order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(256, 4))  # each row a permutation
    assert len({tuple(r) for r in order.tolist()}) == 24  # all 4! orders occur in 256 draws
    # the ops before and after the hue (which runs once per batch) rebuild each order; none when jitter is off
    perms = torch.tensor(list(itertools.permutations(range(4))))  # [24, 4]
    for on in (True, False):
        pre, post = common.jitter_slots(perms, torch.full((24,), on))
        for i, perm in enumerate(perms.tolist()):
            ops = [o for o in pre[i].tolist() if o >= 0] + [3] + [o for o in post[i].tolist() if o >= 0]
            assert ops == (perm if on else [3]), (perm, pre[i], post[i])
    # two samples with the same image and factors but opposite orders: each follows its own order
    q = {k: v[:2].clone() for k, v in p.items()}
    q["factors"][1], q["jitter"][:] = q["factors"][0], True
    q["order"][0], q["order"][1] = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    x = quantised_batch(1, seed=4).expand(2, -1, -1, -1)
    y = common.apply_photometric(x, q, recipe)
    for i in range(2):
        torch.testing.assert_close(y[i], reference(x[i], q, i, recipe), rtol=0, atol=1e-4)
    assert not torch.allclose(y[0], y[1], atol=1e-3)


def test_probabilities_and_ranges_over_a_large_batch():
    n = 20_000  # binomial std of a fraction <= 0.0035: the 0.02 bounds are > 5 std wide
    recipe = common.Photometric(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)
    p = common.sample_photometric(recipe, n, gen(0))
    for key, want in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.2)):
        assert abs(p[key].float().mean().item() - want) < 0.02, key
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    f = p["factors"]
    assert ((f >= lo) & (f <= hi)).all() and torch.allclose(f.mean(0), (lo + hi) / 2, atol=0.01)
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0 and abs(p["sigma"].mean() - 1.05) < 0.02


def test_grayscale_reaches_a_fifth_of_the_outputs():
    n = 4000  # binomial std of the fraction 0.0063: 0.03 is ~5 std
    x = torch.rand(n, 3, 8, 8, generator=gen(0))  # colourful: never grey by chance
    recipe = common.Photometric(blur_p=0.0)
    y = unnormalize(augment(x, recipe, 1))
    grey = (y.amax(1) - y.amin(1)).amax((1, 2)) < 1e-5  # [n] all three channels equal
    assert abs(grey.float().mean().item() - 0.2) < 0.03


def view_list(recipe, img_size=32, crop_min=0.2, geometry=True):
    """A view written as a method writes it, from the recipe the device should read off it."""
    ops = [T.RandomApply([T.ColorJitter(*recipe.jitter)], p=0.8), T.RandomGrayscale(p=0.2),
           T.RandomApply([common.RandomBlur()], p=recipe.blur_p),
           *([T.RandomSolarize(threshold=128, p=recipe.solarize_p)] if recipe.solarize_p else [])]
    if not geometry:
        return [*ops, T.ToTensor(), T.Normalize(common.MEAN, common.STD)]
    crop = T.RandomResizedCrop(img_size, scale=(crop_min, 1.0))
    return [crop, *ops, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(common.MEAN, common.STD)]


BYOL = (common.Photometric(blur_p=1.0), common.Photometric(blur_p=0.1, solarize_p=0.2))  # MoCo v3's paper
MOCOV2 = common.Photometric(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)  # MoCo v2's (--aug-plus)


@pytest.mark.parametrize("lists,blur,want", [
    ("mocov3", True, BYOL),
    ("mocov3", False, tuple(dataclasses.replace(r, blur_p=0.0) for r in BYOL)),
    ("fast_moco", True, (MOCOV2, MOCOV2)), ("densecl", True, (MOCOV2, MOCOV2)),
    ("densecl", False, (dataclasses.replace(MOCOV2, blur_p=0.0),) * 2),
])
def test_device_recipes_are_the_methods_lists(lists, blur, want):
    """What --gpu-aug and --data-on-device run is read off each method's literal transform lists."""
    import importlib
    module = importlib.import_module(lists)
    pair = (module.byol_augmentations(32, 0.3, blur) if lists == "mocov3"
            else (module.mocov2_augmentation(32, 0.3, blur),) * 2)
    gpu, pil = common.TwoViews(*pair, gpu=True), common.TwoViews(*pair)
    assert gpu.photometric == want and pil.photometric is None and gpu.on_device == (32, 0.3, want)
    assert all(isinstance(t, T.Compose) and t.transforms == lst for t, lst in zip((pil.t1, pil.t2), pair))


@pytest.mark.parametrize("recipe", [*BYOL, MOCOV2, common.Photometric(jitter=(0.3, 0.0, 0.1, 0.0))])
def test_device_recipe_reads_every_field_and_the_crop(recipe):
    assert common.device_recipe(view_list(recipe, 48, 0.35)) == (48, 0.35, recipe)
    assert common.device_recipe(view_list(recipe, geometry=False)) == (None, None, recipe)


@pytest.mark.parametrize("change", ["swap jitter and gray", "jitter p 0.5", "extra op", "no normalize",
                                    "other mean", "non-square crop", "solarize threshold 100"])
def test_device_recipe_refuses_a_list_the_device_would_not_reproduce(change):
    ops = view_list(common.Photometric(solarize_p=0.2))
    if change == "swap jitter and gray":
        ops[1], ops[2] = ops[2], ops[1]
    elif change == "jitter p 0.5":
        ops[1] = T.RandomApply(ops[1].transforms, p=0.5)
    elif change == "extra op":
        ops.insert(5, T.RandomVerticalFlip())
    elif change == "no normalize":
        ops.pop()
    elif change == "other mean":
        ops[-1] = T.Normalize((0.5, 0.5, 0.5), common.STD)
    elif change == "non-square crop":
        ops[0] = T.RandomResizedCrop((32, 48), scale=(0.2, 1.0))
    else:
        ops[4] = T.RandomSolarize(threshold=100, p=0.2)
    with pytest.raises(ValueError):
        common.device_recipe(ops)


@pytest.mark.parametrize("recipe", [common.Photometric(), common.Photometric(blur_p=0.1, solarize_p=0.2),
                                    common.Photometric(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)])
def test_distribution_matches_the_pil_path(recipe, imagenette):
    """Same image, 2000 draws each: the PIL path's photometric ops (a view without its crop, flip) and the
    device's give the same average per-channel mean and std and spread of the means (the residue, <= 0.003
    here, is PIL's uint8 rounding between ops and its box blur) and the same grey fraction (within its
    binomial noise); dropping solarize, blurring with p 0.5 instead of 0.1, jittering always, sharing one draw
    per batch or triple hue move a moment by 0.008 or more."""
    n, img = 2000, real_image(imagenette, 32, k=3)
    photo = T.Compose(view_list(recipe, geometry=False))
    torch.manual_seed(0)
    pil = torch.stack([photo(img) for _ in range(n)])  # [n, 3, 32, 32]
    x = to_float(img).expand(n, -1, -1, -1).contiguous()
    dev = augment(x, recipe, 0)

    def stats(y):
        y = unnormalize(y)  # [n, 3, H, W]
        m = y.mean((2, 3))  # [n, 3]
        grey = ((y.amax(1) - y.amin(1)).amax((1, 2)) < 1e-3).float().mean()
        return torch.cat([m.mean(0), y.std((2, 3)).mean(0), m.std(0), grey[None]])  # [10]

    d = (stats(dev) - stats(pil)).abs()
    assert d[:9].max() < 0.005, np.round(d.numpy(), 4)
    assert d[9] < 3 * math.sqrt(2 * 0.2 * 0.8 / n)  # grey fraction: 3 sd of two binomial estimates at p 0.2


def test_worker_side_is_crop_and_flip_to_uint8():
    views = common.TwoViews(*mocov3.byol_augmentations(32, 0.3), gpu=True)
    ds = common.Views(common.Synthetic(4), views, seed=1)
    (v1, v2), _ = ds[2]
    assert v1.dtype == v2.dtype == torch.uint8 and v1.shape == v2.shape == (3, 32, 32)
    img = ds.base[2][0]
    with torch.random.fork_rng(devices=[]):  # the seed Views uses for sample 2 at epoch 0
        torch.manual_seed((1 * 1_000_003 + 0) * 10_000_019 + 2)
        want = []
        for _ in range(2):
            box = T.RandomResizedCrop.get_params(img, (0.3, 1.0), (3 / 4, 4 / 3))  # the PIL path's draws
            view = F2.resized_crop(TF.pil_to_tensor(img), *box, [32, 32], antialias=True)  # [3, 32, 32] uint8
            pil = TF.pil_to_tensor(TF.resized_crop(img, *box, [32, 32]))  # the PIL path's resize of that box
            assert (view.int() - pil.int()).abs().max() <= 1  # grey levels
            want.append(TF.hflip(view) if torch.rand(1) < 0.5 else view)
    assert torch.equal(v1, want[0]) and torch.equal(v2, want[1])


def fake_run(channels_last=False, rank=0, seed=0):
    args = mocov3.Args(channels_last=channels_last, seed=seed)
    return common.Run(args, "mocov3", rank, 1, torch.device("cpu"), "")


def test_finish_seeded_by_seed_rank_and_step_and_leaves_the_global_rng():
    views = common.TwoViews(*mocov3.byol_augmentations(16, 0.2), gpu=True)
    x1, x2 = (torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2))
    state = torch.get_rng_state()
    a = views.finish(fake_run(), x1, x2, step=7)
    assert torch.equal(state, torch.get_rng_state())
    assert all(t.dtype == torch.float32 and t.shape == (4, 3, 16, 16) for t in a)
    assert all(torch.equal(s, t) for s, t in zip(a, views.finish(fake_run(), x1, x2, step=7)))
    for other in (views.finish(fake_run(), x1, x2, step=8), views.finish(fake_run(rank=1), x1, x2, step=7),
                  views.finish(fake_run(seed=1), x1, x2, step=7)):
        assert not torch.allclose(a[0], other[0]) and not torch.allclose(a[1], other[1])
    cl = views.finish(fake_run(channels_last=True), x1, x2, step=7)
    assert all(t.is_contiguous(memory_format=torch.channels_last) and torch.equal(t, s)
               for s, t in zip(a, cl))


def test_finish_without_gpu_aug_is_to_device():
    views, run = common.TwoViews(*mocov3.byol_augmentations(16, 0.2)), fake_run(channels_last=True)
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    y1, y2 = views.finish(run, x1, x2, step=0)
    assert torch.equal(y1, x1) and torch.equal(y2, x2) and y1.is_contiguous(memory_format=torch.channels_last)


def test_mocov3_gpu_aug_feeds_uint8_crops_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    """The workers hand uint8 crops to the device ops (both views' recipes, every step), and a resumed
    --gpu-aug run equals the uninterrupted one."""
    seen, device_view = [], common.device_view

    def spy(run, x, recipe, gen):
        seen.append((x.dtype, recipe))
        return device_view(run, x, recipe, gen)

    monkeypatch.setattr(common, "device_view", spy)
    # as tests/test_reliability.py: 2 steps per epoch, the resume after step 1 is mid-epoch, step 3 is in the
    # next epoch
    common_ = [*TINY, "--synthetic-size", "16", "--epochs", "3", "--gpu-aug", "--blur"]  # --blur: all ops
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mocov3.main([*common_, "--output-dir", a, "--max-steps", "3"])
    assert [d for d, _ in seen] == [torch.uint8] * 6
    assert [r for _, r in seen] == list(BYOL) * 3  # MoCo v3's two recipes, blur on
    mocov3.main([*common_, "--output-dir", b, "--max-steps", "1"])
    capsys.readouterr()
    mocov3.main([*common_, "--output-dir", b, "--max-steps", "3", "--resume", "auto"])
    assert "resumed from" in capsys.readouterr().out
    la, lb = losses(a), losses(b)
    assert len(la) == 3 and len(lb) == 3
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)


def test_detcon_colour_is_mocov3s_views_without_their_geometry():
    """DetCon's worker-side colour ops (detcon.byol_colour) are MoCo v3's views less crop and flip, transform
    for transform, so both methods train on BYOL's pair; the device reads the same recipes off both."""
    import detcon
    for blur in (True, False):
        geometry = (T.RandomResizedCrop, T.RandomHorizontalFlip)
        for full, mine in zip(mocov3.byol_augmentations(32, 0.3, blur), detcon.byol_colour(blur)):
            rest = [t for t in full if not isinstance(t, geometry)]
            assert [repr(t) for t in mine] == [repr(t) for t in rest]
            assert common.device_recipe(mine)[2] == common.device_recipe(full)[2]
        assert detcon.JointViews(32, 0.3, blur, 4, gpu=True).photometric == (BYOL if blur else tuple(
            dataclasses.replace(r, blur_p=0.0) for r in BYOL))


def test_detcon_gpu_aug_runs_and_resumes_exactly(tmp_path):
    import detcon
    argv = [*TINY, "--stem", "small", "--img-size", "16", "--gpu-aug", "--synthetic-size", "16",
            "--epochs", "2", "--max-steps", "3"]  # 2 steps per epoch: stopped mid-epoch, resumed across it
    a, b = tmp_path / "a", tmp_path / "b"
    detcon.main([*argv, "--output-dir", str(a)])
    detcon.main([*argv, "--output-dir", str(b), "--max-steps", "1"])
    detcon.main([*argv, "--output-dir", str(b), "--resume", "auto"])
    assert losses(str(a)) == pytest.approx(losses(str(b)), rel=1e-6, abs=1e-7) and len(losses(str(a))) == 3
