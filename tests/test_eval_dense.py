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


def np_miou(conf, first=0):
    """IoU = TP / (TP + FP + FN) per class, averaged over the classes >= first with TP + FP + FN > 0."""
    ious = []
    for c in range(first, len(conf)):
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
    m = E.seg_metrics(conf)
    ref_miou, ref_acc = np_miou(ref)
    assert m["miou"] == pytest.approx(ref_miou, abs=1e-9)
    assert m["pixel_acc"] == pytest.approx(ref_acc, abs=1e-9)
    assert m["miou_fg"] == pytest.approx(np_miou(ref, first=1)[0], abs=1e-9)  # background left out
    floor = np.zeros_like(ref)
    floor[:, 0] = ref.sum(1)  # background predicted at every pixel
    assert m["floor_miou"] == pytest.approx(np_miou(floor)[0], abs=1e-9)
    iou = m["iou"]
    assert iou[6] is None and iou[4] == 0 and iou[5] == 0 and iou[1] > 0


def test_probe_head_before_upsampling_equals_after():
    """The 1x1 conv commutes with bilinear upsampling (linear, weights summing to 1): the cheap order is
    exact."""
    torch.manual_seed(0)
    head, f = nn.Conv2d(16, 5, 1), torch.randn(2, 16, 4, 4)
    assert torch.allclose(E.upsample(head(f), (32, 32)), head(E.upsample(f, (32, 32))), atol=1e-5)


# ---------------------------------------------------------------------------- paired transform


CORNERS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                    [0, 255, 255], [255, 255, 255]], np.float64)  # far-apart colours, one per label


