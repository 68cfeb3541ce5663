"""DetCon: the official crop window, masks follow the views, bias-free head outputs, mask reduction and
pooling, the loss against a NumPy transcription of the official byol_nce_detcon, its invariants, and the
scikit-image-free grid path."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import common
import detcon
from conftest import TINY

# ---------------------------------------------------------------------------- NumPy transcription


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_detcon_loss(pred1, pred2, target1, target2, ids1, ids2, temperature):
    """Line by line the official deepmind/detcon byol_nce_detcon (one replica, local negatives), in
    float64."""
    b, r, _ = pred1.shape

    def same_obj(i0, i1):  # [B, R, 1, R]
        return (i0.reshape(b, r, 1) == i1.reshape(b, 1, r)).astype(np.float64)[:, :, None, :]

    aa, ab, ba, bb = same_obj(ids1, ids1), same_obj(ids1, ids2), same_obj(ids2, ids1), same_obj(ids2, ids2)
    p1, p2, t1, t2 = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (pred1, pred2, target1, target2))
    labels_local = np.eye(b)[:, None, :, None]  # [B, 1, B, 1]
    l_aa = np.einsum("abk,uvk->abuv", p1, t1) / temperature
    l_bb = np.einsum("abk,uvk->abuv", p2, t2) / temperature
    l_ab = np.einsum("abk,uvk->abuv", p1, t2) / temperature
    l_ba = np.einsum("abk,uvk->abuv", p2, t1) / temperature
    lab_aa, lab_ab, lab_ba, lab_bb = (labels_local * aa, labels_local * ab, labels_local * ba,
                                      labels_local * bb)
    l_aa = l_aa - 1e9 * labels_local * aa
    l_bb = l_bb - 1e9 * labels_local * bb
    lab_aa, lab_bb = 0 * lab_aa, 0 * lab_bb
    labels_0 = np.concatenate([lab_ab, lab_aa], 2).reshape(b, r, -1)
    labels_1 = np.concatenate([lab_ba, lab_bb], 2).reshape(b, r, -1)
    n0, n1 = labels_0.sum(-1, keepdims=True), labels_1.sum(-1, keepdims=True)
    labels_0, labels_1 = labels_0 / np.maximum(n0, 1), labels_1 / np.maximum(n1, 1)
    w0 = (n0[..., 0] > 1e-3) / aa.sum(axis=(2, 3))
    w1 = (n1[..., 0] > 1e-3) / bb.sum(axis=(2, 3))
    logits_0 = np.concatenate([l_ab, l_aa], 2).reshape(b, r, -1)
    logits_1 = np.concatenate([l_ba, l_bb], 2).reshape(b, r, -1)
    ce0 = -w0 * (labels_0 * _np_log_softmax(logits_0)).sum(-1)
    ce1 = -w1 * (labels_1 * _np_log_softmax(logits_1)).sum(-1)
    return ce0.mean() + ce1.mean()


def _random_inputs(b=3, m=6, d=8, n_ids=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, m, d, generator=g) for _ in range(4)]
    ids = [torch.randint(0, n_ids, (b, m), generator=g) for _ in range(2)]  # duplicates and missing ids
    return tensors, ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_numpy_transcription(seed):
    (p1, p2, t1, t2), (i1, i2) = _random_inputs(seed=seed)
    assert not torch.equal((i1[:, :, None] == i2[:, None, :]).any(-1), torch.ones_like(i1, dtype=torch.bool))
    got = detcon.detcon_loss(p1, p2, t1, t2, i1, i2, 0.1)
    want = np_detcon_loss(*(x.double().numpy() for x in (p1, p2, t1, t2)), i1.numpy(), i2.numpy(), 0.1)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert detcon.detcon_loss(p1, p2, t1, t2, i1, i2, 0.5).item() == pytest.approx(
        np_detcon_loss(*(x.double().numpy() for x in (p1, p2, t1, t2)), i1.numpy(), i2.numpy(), 0.5),
        rel=1e-5)


def test_identical_views_and_ids_give_a_loss_far_below_uniform():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 8, 256, generator=g)  # random high-dim vectors: nearly orthogonal to each other
    ids = torch.arange(8).repeat(4, 1)  # every id drawn once, present in both views
    loss = detcon.detcon_loss(z, z, z, z, ids, ids, 0.1)
    uniform = detcon.detcon_loss(*[torch.zeros_like(z)] * 4, ids, ids, 0.1)  # all logits 0 = uniform softmax
    assert uniform.item() == pytest.approx(2 * np.log(2 * 4 * 8 - 1), rel=1e-5)  # one masked column per row
    assert loss.item() < 0.02 * uniform.item()


def test_mask_missing_from_view_2_gets_weight_0_in_view_1_rows():
    (p1, p2, t1, t2), _ = _random_inputs(b=2, m=4)
    ids1 = torch.tensor([[0, 1, 7, 7], [2, 2, 3, 0]])  # id 7 of image 0 was not drawn in view 2
    ids2 = torch.tensor([[0, 1, 1, 4], [2, 3, 0, 0]])
    w = detcon.row_weights(ids1, ids2)
    assert w.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0]]  # duplicates share the weight
    p1 = p1.clone().requires_grad_()
    detcon.detcon_loss(p1, p2, t1, t2, ids1, ids2, 0.1).backward()
    assert torch.all(p1.grad[0, 2:] == 0) and p1.grad[0, :2].abs().sum() > 0 and p1.grad[1].abs().sum() > 0
    # and the rows' values do not matter at all
    p1b = p1.detach().clone()
    p1b[0, 2:] = torch.randn(2, p1.shape[-1])
    assert detcon.detcon_loss(p1b, p2, t1, t2, ids1, ids2, 0.1).item() == pytest.approx(
        detcon.detcon_loss(p1.detach(), p2, t1, t2, ids1, ids2, 0.1).item(), rel=1e-6)


def test_same_view_same_id_columns_are_not_negatives():
    # one image: a view-1 target of id 0 pointing exactly along the id-0 predictions would be a huge negative
    (p1, p2, t1, t2), _ = _random_inputs(b=1, m=3, d=4)
    t1b = t1.clone()
    t1b[0, 0] = p1[0, 0] * 5
    ids2 = torch.tensor([[0, 1, 2]])
    for ids1, masked in ((torch.tensor([[0, 0, 0]]), True), (torch.tensor([[0, 0, 1]]), False)):
        before = detcon._one_direction(p1, ids1, t2, ids2, t1, 0.1).item()
        after = detcon._one_direction(p1, ids1, t2, ids2, t1b, 0.1).item()
        # masked for id-0 rows, a negative for id 1
        assert (after == pytest.approx(before, rel=1e-6)) == masked
        want = np_detcon_loss(*(x.double().numpy() for x in (p1, p2, t1b, t2)), ids1.numpy(), ids2.numpy(),
                              0.1)
        assert detcon.detcon_loss(p1, p2, t1b, t2, ids1, ids2, 0.1).item() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------- masks, reduction, pooling


def _region_image(h=48, w=64):
    """An image whose colour encodes its region: 12 blocks of distinct colours, asymmetric left/right."""
    ids = detcon.grid_mask(h, w, 4)[:, :]  # [h, w] 16 blocks
    ids = np.where(ids % 4 == 3, ids - 1, ids)  # merge the right column into its neighbour: flips now matter
    palette = np.random.default_rng(0).permutation(256)[:16, None] * np.array([1, 7, 13]) % 256
    return Image.fromarray(palette[ids].astype(np.uint8)), torch.from_numpy(ids.astype(np.int32)), palette


@pytest.mark.parametrize("crop_min", [0.3, 0.08])
def test_crop_and_flip_move_the_mask_identically(crop_min):
    img, ids, palette = _region_image()
    views = detcon.JointViews(32, crop_min, False, grid=4)
    # geometry only, to read colours back
    views.colour = (lambda im: torch.from_numpy(np.asarray(im).copy()),) * 2
    flipped = set()
    for seed in range(24):
        torch.manual_seed(seed)
        v1, m1, v2, m2 = views.views(img, ids)
        for v, m in ((v1, m1), (v2, m2)):
            assert v.shape == (32, 32, 3) and m.shape == (32, 32) and m.dtype == torch.int32
            dist = ((v[:, :, None, :].float()
                     - torch.tensor(palette, dtype=torch.float)[None, None]) ** 2).sum(-1)
            from_colour = dist.argmin(-1)  # [32, 32] the region each image pixel shows
            pad = F.pad(m[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
            # pixels whose 3x3 mask neighbourhood is one region
            interior = torch.ones_like(m, dtype=torch.bool)
            for dy in range(3):
                for dx in range(3):
                    interior &= pad[dy:dy + 32, dx:dx + 32] == m
            agree = (from_colour == m)[interior].float().mean().item()
            assert interior.float().mean() > 0.5 and agree > 0.99, (seed, agree)  # edges are bilinear blends
            left = m[:, 0].float().mean() > m[:, -1].float().mean()
            flipped.add(bool(left))
    assert flipped == {True, False}  # both flipped and unflipped views were checked


def _np_official_crop_sides(h, w, scale, n, seed):
    """BYOL/DetCon get_random_crop_window in NumPy, n draws -> (box height / h, box width / w), each [n]."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(scale[0], scale[1], n) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), n))
    bw = np.minimum(np.round(np.sqrt(area * aspect)), w)
    bh = np.minimum(np.round(np.sqrt(area / aspect)), h)
    return bh / h, bw / w


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.3, 1.0)])
def test_crop_window_follows_the_official_window_not_torchvision_retries(scale):
    h, w, n = 375, 500, 20000  # a typical ImageNet image, landscape: the box height gets clamped often
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    top, left, bh, bw = detcon.crop_windows(u, h, w, scale).numpy().T  # crop_box's window, n draws at once
    assert np.all((top >= 0) & (left >= 0) & (bh >= 1) & (bw >= 1) & (top + bh <= h) & (left + bw <= w))
    got_area = bh * bw / (h * w)
    want_h, want_w = _np_official_crop_sides(h, w, scale, 200_000, seed=1)
    want_area = want_h * want_w
    assert got_area.mean() == pytest.approx(want_area.mean(), abs=0.006)  # ~3 standard errors of n draws
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert np.allclose(np.quantile(got_area, qs), np.quantile(want_area, qs), atol=0.015)
    assert (bh / h).mean() == pytest.approx(want_h.mean(), abs=0.006)  # height and width not swapped
    assert (bw / w).mean() == pytest.approx(want_w.mean(), abs=0.006)
    # offsets uniform over the valid positions: the box centre's mean is the image centre
    assert (top + bh / 2).mean() / h == pytest.approx(0.5, abs=0.01)
    assert (left + bw / 2).mean() / w == pytest.approx(0.5, abs=0.01)
    if scale[0] == 0.08:
        torch.manual_seed(0)
        img = torch.zeros(3, h, w)
        tv = np.array([np.prod(T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])[2:])
                       for _ in range(4000)]) / (h * w)  # a gap of 0.05 is ~10 standard errors
        assert want_area.mean() - tv.mean() > 0.05  # torchvision's retries give clearly smaller boxes
        assert abs(got_area.mean() - tv.mean()) > 0.05


