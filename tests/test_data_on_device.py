"""--data-on-device: the held split, the batched crop samplers against torchvision's and DetCon's, the crop
against torchvision's resized_crop, masks that follow the image, exact resumes, and --time-limit."""
import glob
import time
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

import common
import detcon
import eval_linear
import mocov3
from conftest import TINY, losses, read_log

BYOL = common.TwoViews(*mocov3.byol_augmentations(32, 0.2)).on_device[2]  # MoCo v3's two recipes


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    cdf = lambda x: np.searchsorted(x, grid, "right") / len(x)  # noqa: E731
    return np.abs(cdf(a) - cdf(b)).max()


def fake_run(**kw):
    args = mocov3.Args(data_on_device=True, **kw)
    return common.Run(args, "mocov3", 0, 1, torch.device("cpu"), "")


@pytest.mark.parametrize("h, w, scale", [(160, 160, (0.2, 1.0)), (100, 300, (0.08, 1.0))])
def test_rrc_boxes_have_torchvisions_distribution(h, w, scale):
    """Area, aspect, top and left of 20,000 boxes each: the two-sample KS distance under its 0.1% critical
    value (1.95 sqrt(2 / n)); the 100x300 image makes many draws miss, so the retries matter."""
    n = 20_000
    ours = common.rrc_boxes(n, h, w, scale, gen(0)).numpy()  # [n, 4] top, left, height, width
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    theirs = np.array([T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(n)],
                      dtype=np.float64)
    feats = lambda b: {"area": b[:, 2] * b[:, 3], "aspect": b[:, 3] / b[:, 2], "top": b[:, 0],  # noqa: E731
                       "left": b[:, 1]}
    bound = 1.95 * np.sqrt(2 / n)
    for key, a in feats(ours).items():
        assert ks_distance(a, feats(theirs)[key]) < bound, key
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()


def test_rrc_boxes_fall_back_to_torchvisions_centre_crop():
    """A 40x400 image with scale >= 0.5: no draw fits, every box is torchvision's fallback."""
    boxes = common.rrc_boxes(64, 40, 400, (0.5, 1.0), gen(1))
    want = T.RandomResizedCrop.get_params(torch.zeros(3, 40, 400), (0.5, 1.0), (3 / 4, 4 / 3))
    assert (boxes == torch.tensor(want, dtype=boxes.dtype)).all()


def test_two_samples_of_a_batch_get_their_own_boxes_and_views():
    boxes = common.rrc_boxes(8, 64, 64, (0.08, 1.0), gen(2))
    assert len({tuple(b) for b in boxes.tolist()}) == 8
    x = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8).expand(6, -1, -1, -1).contiguous()
    v1, v2_ = common.device_views(fake_run(), x, 0, 32, 0.2, BYOL)
    for v in (v1, v2_):
        assert v.shape == (6, 3, 32, 32) and all(not torch.equal(v[0], v[i]) for i in range(1, 6))


def test_detcon_crop_windows_are_byols_window_for_the_same_draws():
    """The batched official sampler against a plain-Python transcription of BYOL's get_random_crop_window on
    the same uniforms (round half to even, as jnp.round), and crop_box is its first row."""
    def byol(u, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[1])
        bw, bh = min(max(1, round(np.sqrt(area * aspect))), w), min(max(1, round(np.sqrt(area / aspect))), h)
        return [int(u[2] * (h - bh + 1)), int(u[3] * (w - bw + 1)), bh, bw]
    for h, w in ((160, 160), (75, 200)):
        u = torch.rand(300, 4, generator=gen(h), dtype=torch.float64)
        got = detcon.crop_windows(u, h, w).tolist()
        assert got == [byol(row, h, w) for row in u.tolist()]
        assert list(detcon.crop_box(h, w, generator=gen(7))) == byol(torch.rand(
            4, generator=gen(7), dtype=torch.float64).tolist(), h, w)


def test_crop_resize_is_close_to_torchvisions_antialiased_resized_crop(imagenette):
    """roi_align's box filter against resized_crop(antialias=True) on a real image: on average within 2
    grey levels, 99% of the pixels within 8 (the largest gaps sit on the box edges, where roi_align reads
    the pixels just outside the box and resized_crop repeats the edge)."""
    path = sorted(glob.glob(os.path.join(imagenette, "train", "*", "*")))[0]
    img = Image.open(path).convert("RGB").resize((160, 160), Image.BILINEAR)
    x = v2.functional.pil_to_tensor(img).float()[None] / 255
    for box in [(0, 0, 160, 160), (10, 20, 150, 100), (30, 40, 40, 40), (5, 7, 90, 120), (100, 100, 13, 21)]:
        ours = common.crop_resize(x, torch.tensor([box], dtype=torch.float64), 64)
        ref = v2.functional.resized_crop(x, *box, size=[64, 64], antialias=True)
        diff = (ours - ref).abs() * 255
        assert diff.mean() < 2 and diff.quantile(0.99) < 8, box
    same = common.crop_resize(x, torch.tensor([(0, 0, 64, 64)], dtype=torch.float64), 64)
    assert torch.allclose(same, x[..., :64, :64], atol=1e-6)  # a box of the output's size is a plain crop


