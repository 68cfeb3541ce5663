"""Dense evaluation (eval_linear.py --mode seg / seg-knn): metric, paired transform, mask data, retrieval,
bad input, and evaluation that counts each val image once under torchrun."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import eval_linear as E

# ---------------------------------------------------------------------------- metric


def np_confusion(pred, gt, n):
    """Transcription: count (gt, pred) over the pixels whose gt is not 255."""
    conf = np.zeros((n, n), np.int64)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g != 255:
            conf[g, p] += 1
    return conf


def np_miou(conf):
    """IoU = TP / (TP + FP + FN) per class, averaged over the classes with TP + FP + FN > 0."""
    ious = []
    for c in range(len(conf)):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return 100 * np.mean(ious), 100 * np.trace(conf) / conf.sum()


def test_miou_matches_numpy_confusion_matrix():
    rng = np.random.default_rng(0)
    n = 7  # class 4 only in gt, class 5 only in predictions, class 6 in neither (left out of the mean)
    gt = rng.choice([0, 1, 2, 3, 4, 255], size=(3, 20, 20))
    pred = rng.choice([0, 1, 2, 3, 5], size=(3, 20, 20))
    pred[gt == 1] = 1  # some agreement, so the IoUs differ between classes
    conf = E.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), n)
    ref = np_confusion(pred, gt, n)
    assert np.array_equal(conf.numpy(), ref)
    miou, acc, iou = E.seg_metrics(conf)
    ref_miou, ref_acc = np_miou(ref)
    assert miou == pytest.approx(ref_miou, abs=1e-9) and acc == pytest.approx(ref_acc, abs=1e-9)
    assert iou[6] is None and iou[4] == 0 and iou[5] == 0 and iou[1] > 0


def test_probe_head_before_upsampling_equals_after():
    """The 1x1 conv commutes with bilinear upsampling (linear, weights summing to 1): the cheap order is
    exact."""
    torch.manual_seed(0)
    head, f = nn.Conv2d(16, 5, 1), torch.randn(2, 16, 4, 4)
    assert torch.allclose(E.upsample(head(f), (32, 32)), head(E.upsample(f, (32, 32))), atol=1e-5)


def test_seg_loss_is_the_mean_over_valid_pixels():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    target[0, :3] = 255
    valid = target != 255
    logp = torch.log_softmax(logits, 1).permute(0, 2, 3, 1)[valid]  # [V, C]
    ref = -logp[torch.arange(len(logp)), target[valid]].mean()
    assert E.seg_loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)
    assert E.seg_loss(logits, torch.full_like(target, 255)).item() == 0  # no valid pixel: 0, not NaN

# ---------------------------------------------------------------------------- paired transform


CORNERS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                    [0, 255, 255], [255, 255, 255]], np.float64)  # far-apart colours, one per label


def test_paired_transform_gives_image_and_mask_the_same_crop_and_flip():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 255])
    ids = np.repeat(np.repeat(rng.choice(labels, size=(3, 4)), 16, 0), 16, 1).astype(np.int64)  # [48, 64]
    ids[:, :9] = 255  # an asymmetric stripe: a flip of the image alone would not match
    colour = {int(v): CORNERS[k] for k, v in enumerate(labels)}
    rgb = np.stack([np.vectorize(lambda v, c=c: colour[int(v)][c])(ids) for c in range(3)], -1)  # [48, 64, 3]
    img = Image.fromarray(rgb.astype(np.uint8))
    ds = E.SegViews([(img, ids)] * 12, E.SegTransform(32, train=True))
    val_x, val_y = E.SegTransform(32, train=False)(img, ids)
    mean, std = np.array(common.MEAN)[:, None, None], np.array(common.STD)[:, None, None]
    differs = 0
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(labels.tolist())  # nearest: no interpolated ids
        rgb = (x.numpy() * std + mean) * 255  # [3, 32, 32]
        nearest = ((rgb[None] - CORNERS[:, :, None, None]) ** 2).sum(1).argmin(0)  # [32, 32] colour index
        y = y.numpy()
        pad = np.pad(y, 2, mode="edge")  # antialiased bilinear resizing blends colours up to 2 px off an edge
        near = range(-2, 3)
        inner = np.all([pad[2 + dy:34 + dy, 2 + dx:34 + dx] == y for dy in near for dx in near], 0)
        assert inner.mean() > 0.3  # most pixels are away from an edge: the check below is not empty
        assert np.array_equal(labels[nearest][inner], y[inner]), f"sample {i}: image and mask disagree"
        differs += not np.array_equal(y, val_y.numpy())
    assert differs >= 6  # the crops and flips really vary (the transform is not a plain resize)

# ---------------------------------------------------------------------------- synthetic masks


def components(mask):
    """4-connected components of equal non-zero value: list of boolean masks."""
    seen, out = np.zeros(mask.shape, bool), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp, stack, seen[start] = np.zeros(mask.shape, bool), [start], True
        while stack:
            r, c = stack.pop()
            comp[r, c] = True
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and not seen[rr, cc] \
                        and mask[rr, cc] == mask[start]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(comp)
    return out


def test_synthetic_masks_match_the_rendered_pixels():
    """Background-labelled pixels have the background colour (within noise); the pixels of a shape that stands
    out from the background all depart from it; the image's class is among the mask's labels."""
    ds = common.Synthetic(40, "train", seed=3)
    noise = 0.2 * 255  # the renderer's pixel noise is a few grey levels; shapes that stand out differ more
    checked = total = 0
    for i in range(len(ds)):
        img, mask = ds.segmentation(i)
        img, mask = np.asarray(img, np.float64), np.asarray(mask)
        assert mask.shape == img.shape[:2] and mask.max() <= len(common.SHAPES)
        assert ds[i][1] + 1 in np.unique(mask)  # the labelled shape is drawn (and labelled class + 1)
        bg = np.median(img[mask == 0], 0)  # [3]
        departs = np.abs(img - bg).max(-1) > noise  # [H, W]
        assert not departs[mask == 0].any(), f"image {i}: a pixel labelled background has another colour"
        for comp in components(mask):
            total += comp.sum()
            if np.abs(np.median(img[comp], 0) - bg).max() > 2 * noise:  # a shape that stands out
                checked += comp.sum()
                assert departs[comp].mean() > 0.99, f"image {i}: a labelled shape is not drawn there"
    assert checked > 0.3 * total  # a good share of the shape pixels was tested

# ---------------------------------------------------------------------------- seg-knn retrieval


def test_cell_histograms_match_a_pixel_loop():
    rng = np.random.default_rng(2)
    ids = rng.choice([0, 1, 2, 255], size=(2, 10, 7))  # sizes not divisible by the grid
    got = E.cell_histograms(torch.from_numpy(ids), 3, 4).numpy()
    ref = np.zeros((2, 16, 3), np.int64)
    for n in range(2):
        for h in range(10):
            for w in range(7):
                if ids[n, h, w] != 255:
                    ref[n, (h * 4 // 10) * 4 + w * 4 // 7, ids[n, h, w]] += 1
    assert np.array_equal(got, ref)


def test_chunked_vote_equals_a_direct_top_k():
    torch.manual_seed(0)
    q = nn.functional.normalize(torch.randn(9, 8), dim=1)  # [Q, D]
    bank = nn.functional.normalize(torch.randn(50, 8), dim=1)  # [M, D]
    dist = torch.softmax(torch.randn(50, 4), 1)
    k, t = 6, 0.1
    sim = q.numpy() @ bank.numpy().T  # [9, 50]
    idx = np.argsort(-sim, 1)[:, :k]
    w = np.exp(np.take_along_axis(sim, idx, 1) / t)
    ref = (w[..., None] * dist.numpy()[idx]).sum(1) / w.sum(1, keepdims=True)
    for chunk in (7, 50, 1000):
        assert np.allclose(E.knn_vote(q, bank, dist, k, t, bank_chunk=chunk).numpy(), ref, atol=1e-6), chunk


def one_hot_batch(rng, n, n_classes, grid=4, cell=8):
    """Features equal to the one-hot label of each cell, and masks constant within each cell. One label per
    row of cells: where four cells meet, bilinear upsampling of even perfect scores can favour the three
    others, so corners would keep the pixel-level mIoU below 100 whatever the retrieval."""
    rows = torch.from_numpy(rng.integers(0, n_classes, size=(n, grid, 1)))  # [n, S, 1]
    labels = rows.expand(n, grid, grid)  # [n, S, S]
    feats = nn.functional.one_hot(labels, n_classes).permute(0, 3, 1, 2).float()  # [n, C, S, S]
    ids = labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # [n, S*cell, S*cell]
    return feats, ids


def test_seg_knn_on_one_hot_features_gives_miou_100(monkeypatch):
    monkeypatch.setattr(E, "BANK_CHUNK", 13)  # several bank chunks and query chunks
    monkeypatch.setattr(E, "QUERY_CHUNK", 10)
    rng, n_classes = np.random.default_rng(0), 5
    feats, ids = one_hot_batch(rng, 6, n_classes)
    ids[0, :8, :8] = 255  # cell (0, 0) of image 0 has only ignore pixels: left out of the bank
    ids[1, 0, 0] = 255  # one ignored pixel: the cell stays, with the distribution of its other pixels
    bank, dist = E.bank_entries(feats, ids, n_classes)
    assert len(bank) == 6 * 16 - 1 and torch.allclose(dist.sum(1), torch.ones(len(dist)))
    val_feats, val_ids = one_hot_batch(rng, 4, n_classes)
    val_ids[2, 3:9, 5:20] = 255
    scores = E.knn_scores(val_feats, bank, dist, k=5, t=0.1)  # [4, C, 4, 4]
    pred = E.upsample(scores, val_ids.shape[-2:]).argmax(1)
    miou, acc, _ = E.seg_metrics(E.confusion_matrix(pred, val_ids, n_classes))
    assert miou == 100 and acc == 100
    # and not by accident: features that carry no label give a lower mIoU
    scores = E.knn_scores(torch.ones_like(val_feats), bank, dist, k=5, t=0.1)
    pred = E.upsample(scores, val_ids.shape[-2:]).argmax(1)
    assert E.seg_metrics(E.confusion_matrix(pred, val_ids, n_classes))[0] < 50

# ---------------------------------------------------------------------------- mask folders


def voc_root(tmp_path, masks, aug_masks=None):
    """A VOC 2012 layout: JPEGImages, SegmentationClass palette PNGs, ImageSets/Segmentation/{train,val}."""
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    cmap = common.palette()
    for name, ids in masks.items():
        Image.fromarray(np.full(ids.shape + (3,), 120, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        m = Image.fromarray(ids.astype(np.uint8), "P")
        m.putpalette(cmap.ravel().tolist())  # what VOC ships: colours for viewers, palette index = class id
        m.save(root / "SegmentationClass" / f"{name}.png")
    names = list(masks)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:-1]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(names[-1] + "\n")
    if aug_masks:
        (root / "SegmentationClassAug").mkdir()
        for name, ids in aug_masks.items():
            Image.fromarray(ids.astype(np.uint8), "L").save(root / "SegmentationClassAug" / f"{name}.png")
        (root / "ImageSets/Segmentation/train_aug.txt").write_text(
            "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug_masks))
    return root


def seg_args(data, **kw):
    return E.Args(data=str(data), mode="seg", **kw)


def test_voc_layout_decodes_palette_ids_including_ignore(tmp_path):
    a = np.zeros((12, 16), np.int64)
    a[2:6, 3:9], a[6, :], a[8:, 10:] = 15, 255, 20
    b = np.full((12, 16), 7, np.int64)
    root = voc_root(tmp_path, {"2007_000001": a, "2007_000002": b})
    rgb = np.asarray(Image.open(root / "SegmentationClass" / "2007_000001.png").convert("RGB"))
    assert not np.array_equal(rgb[..., 0], a)  # stored as colours: decoding must read the palette index
    train, val, n = E.seg_splits(seg_args(root))
    assert n == 21 and len(train) == 1 and len(val) == 1
    img, ids = train[0]
    assert img.size == (16, 12) and np.array_equal(ids, a)
    assert np.array_equal(val[0][1], b)
    # SegmentationClassAug + train_aug.txt replace the train split (grayscale ids)
    c = np.full((12, 16), 3, np.int64)
    c[0] = 255
    root2 = voc_root(tmp_path / "aug", {"2007_000001": a, "2007_000002": b}, aug_masks={"2007_000001": c})
    train, val, _ = E.seg_splits(seg_args(root2))
    assert np.array_equal(train[0][1], c) and np.array_equal(val[0][1], b)


def mask_folder(tmp_path, n_train=4, n_val=3, size=(40, 40)):
    """root/{train,val}/images/*.png + masks/<stem>.png with ids 0-2 and some 255."""
    root, rng = tmp_path / "segdata", np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            ids = np.repeat(np.repeat(rng.integers(0, 3, size=(size[1] // 10, size[0] // 10)), 10, 0), 10, 1)
            ids[0, :] = 255
            Image.fromarray((ids * 80 % 256).astype(np.uint8).repeat(3).reshape(*ids.shape, 3)).save(
                root / split / "images" / f"im{i}.png")
            Image.fromarray(ids.astype(np.uint8)).save(root / split / "masks" / f"im{i}.png")
    return root


def test_mask_folder_classes_from_the_train_masks(tmp_path):
    root = mask_folder(tmp_path)
    train, val, n = E.seg_splits(seg_args(root))
    assert n == 3 and len(train) == 4 and len(val) == 3
    assert set(np.unique(train[0][1])) <= {0, 1, 2, 255}
    assert E.seg_splits(seg_args(root, num_classes=5))[2] == 5

# ---------------------------------------------------------------------------- probe and main()


TINY = ["--img-size", "32", "--stem", "small", "--batch-size", "4", "--epochs", "1", "--workers", "0",
        "--log-every", "1"]


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_seg_probe_leaves_the_backbone_bit_for_bit_unchanged(tmp_path):
    args = E.Args(mode="seg", output_dir=str(tmp_path), workers=0, batch_size=4, epochs=1, img_size=32,
                  stem="small", lr=0.5, wd=0.0, synthetic_size=8, log_every=1)
    run = common.setup(args, "eval_seg")
    net, dim = common.build_backbone("resnet18", "small", 32)
    net.train()  # as a caller might leave it: the probe must switch it to eval (frozen BN statistics)
    net.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    head = E.head_init(nn.Conv2d(dim, 11, 1))
    head_before = head.weight.detach().clone()
    train_ds = E.SegViews(E.SyntheticSeg(common.Synthetic(8, "train"), 11), E.SegTransform(32, train=True))
    E.train_seg_probe(net, head, train_ds, run, args, 32)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not torch.equal(head.weight, head_before)  # the probe did train


@pytest.mark.parametrize("mode", ["seg", "seg-knn"])
def test_dense_modes_summary_and_figure(mode, tmp_path, capsys):
    png = tmp_path / "masks.png"
    rec = E.main(["--mode", mode, "--synthetic-size", "8", *TINY, "--knn-k", "5", "--output-dir",
                  str(tmp_path), "--show-seg", str(png)])
    printed = last_json(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(rec)) and printed["event"] == "summary"
    assert 0 <= printed["miou"] <= 100 and 0 <= printed["pixel_acc"] <= 100
    assert printed["top1"] is None and printed["val_images"] == 10 and len(printed["iou"]) == 11
    present = [v for v in printed["iou"] if v is not None]
    assert printed["miou"] == pytest.approx(sum(present) / len(present), abs=1e-3)
    assert printed["protocol"].startswith({"seg": "linear seg probe", "seg-knn": "dense kNN"}[mode])
    with Image.open(png) as im:
        assert im.width == 3 * 96 and im.height > 6 * 96  # 6 rows of image | ground truth | prediction


def bad_run(capsys, data, *more, mode="seg"):
    with pytest.raises(SystemExit) as e:
        E.main(["--data", str(data), "--mode", mode, *TINY, *more])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_image_without_mask(tmp_path, capsys):
    root = mask_folder(tmp_path)
    os.remove(root / "train" / "masks" / "im2.png")
    err = bad_run(capsys, root, "--output-dir", str(tmp_path / "o"))
    assert "im2.png" in err and "no mask" in err


def test_bad_input_mask_size_differs_from_image(tmp_path, capsys):
    root = mask_folder(tmp_path, n_train=1)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "train" / "masks" / "im0.png")
    for workers in ("0", "1"):  # found when the item is loaded, also inside a DataLoader worker
        err = bad_run(capsys, root, "--batch-size", "1", "--workers", workers, "--output-dir",
                      str(tmp_path / "o"))
        assert os.path.join("train", "masks", "im0.png") in err and "40x30" in err, err


@pytest.mark.parametrize("mode", ["seg", "seg-knn"])
def test_bad_input_label_id_not_below_the_number_of_classes(tmp_path, capsys, mode):
    a = np.zeros((12, 16), np.int64)
    a[3, 3] = 21  # VOC has ids 0-20 and 255
    root = voc_root(tmp_path, {"x1": a, "x2": a, "x3": np.zeros((12, 16), np.int64)})
    err = bad_run(capsys, root, "--batch-size", "1", "--output-dir", str(tmp_path / "o"), mode=mode)
    assert "x1.png" in err and "label id 21" in err
    root = mask_folder(tmp_path / "f")  # ids 0-2: --num-classes 2 makes id 2 unknown
    err = bad_run(capsys, root, "--num-classes", "2", "--output-dir", str(tmp_path / "o"), mode=mode)
    assert "masks" in err and "label id 2" in err


def test_bad_input_data_without_masks(tmp_path, capsys):
    (tmp_path / "plain" / "a").mkdir(parents=True)
    err = bad_run(capsys, tmp_path / "plain", "--output-dir", str(tmp_path / "o"))
    assert "VOC" in err and "train/images" in err
    err = bad_run(capsys, "synthetic", "--labels-per-class", "2", "--output-dir", str(tmp_path / "o"))
    assert "--labels-per-class" in err

# ---------------------------------------------------------------------------- torchrun: each val image once


@pytest.mark.parametrize("mode", ["linear", "knn", "seg-knn", "linear_device"])  # seg: seg-knn's val loop
def test_two_processes_count_each_val_image_once(harness, mode):
    """11 val images (odd): DistributedSampler would pad rank 1 with a duplicate. 2 processes give the metrics
    of 1 process (both runs in tests/dist_harness.py, part 5). With --data-on-device the crops are drawn per
    (rank, step), so 2 processes train another probe: there only the val count is compared."""
    one, two = harness[1][f"eval_{mode}"], harness[2][f"eval_{mode}"]
    assert one["val_images"] == two["val_images"] == 11
    if mode == "linear_device":
        return
    for key in ("top1", "top5") if mode in ("linear", "knn") else ("miou", "pixel_acc", "iou"):
        assert one[key] == two[key], key