def test_crop_box_is_reproducible_from_the_seed_and_fits_tiny_images():
    boxes = [detcon.crop_box(37, 23, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert boxes[0] == tuple(detcon.crop_windows(u, 37, 23)[0].long().tolist())  # one crop_windows draw
    torch.manual_seed(3)
    a = detcon.crop_box(37, 23)
    torch.manual_seed(3)
    assert detcon.crop_box(37, 23) == a  # the global RNG when no generator: common.Views seeds it per sample
    for _ in range(200):
        top, left, bh, bw = detcon.crop_box(2, 3)
        assert 0 <= top and 0 <= left and 1 <= bh and 1 <= bw and top + bh <= 2 and left + bw <= 3


def test_joint_views_crop_the_mask_with_the_official_box(monkeypatch):
    img, ids, _ = _region_image()  # 48 x 64
    boxes, official = [], detcon.crop_box

    def recording_crop_box(*a, **k):
        boxes.append((a, k, official(*a, **k)))
        return boxes[-1][2]

    monkeypatch.setattr(detcon, "crop_box", recording_crop_box)
    views = detcon.JointViews(32, 0.3, False, grid=4)
    flips = set()
    for seed in range(10):
        boxes.clear()
        torch.manual_seed(seed)
        _, m1, _, m2 = views.views(img, ids)
        assert len(boxes) == 2
        for m, (a, _, (top, left, bh, bw)) in zip((m1, m2), boxes):
            assert a[:2] == (48, 64) and tuple(a[2]) == (0.3, 1.0)
            crop = ids[top:top + bh, left:left + bw].float()[None, None]  # [1, 1, bh, bw]
            want = F.interpolate(crop, size=(32, 32), mode="nearest-exact")[0, 0].to(torch.int32)  # [32, 32]
            flipped = torch.equal(m, want.flip(-1)) and not torch.equal(m, want)
            assert torch.equal(m, want) or flipped
            flips.add(flipped)
    assert flips == {True, False}


def test_reduced_mask_assigns_every_cell_to_exactly_one_id():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 9, (5, 32, 32), generator=g)
    mask[:, :16] = 3  # a large region too
    cells = detcon.reduce_mask(mask, 4)  # [5, 4, 4]
    assert cells.shape == (5, 4, 4) and cells.dtype == torch.long
    k = int(mask.max()) + 1
    onehot = F.one_hot(mask, k).permute(0, 3, 1, 2).float()  # [5, K, 32, 32]
    pooled = F.adaptive_avg_pool2d(onehot, 4)  # [5, K, 4, 4] share of each id in each cell
    assert torch.equal(cells, pooled.argmax(1))  # = one-hot -> average-pool -> argmax
    assert torch.all(F.one_hot(cells, k).sum(-1) == 1)  # exactly one id per cell
    assert torch.all(pooled.gather(1, cells[:, None]) > 0)  # and that id is present in the cell
    assert torch.all(cells[:, :2] == 3)
    # a 4x4 grid mask reduced to a 4x4 grid keeps every block
    assert torch.equal(detcon.reduce_mask(torch.from_numpy(detcon.grid_mask(32, 32, 4)), 4),
                       torch.arange(16).view(4, 4))


def test_joint_views_share_ids_between_views():
    img, ids, _ = _region_image()
    views = detcon.JointViews(32, 0.5, True, grid=4)
    torch.manual_seed(0)
    v1, c1, v2, c2 = views((img, ids))
    assert v1.shape == v2.shape == (3, 32, 32) and c1.shape == c2.shape == (4, 4)
    union = torch.cat([c1.flatten(), c2.flatten()]).unique()
    assert torch.equal(union, torch.arange(len(union)))  # compact ids 0..U-1, U <= 2 * 16
    torch.manual_seed(0)
    _, m1, _, m2 = views.views(img, ids)
    raw = torch.stack([detcon.reduce_mask(m1, 4), detcon.reduce_mask(m2, 4)])
    # the relabelling is one map for both views: equal raw ids <-> equal new ids, across views
    new = torch.stack([c1, c2])
    assert torch.equal(raw.flatten()[:, None] == raw.flatten()[None],
                       new.flatten()[:, None] == new.flatten()[None])


def test_mask_pooling_of_a_constant_map_returns_the_constant():
    mask = detcon.reduce_mask(torch.randint(0, 6, (2, 16, 16)), 4)  # [2, 4, 4]
    ids = detcon.sample_ids(mask, 16)  # [2, 16]
    const = torch.tensor([1.5, -2.0, 0.25])
    fmap = const[None, :, None, None].expand(2, 3, 4, 4)
    assert torch.allclose(detcon.mask_pool(fmap, mask, ids), const.expand(2, 16, 3))
    fmap = torch.randn(2, 3, 4, 4)  # and a real map: the mean over the id's cells
    pooled = detcon.mask_pool(fmap, mask, ids)
    b, j = 1, 5
    cells = mask[b].flatten() == ids[b, j]
    assert torch.allclose(pooled[b, j], fmap[b].flatten(1)[:, cells].mean(1), atol=1e-6)


def test_sample_ids_draws_only_present_masks_uniformly():
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, :, 2:] = 5
    mask[0, 0, 0] = 9  # a one-cell mask counts as present
    mask[1] = 31  # one mask for the whole view: ids < 2 * 16
    torch.manual_seed(0)
    ids = detcon.sample_ids(mask, 3000)
    assert set(ids[0].tolist()) == {0, 5, 9} and set(ids[1].tolist()) == {31}
    counts = torch.bincount(ids[0], minlength=10)[[0, 5, 9]].float() / 3000
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04)  # uniform over masks, not over area