def test_crop_ids_is_nearest_exact_of_each_box():
    ids = torch.randint(0, 50, (5, 40, 60), generator=gen(3))
    boxes = detcon.crop_windows(torch.rand(5, 4, generator=gen(4), dtype=torch.float64), 40, 60)
    got = detcon.crop_ids(ids, boxes, 16)
    for i, (t, left, bh, bw) in enumerate(boxes.long().tolist()):
        assert torch.equal(got[i], detcon.nearest_exact(ids[i, t:t + bh, left:left + bw], 16))


def test_relabel_is_torch_unique_per_image():
    cells = torch.randint(0, 40, (6, 2, 4, 4), generator=gen(5)) * 3
    got = detcon.relabel(cells)
    for i in range(6):
        assert torch.equal(got[i], torch.unique(cells[i], return_inverse=True)[1])


def test_detcon_masks_follow_the_image_crop_and_flip_exactly():
    """A black image whose right part is white carries ids 0 (left) and 1 (right). With the colour ops off and
    a pixel-level grid, every pixel the crop leaves exactly black or white has the id of its side, in both
    views, through the same boxes and flips (flips happen: some views have the white part on the left)."""
    n, s, size = 16, 48, 24
    ids = (torch.arange(s) >= 20).long().expand(n, s, s).contiguous()  # [n, S, S]: 1 right of column 20
    x = (255 * ids).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()  # [n, 3, S, S]
    views = detcon.JointViews(size, 0.08, False, grid=size)
    views.recipes = (common.Photometric(jitter=(0, 0, 0, 0), blur_p=0.0),) * 2  # no colour: pixels stay 0/1
    out = views.finish_joint(fake_run(), x, ids, x, ids, step=3)
    white_left = 0
    for v, cells in ((out[0], out[1]), (out[2], out[3])):
        v = v[:, 0] * common.STD[0] + common.MEAN[0]  # [n, size, size] back to [0, 1]
        for i in range(n):
            black, white = v[i] < 1e-4, v[i] > 1 - 1e-4
            assert black.any() or white.any()
            c = cells[i]
            assert len(c[black].unique()) <= 1 and len(c[white].unique()) <= 1
            if black.any() and white.any():
                assert c[black][0] != c[white][0]
                white_left += int(white[:, 0].float().mean() > black[:, 0].float().mean())
    assert white_left > 0  # some views were flipped, and their masks with them


def test_store_size_defaults():
    assert common.store_size(mocov3.Args(data="synthetic", img_size=32)) == 64
    assert common.store_size(mocov3.Args(data="cifar10", img_size=32)) == 32
    assert common.store_size(mocov3.Args(data="/some/folder", img_size=128)) == 160
    assert common.store_size(mocov3.Args(data="/some/folder", img_size=128, store_size=144)) == 144


def test_held_split_decodes_a_folder_once_and_evaluates_like_eval_transform(imagenette):
    """Imagenette images stored at 160 px (resize + centre crop), uint8 on the device; eval_batches is the
    eval transform (resize to 256/224 of the crop, centre crop) within a few grey levels of the PIL path's."""
    args = mocov3.Args(data=imagenette, img_size=128, workers=0)
    base = common.Subset(common.load_dataset(args, "val"), range(0, 1000, 125))  # 8 images
    held = common.held_split(args, fake_run(data=imagenette, img_size=128, workers=0), base)
    assert held.images.shape == (8, 3, 160, 160) and held.images.dtype == torch.uint8
    assert held.targets == [base[i][1] for i in range(8)]
    x, y = next(held.eval_batches(list(range(8)), 8, 128))
    pil = common.eval_transform(128)
    ref = torch.stack([pil(T.Resize(160)(base[i][0])) for i in range(8)])  # the PIL path on the stored size
    std = torch.tensor(common.STD)[:, None, None]
    assert x.shape == (8, 3, 128, 128) and ((x - ref).abs() * std * 255).mean() < 2
    assert y.tolist() == held.targets