def test_seg_transform_resizes_image_and_mask_alike():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 255])
    ids = np.repeat(np.repeat(rng.choice(labels, size=(3, 4)), 16, 0), 16, 1).astype(np.int64)  # [48, 64]
    ids[:, :9] = 255  # an asymmetric stripe: a flip or shift of one of the two would not match
    colour = {int(v): CORNERS[k] for k, v in enumerate(labels)}
    rgb = np.stack([np.vectorize(lambda v, c=c: colour[int(v)][c])(ids) for c in range(3)], -1)  # [48, 64, 3]
    x, y = E.SegViews([(Image.fromarray(rgb.astype(np.uint8)), ids)], E.SegTransform(32))[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= set(labels.tolist())  # nearest: no interpolated ids
    mean, std = np.array(common.MEAN)[:, None, None], np.array(common.STD)[:, None, None]
    rgb = (x.numpy() * std + mean) * 255  # [3, 32, 32]
    nearest = ((rgb[None] - CORNERS[:, :, None, None]) ** 2).sum(1).argmin(0)  # [32, 32] colour index
    y = y.numpy()
    pad = np.pad(y, 2, mode="edge")  # antialiased bilinear resizing blends colours up to 2 px off an edge
    near = range(-2, 3)
    inner = np.all([pad[2 + dy:34 + dy, 2 + dx:34 + dx] == y for dy in near for dx in near], 0)
    assert inner.mean() > 0.3  # most pixels are away from an edge: the check below is not empty
    assert np.array_equal(labels[nearest][inner], y[inner]), "image and mask disagree"

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
        votes = common.knn_vote(q, bank, dist, k, t, bank_chunk=chunk).numpy()
        assert np.allclose(votes, ref, atol=1e-6), chunk


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
    monkeypatch.setattr(common, "BANK_CHUNK", 13)  # several bank chunks and query chunks
    monkeypatch.setattr(E, "QUERY_CHUNK", 10)
    rng, n_classes = np.random.default_rng(0), 5
    feats, ids = one_hot_batch(rng, 6, n_classes)
    ids[0, :8, :8] = 255  # cell (0, 0) of image 0 has only ignore pixels: left out of the bank
    ids[1, 0, 0] = 255  # one ignored pixel: the cell stays, with the distribution of its other pixels
    bank, dist = E.bank_entries(feats, ids, n_classes)
    assert len(bank) == 6 * 16 - 1 and torch.allclose(dist.sum(1), torch.ones(len(dist)))
    mean = bank.mean(0)
    E.unit_cells(bank, mean)  # centred and unit length, in place
    assert torch.allclose(bank.norm(dim=1), torch.ones(len(bank)))
    val_feats, val_ids = one_hot_batch(rng, 4, n_classes)
    val_ids[2, 3:9, 5:20] = 255
    scores = E.knn_scores(val_feats, mean, bank, dist, k=5, t=0.1)  # [4, C, 4, 4]
    pred = E.upsample(scores, val_ids.shape[-2:]).argmax(1)
    m = E.seg_metrics(E.confusion_matrix(pred, val_ids, n_classes))
    assert m["miou"] == 100 and m["pixel_acc"] == 100
    # and not by accident: features that carry no label give a lower mIoU
    scores = E.knn_scores(torch.ones_like(val_feats), mean, bank, dist, k=5, t=0.1)
    pred = E.upsample(scores, val_ids.shape[-2:]).argmax(1)
    assert E.seg_metrics(E.confusion_matrix(pred, val_ids, n_classes))["miou"] < 50

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


def test_probe_reaches_the_known_optimum():
    """Cells in 3 groups (one-hot features under an arbitrary per-channel scale and offset, which the probe
    standardises and folds back, and a dead channel), each group with its own label mixture: without L2 the
    optimum predicts each group's label shares, and its loss is their mean entropy."""
    torch.manual_seed(0)
    shares = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])  # [G, C]
    n, s = 60, 2  # 60 images of 2x2 cells, one pixel each (masks at the grid: no upsampling)
    group = torch.randint(0, 3, (n, s * s))  # [N, S*S]
    labels = torch.stack([torch.multinomial(shares[g], 1)[:, 0] for g in group.T], 1)  # [N, S*S]
    feats = torch.cat([nn.functional.one_hot(group, 3).float(), torch.zeros(n, s * s, 1)], 2)  # [N, S*S, 4]
    cells = feats * torch.tensor([3.0, 0.1, 20.0, 1.0]) + torch.tensor([5.0, -1.0, 0.0, 2.0])
    masks = labels.reshape(n, s, s).int()  # [N, R, R]
    masks[0, 0, 0] = 255  # ignored
    head, fit = E.fit_seg_probe(cells.clone(), masks, 4, wd=0.0)
    assert fit["converged"]
    valid = (masks != 255).flatten()
    counts = torch.zeros(3, 4).index_put_((group.flatten()[valid], labels.flatten()[valid]),
                                          torch.ones(int(valid.sum())), accumulate=True)  # [G, C]
    p = counts / counts.sum(1, keepdim=True)
    assert fit["probe_loss"] == pytest.approx((-(counts * p.log()).sum() / counts.sum()).item(), abs=1e-5)
    probs = torch.softmax(head(cells.reshape(n, s, s, -1).permute(0, 3, 1, 2)), 1)  # [N, C, S, S], raw cells
    for g in range(3):
        assert torch.allclose(probs.permute(0, 2, 3, 1)[group.reshape(n, s, s) == g], p[g], atol=1e-3), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: the cache on CUDA
def test_probe_classifies_separable_cells(dtype):
    """One label per row of cells, features that separate the labels (plus noise): the converged probe labels
    every position of its loss's grid correctly (at the mask's full size a linear head on bilinear logits
    cannot be exact next to every row boundary) and its loss is near 0."""
    rng, n_classes = np.random.default_rng(0), 4
    feats, ids = one_hot_batch(rng, 40, n_classes)  # [N, C, 4, 4], [N, 32, 32]
    feats = feats * 2 + 0.1 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    cells = feats.flatten(2).transpose(1, 2).contiguous()  # [N, S*S, D]
    masks = nn.functional.interpolate(ids[:, None].float(), size=(8, 8), mode="nearest")[:, 0].int()  # 8x8
    head, fit = E.fit_seg_probe(cells.to(dtype), masks, n_classes, wd=1e-4)
    assert fit["converged"] and fit["probe_loss"] < 0.05
    assert torch.equal(E.upsample(head(feats), (8, 8)).argmax(1), masks.long())
    assert (E.upsample(head(feats), (32, 32)).argmax(1) == ids).float().mean() > 0.99