def test_fh_ids_are_not_truncated_to_uint8_and_cache_roundtrips(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ids = detcon.fh_segments(noise, 0, scale=1.0, min_size=1, sigma=0.0)  # a segment per pixel or so
    assert ids.dtype == np.int32 and ids.max() > 300 and len(np.unique(ids)) == ids.max() + 1
    args = detcon.Args(masks="fh", fh_size=32, fh_scale=0, fh_min_size=0)
    ds = detcon.MaskedImages([(noise, 0)], args, str(tmp_path / "cache"), cache_min_side=0)
    (_, m), _ = ds[0]
    cached = tmp_path / "cache" / detcon.cache_name(noise, args)
    assert m.shape == (64, 64) and os.path.isfile(cached)  # FH ran at 32 px, upsampled
    (_, again), _ = ds[0]
    assert torch.equal(m, again)


def test_imagenet_preset_masks_are_the_official_fh_at_full_resolution():
    """The imagenet preset's masks of an ImageNet-size photo are the segments of the official call on the
    full-resolution image (ids may be numbered otherwise: the two partitions must match one to one), in a
    dtype wider than uint8."""
    felzenszwalb = pytest.importorskip("skimage.segmentation").felzenszwalb
    from skimage import data
    img = data.chelsea()  # 300 x 451, an ImageNet-size photo shipped with scikit-image
    args = common.parse_args(detcon.Args, detcon.PRESETS, ["--preset", "imagenet"])
    ids = detcon.MaskedImages([], args).mask(Image.fromarray(img)).numpy()  # no cache folder
    want = felzenszwalb(img, scale=1000, sigma=0.8, min_size=1000)
    assert ids.shape == want.shape == img.shape[:2] and ids.dtype.itemsize > 1
    pairs = np.unique(np.stack([ids.ravel(), want.ravel()], 1), axis=0)  # the (ours, official) id pairs
    assert len(pairs) == len(np.unique(ids)) == len(np.unique(want)) > 1  # a bijection between the ids


def test_fh_params_follow_the_official_values_scaled_by_pixels():
    assert detcon.fh_params(350, 400) == pytest.approx((1000.0, 1000))
    scale, min_size = detcon.fh_params(80, 80)
    assert 250 < scale < 350 and 40 < min_size < 60  # ~300 / ~50 at 64-96 px


# --------------------------------------------------------------------- model, grid masks without scikit-image


def test_heads_are_the_official_mlp_output_layer_without_bias():
    args = detcon.Args(arch="resnet18", stem="small", img_size=32, mlp_dim=32, proj_dim=16, variant="B")
    model = detcon.DetCon(args)
    for head in (model.projector, model.predictor, model.momentum_projector):
        linears = [m for m in head if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 2 and isinstance(head[1], torch.nn.BatchNorm1d)
        assert linears[0].bias is not None and linears[1].bias is None  # haiku: with_bias=False on the output
    assert model.projector[-1].out_features == 16 and model.predictor[-1].in_features == 32


@pytest.mark.parametrize("variant", ["B", "S"])
def test_model_step_both_variants(variant):
    torch.manual_seed(0)
    args = detcon.Args(arch="resnet18", stem="small", img_size=32, mlp_dim=32, proj_dim=16, variant=variant,
                       num_masks=4)
    model = detcon.DetCon(args)
    assert (hasattr(model, "momentum_backbone") == (variant == "B")
            and hasattr(model, "predictor") == (variant == "B"))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    m1, m2 = torch.randint(0, 5, (4, 4, 4)), torch.randint(0, 5, (4, 4, 4))
    loss, matched = model(x1, m1, x2, m2, 0.99)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= matched <= 1
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    if variant == "B":
        assert all(p.grad is None for p in model.momentum_params())


def _block_skimage(monkeypatch):
    for name in [n for n in sys.modules if n == "skimage" or n.startswith("skimage.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "skimage", None)  # "import skimage" now raises ImportError
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)


def test_grid_masks_work_without_scikit_image(monkeypatch):
    _block_skimage(monkeypatch)
    base = common.Synthetic(4)
    with pytest.raises(common.BadInput, match=r"pip install scikit-image.*--masks grid"):
        detcon.MaskedImages(base, detcon.Args(masks="fh"))
    ds = common.Views(detcon.MaskedImages(base, detcon.Args(masks="grid", grid_masks=5)),
                      detcon.JointViews(32, 0.3, False, 4))
    (v1, c1, v2, c2), _ = ds[0]
    assert v1.shape == (3, 32, 32) and c1.shape == (4, 4)
    (_, ids), _ = ds.base[0]
    assert ids.unique().tolist() == list(range(25))


def _main(capsys, *argv):
    """Run detcon.main in-process (faster than a subprocess): (exit code, stdout, stderr)."""
    try:
        detcon.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_script_runs_on_grid_masks_without_scikit_image(monkeypatch, capsys, tmp_path):
    _block_skimage(monkeypatch)
    args = [*TINY, "--stem", "small", "--max-steps", "1", "--synthetic-size", "16"]
    code, out, err = _main(capsys, *args, "--masks", "grid", "--output-dir", tmp_path / "g")
    assert code == 0 and '"event": "summary"' in out.strip().splitlines()[-1], err
    code, out, err = _main(capsys, *args, "--masks", "fh", "--output-dir", tmp_path / "f")
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install scikit-image" in err[0] and "--masks grid" in err[0]


@pytest.mark.parametrize("flags, expected", [
    (["--stem", "imagenet"], "at least 2x2"),  # 32 px / stride 32 = a 1x1 feature map
    (["--variant", "C"], "unknown --variant 'C'"),
    (["--masks", "slic"], "unknown --masks 'slic'"),
])
def test_bad_input(flags, expected, capsys, tmp_path):
    code, _, err = _main(capsys, *TINY, "--stem", "small", "--output-dir", tmp_path / "bad", *flags)
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_show_masks_writes_a_picture(tmp_path):
    path = tmp_path / "masks.png"
    detcon.main(["--show-masks", str(path), "--synthetic-size", "12", "--stem", "small", "--img-size", "32"])
    with Image.open(path) as im:
        assert im.size == (8 * 128, 16 + 6 * 128)  # 8 panels of 128 px per row, one row of headings
        assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 50  # not blank


def test_help_documents_the_method_flags(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0 and "--fh-size" in out and "--variant" in out and "Felzenszwalb" in out