def test_held_split_batches_follow_the_samplers_order():
    images = torch.arange(20, dtype=torch.uint8).reshape(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    held = common.HeldSplit(images, torch.arange(20))
    order = list(reversed(range(20)))
    batches = list(held.batches(order, 6))
    assert len(batches) == 3  # drop_last
    for k, ((x1, x2), y) in enumerate(batches):
        assert y.tolist() == order[6 * k:6 * k + 6] and x1 is x2 and x1[:, 0, 0, 0].tolist() == y.tolist()


def test_mocov3_data_on_device_draws_on_the_device_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    """Every step's views come from the stored uint8 images through device_views, and a resumed run equals the
    uninterrupted one (2 steps per epoch: stopped mid-epoch, resumed across the epoch boundary)."""
    seen, device_views = [], common.device_views

    def spy(run, x, step, *rest):
        seen.append((x.dtype, tuple(x.shape), step))
        return device_views(run, x, step, *rest)

    monkeypatch.setattr(common, "device_views", spy)
    argv = [*TINY, "--synthetic-size", "16", "--epochs", "3", "--data-on-device", "--blur"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mocov3.main([*argv, "--output-dir", a, "--max-steps", "3"])
    assert seen == [(torch.uint8, (8, 3, 64, 64), s) for s in range(3)]  # synthetic: stored at 64 px
    mocov3.main([*argv, "--output-dir", b, "--max-steps", "1"])
    capsys.readouterr()
    mocov3.main([*argv, "--output-dir", b, "--max-steps", "3", "--resume", "auto"])
    assert "resumed from" in capsys.readouterr().out
    assert len(losses(a)) == 3 and losses(a) == pytest.approx(losses(b), rel=1e-6, abs=1e-7)


def test_detcon_data_on_device_runs_and_resumes_exactly(tmp_path):
    argv = [*TINY, "--stem", "small", "--img-size", "16", "--data-on-device", "--synthetic-size", "16",
            "--epochs", "2", "--max-steps", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    detcon.main([*argv, "--output-dir", str(a)])
    detcon.main([*argv, "--output-dir", str(b), "--max-steps", "1"])
    detcon.main([*argv, "--output-dir", str(b), "--resume", "auto"])
    assert losses(str(a)) == pytest.approx(losses(str(b)), rel=1e-6, abs=1e-7) and len(losses(str(a))) == 3
    assert all(0 < r["matched"] <= 1 for r in read_log(str(a)) if "matched" in r)


def test_time_limit_ends_the_run_cleanly(tmp_path, capsys):
    """A limit shorter than one step: the run stops after its first step and still evaluates, checkpoints,
    exports and prints its summary."""
    out = tmp_path / "run"
    mocov3.main([*TINY, "--epochs", "5", "--knn-every", "1", "--time-limit", "0.001",
                 "--output-dir", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["epochs"] == pytest.approx(1 / 8)
    assert summary["knn_top1"] is not None
    assert summary["train_s"] > 0
    assert (out / "checkpoint.pth").exists() and (out / "backbone.pth").exists()


def test_eval_linear_data_on_device_trains_and_counts_every_val_image(tmp_path, capsys):
    argv = ["--pretrained", "none", "--synthetic-size", "40", "--img-size", "32", "--stem", "small",
            "--batch-size", "8", "--workers", "0", "--data-on-device"]
    for mode, more in (("linear", ["--epochs", "1"]), ("knn", [])):
        eval_linear.main(["--mode", mode, *argv, *more, "--output-dir", str(tmp_path / mode)])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["val_images"] == 10 and 0 <= summary["top1"] <= 100
    with pytest.raises(SystemExit) as e:
        eval_linear.main(["--mode", "seg", *argv, "--output-dir", str(tmp_path / "seg")])
    assert e.value.code == 2 and "--data-on-device does nothing in --mode seg" in capsys.readouterr().err


def test_summary_train_s_leaves_out_only_evaluation(tmp_path, capsys, monkeypatch):
    """train_s of the summary is the training wall-clock up to the last step: a slow final kNN (1 s, after the
    last step) is not subtracted from it (the kNN record logged right after the last step agrees)."""
    knn_eval = common.knn_eval

    def slow(*a, **k):
        time.sleep(1.0)
        return knn_eval(*a, **k)

    monkeypatch.setattr(common, "knn_eval", slow)
    out = tmp_path / "run"
    mocov3.main([*TINY, "--max-steps", "2", "--knn-every", "1", "--output-dir", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    knn = [r for r in read_log(str(out)) if "knn_top1" in r and r.get("event") != "summary"][-1]
    assert summary["train_s"] == pytest.approx(knn["train_s"], abs=0.3)


def test_save_epochs_writes_every_nth_epoch_and_the_last(tmp_path, monkeypatch):
    saved, save_atomic = [], common.save_atomic

    def spy(obj, path):
        if path.endswith("checkpoint.pth"):
            saved.append(obj["step"])
        return save_atomic(obj, path)

    monkeypatch.setattr(common, "save_atomic", spy)
    mocov3.main([*TINY, "--synthetic-size", "16", "--epochs", "5", "--save-epochs", "2",
                 "--output-dir", str(tmp_path / "run")])
    assert saved == [4, 8, 10]  # 2 steps per epoch: after epochs 2 and 4, and the run's last step


def test_knn_monitor_reuses_the_decoded_train_split(tmp_path, monkeypatch):
    """With the whole train split pretrained on, the kNN bank is the pretraining tensor: two decodes (train,
    val), not three; with --subset the bank is decoded on its own."""
    calls, held_split = [], common.held_split

    def spy(args, run, base, *a, **k):
        calls.append(len(base))
        return held_split(args, run, base, *a, **k)

    monkeypatch.setattr(common, "held_split", spy)
    argv = [*TINY, "--data-on-device", "--knn-every", "1", "--max-steps", "1"]
    mocov3.main([*argv, "--output-dir", str(tmp_path / "a")])
    assert calls == [64, 12]  # the train split, then the val split (a fifth)
    calls.clear()
    mocov3.main([*argv, "--subset", "40", "--output-dir", str(tmp_path / "b")])
    assert calls == [40, 64, 12]