TINY = ["--img-size", "32", "--stem", "small", "--batch-size", "4", "--workers", "0"]


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_dense_eval_leaves_the_backbone_bit_for_bit_unchanged(tmp_path):
    args = E.Args(mode="seg", output_dir=str(tmp_path), workers=0, batch_size=4, img_size=32, stem="small",
                  synthetic_size=8, wd=1e-2)  # a strong L2 weight converges in fewer steps
    run = common.setup(args, "eval_seg")
    net, dim = common.build_backbone("resnet18", "small", 32)
    net.train()  # as a caller might leave it: the evaluation must switch it to eval (frozen BN statistics)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rec = E.dense_eval(args, {}, net, dim, run)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert rec["probe_iters"] > 0  # the probe did train


@pytest.mark.parametrize("mode", ["seg", "seg-knn"])
def test_dense_modes_summary_figure_and_floor(mode, tmp_path, capsys):
    """Random init at the default 8x8 grid (64 px), in small: the summary's fields, the figure, and a score
    above the background-only floor."""
    png = tmp_path / "masks.png"
    rec = E.main(["--mode", mode, "--synthetic-size", "64", "--batch-size", "32", "--workers", "0",
                  "--output-dir", str(tmp_path), "--show-seg", str(png)])
    printed = last_json(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(rec)) and printed["event"] == "summary"
    assert 0 <= printed["miou"] <= 100 and 0 <= printed["pixel_acc"] <= 100
    assert printed["top1"] is None and printed["val_images"] == 12 and len(printed["iou"]) == 11
    present = [v for v in printed["iou"] if v is not None]
    assert printed["miou"] == pytest.approx(sum(present) / len(present), abs=1e-3)
    assert printed["miou_fg"] == pytest.approx(sum(present[1:]) / len(present[1:]), abs=1e-3)
    assert printed["protocol"].startswith({"seg": "linear seg probe", "seg-knn": "dense kNN"}[mode])
    assert "8x8 feature grid" in printed["protocol"]
    assert printed["miou"] > printed["floor_miou"] + 0.5, printed  # the instrument measures random init
    if mode == "seg":
        assert printed["converged"] and printed["probe_loss"] > 0
    with Image.open(png) as im:
        assert im.width == 3 * 128 and im.height > 6 * 128  # 6 rows of image | ground truth | prediction, 2x


def test_seg_knn_with_k_1_on_its_own_train_split_is_exact(tmp_path):
    """val = train: with k = 1 every val cell retrieves itself, so cells of one label each (one label per row
    of cells: no 4-cell corners for the bilinear upsampling to blur) are labelled exactly."""
    rng, root = np.random.default_rng(0), tmp_path / "same"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
    for i in range(6):
        ids = np.repeat(rng.integers(0, 3, size=(4, 1)), 8, 0).repeat(32, 1)  # [32, 32]: rows of 8x8 cells
        img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)  # noise: every cell differs
        for split in ("train", "val"):
            Image.fromarray(img).save(root / split / "images" / f"im{i}.png")
            Image.fromarray(ids.astype(np.uint8)).save(root / split / "masks" / f"im{i}.png")
    rec = E.main(["--data", str(root), "--mode", "seg-knn", "--knn-k", "1", *TINY, "--output-dir",
                  str(tmp_path / "o")])
    assert rec["pixel_acc"] == 100 and rec["miou"] == 100 and rec["floor_miou"] < 100


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


@pytest.mark.parametrize("mode", ["seg", "seg-knn"])
def test_bad_input_a_1x1_final_grid(tmp_path, capsys, mode):
    """An explicit --img-size whose final map is 1x1 would score the background floor: refused."""
    err = bad_run(capsys, "synthetic", "--stem", "imagenet", "--output-dir", str(tmp_path / "o"), mode=mode)
    assert "gives a 1x1 final feature map" in err and f"--mode {mode} needs at least 2x2" in err, err
    with pytest.raises(SystemExit) as e:  # a ViT: one 16-px patch
        E.main(["--mode", mode, "--arch", "vit_small", "--img-size", "16", "--output-dir",
                str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "gives a 1x1 final feature map" in err[0], err


def test_bad_input_seg_res_larger_than_the_image(tmp_path, capsys):
    err = bad_run(capsys, "synthetic", "--seg-res", "64", "--output-dir", str(tmp_path / "o"))
    assert "--seg-res 64 is larger than --img-size 32" in err, err


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
