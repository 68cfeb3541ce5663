"""DetCon: "Efficient Visual Pretraining with Contrastive Detection".

Paper: Hénaff, Koppula, Alayrac, van den Oord, Vinyals, Carreira, ICCV 2021, arXiv:2103.10957.
Official code (JAX): github.com/deepmind/detcon

Idea: one embedding per *object*, not per image (up to 10x less pretraining for equal COCO transfer): masks
(Felzenszwalb-Huttenlocher segments or a grid) of the un-augmented image follow each view's crop and flip; the
backbone map is averaged per mask; the same mask in both views is pulled together, others pushed away.

Kept from the official code:
- The loss term by term (detcon_loss): both views' global-batch targets as columns, same-view same-mask ones
  at -1e9, label mass split over duplicates, rows weighted 1/draws (0 if unmatched), both directions, tau 0.1.
- 16 masks per view, uniform over those present in it, with replacement, shared by online and target.
- BYOL's heads (output layer without bias) and asymmetric augmentation, EMA 0.996 -> 1 (cosine); LARS lr
  0.2 x B/256, wd 1.5e-6, 1% warmup; one crop window per view as the official one (no retries).
- The imagenet preset's FH: the un-augmented image at full resolution, scale 1000, min_size 1000, sigma 0.8.

Changed:
- FH runs in the loader workers in the first epoch, cached on disk for images >= 224 px (official: offline;
  its cost: RESULTS.md, "Model cost"); int32 ids (the official uint8 cast merges ids > 255).
- The `cifar` and `cpu` presets (ours; small stem: 4x4 grid) run FH at <= 128 px, --data-on-device on the
  stored copy (crop windows drawn batched on the device), scale and min_size scaled to the pixels.
- Masks are reduced to the feature grid by a majority vote per cell (= one-hot -> average-pool -> argmax).
- The EMA update runs at the start of a step (as in mocov3.py); DetCon_S keeps the local targets' gradient.
- torchvision's/PIL's colour ops: brightness multiplies (official: adds), contrast: gray mean (official: per
  channel), saturation blends with gray (official: scales HSV's S), PIL blur (official: 23-tap).
- bf16 autocast with TF32 matmuls by default on CUDA (official: JAX on TPU); torchvision backbones.

Commands:
  python detcon.py                                   # CPU smoke run on synthetic data (README: quick start)
  python detcon.py --data /imagenet --show-masks masks.png   # look at the masks first (writes a PNG, exits)
  python detcon.py --data /imagenet --batch-size 256 --epochs 100            # 1 GPU
  torchrun --nproc_per_node=8 detcon.py --data /imagenet --resume auto       # 1 node
  torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 \\
      --nproc_per_node=8 detcon.py --data /imagenet --resume auto            # multi-node
  python detcon.py --resume auto                     # continue the run in --output-dir

Healthy loss: starts near 2 * (matched distinct ids / 16) * ln(2 * B * 16): ~12 for R50 at 224 px, B 4096;
~2.6 in the cpu preset, then drifts down noisily; the logged `matched` (rows with a positive) sets the level.
"""
import copy
import dataclasses
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

import common


@dataclasses.dataclass
class Args(common.CommonArgs):
    arch: str = "resnet50"
    """backbone: resnet18, resnet50 (official), vit_small, vit_base or a torchvision model with a final map"""
    epochs: int = 1000
    """pretraining epochs (ImageNet: 1000 for the headline DetCon_B result, 300 also reported)"""
    batch_size: int = 4096
    """global batch over all processes (ImageNet: 4096)"""
    optimizer: str = "lars"
    """lars (official), sgd or adamw"""
    lr: float = 0.2
    """base lr for batch 256, scaled by batch/256 (ImageNet: 0.2, from BYOL)"""
    wd: float = 1.5e-6
    """weight decay (ImageNet: 1.5e-6; biases and norm weights are excluded)"""
    warmup_epochs: float = -1
    """linear lr warmup epochs before the cosine decay; -1 = 0.01 x --epochs (official: 10 of 1000)"""
    trust_coefficient: float = 0.001
    """LARS trust coefficient (ImageNet: 0.001; raise to 0.02 for small batches/images)"""
    temperature: float = 0.1
    """softmax temperature tau of the contrastive-detection loss (official: 0.1, fixed)"""
    momentum: float = 0.996
    """initial EMA coefficient of the target network (DetCon_B), cosine-scheduled to 1 (official: 0.996)"""
    proj_dim: int = 256
    """output dim of projector and predictor (official: 256)"""
    mlp_dim: int = 4096
    """hidden dim of projector and predictor (official: 4096)"""
    crop_min: float = 0.08
    """lower bound of the crop area as a fraction of the image (BYOL/DetCon: 0.08)"""
    blur: bool = True
    """Gaussian blur in the augmentation (off for 32-px images, which are already blurry)"""
    freeze_patch_proj: bool = True
    """ViT only: keep the random patch projection frozen (MoCo v3's stability trick)"""
    variant: str = "B"
    """B = DetCon_B (BYOL-style: predictor + EMA target), S = DetCon_S (SimCLR-style: online outputs only)"""
    masks: str = "fh"
    """fh = Felzenszwalb-Huttenlocher segments (needs scikit-image), grid = n x n grid (no dependency)"""
    grid_masks: int = 5
    """n of the n x n grid masks (--masks grid; the paper's spatial-heuristic baseline masks)"""
    num_masks: int = 16
    """mask ids sampled per view (with replacement, among masks present in the view; official: 16)"""
    fh_size: int = 0
    """FH runs on the un-augmented image scaled to a longer side <= this; 0 = native size (official). With
    smaller sizes or images (imagenette2-224: ~5 segments) also set --fh-scale 0 --fh-min-size 0 (scaled)"""
    fh_scale: float = 1000
    """FH scale (official: 1000); 0 = 1000 x (pixels / 400x350)^0.4 at FH's size, ~300 at 64-96 px"""
    fh_min_size: int = 1000
    """FH min_size in pixels (official: 1000); 0 = 1000 x pixels / (400x350) at FH's size, ~50 at 80 px"""
    fh_sigma: float = 0.8
    """FH Gaussian pre-smoothing (official: 0.8)"""
    mask_cache: str = "auto"
    """auto = FH masks of images >= 224 px cached in <output-dir>/fh_cache; a directory = every image's, there
    (shareable: keyed on each image's pixels and the FH parameters); off: never"""
    show_masks: str = ""
    """write a PNG of a few images, their two views and the masks on each view to this path, then exit"""

    # allowed values, checked with the shared flags' before any work; FH's 0 = scaled, warmup's -1 = 1%
    RANGES = {"warmup_epochs": common.Range(0, also=(-1,)), "trust_coefficient": common.POSITIVE,
              "temperature": common.POSITIVE, "momentum": common.Range(0, 1), "proj_dim": common.Range(1),
              "mlp_dim": common.Range(1), "crop_min": common.Range(0, 1, lo_excluded=True),
              "grid_masks": common.Range(1), "num_masks": common.Range(1), "fh_size": common.Range(0),
              "fh_scale": common.Range(0), "fh_min_size": common.Range(0), "fh_sigma": common.Range(0)}
    RESUME_FREE = ("mask_cache",)  # a resumed run may change it: it does not change what a step computes


# ours: FH at <= 128 px, scale and min_size scaled (fh_params): 1000 / 1000 leave a 64-px image 1-2 segments
SMALL_FH = dict(fh_size=128, fh_scale=0, fh_min_size=0)
PRESETS = {
    "imagenet": {},  # the official recipe, FH included: full resolution, scale 1000, min_size 1000, sigma 0.8
    # ours: BYOL's solo-learn CIFAR recipe with DetCon's loss; small stem keeps the 32-px grid at 4x4
    "cifar": dict(arch="resnet18", stem="small", img_size=32, batch_size=256, lr=1.0, trust_coefficient=0.02,
                  wd=1e-5, momentum=0.99, blur=False, epochs=1000, warmup_epochs=10, knn_every=10,
                  **SMALL_FH),
    # ours: the quick-start tuning shared by every method file (README, "The cpu preset"), plus cifar's 4x4
    # grid (a coarser one leaves too few cells for several masks per view), no blur and SMALL_FH
    "cpu": dict(arch="resnet18", stem="small", img_size=32, batch_size=32, epochs=3, synthetic_size=1280,
                optimizer="adamw", lr=1.6e-2, wd=1e-6, momentum=0.9, warmup_epochs=0.5, crop_min=0.3,
                blur=False, mlp_dim=1024, workers=2, log_every=10, **SMALL_FH),
}


# ---------------------------------------------------------------------------- the method


def detcon_loss(pred1, pred2, target1, target2, ids1, ids2, temperature=0.1):
    """Contrastive-detection loss (paper eq. 3, official byol_nce_detcon): pred*/target* [B, M, D] (this
    rank's images, un-normalised), ids* [B, M]; targets are gathered across ranks. loss(1->2) + loss(2->1)."""
    return (_one_direction(pred1, ids1, target2, ids2, target1, temperature) +
            _one_direction(pred2, ids2, target1, ids1, target2, temperature))


def _one_direction(pred, ids, target_other, ids_other, target_same, temperature):
    """Rows: one view's predictions; columns: both views' targets of the global batch. Positives: the other
    view's columns of the row's image and id (label mass split evenly); the same view's are masked out."""
    b = pred.shape[0]
    p = F.normalize(pred.float(), dim=-1)  # [B, M, D]
    t_other = _gather(F.normalize(target_other.float(), dim=-1))  # [G, M, D], G = B * world
    t_same = _gather(F.normalize(target_same.float(), dim=-1))  # [G, M, D]
    rows, own = torch.arange(b, device=p.device), torch.arange(b, device=p.device) + b * common.get_rank()
    logits_other = torch.einsum("bmd,gnd->bmgn", p, t_other) / temperature  # [B, M, G, M]
    logits_same = torch.einsum("bmd,gnd->bmgn", p, t_same) / temperature  # [B, M, G, M]
    same_id_other = (ids[:, :, None] == ids_other[:, None, :]).float()  # [B, M, M]: positives (own image)
    same_id_same = (ids[:, :, None] == ids[:, None, :]).float()  # [B, M, M]: excluded (own image, incl. self)
    logits_same[rows, :, own, :] -= 1e9 * same_id_same  # official "infinity proxy": never a negative
    # log-sum-exp over all 2*G*M columns, without materialising their concatenation
    lse = torch.logaddexp(logits_other.flatten(2).logsumexp(-1),
                          logits_same.flatten(2).logsumexp(-1))  # [B, M]
    pos = ((same_id_other * logits_other[rows, :, own, :]).sum(-1)
           / same_id_other.sum(-1).clamp(min=1))  # [B, M] mean positive logit
    ce = lse - pos  # [B, M] = soft-label CE with the label mass split evenly over the positives
    return (row_weights(ids, ids_other) * ce).mean()


def row_weights(ids, ids_other):
    """[B, M]: 0 for a row whose id the other view did not draw, else 1 / its draws (a mask counts once)."""
    has_pos = (ids[:, :, None] == ids_other[:, None, :]).any(-1)  # [B, M]
    draws = (ids[:, :, None] == ids[:, None, :]).sum(-1)  # [B, M] >= 1 (itself)
    return has_pos.float() / draws


def _gather(x):
    """all_gather along dim 0 keeping the gradient of this rank's slice (DetCon_S backpropagates into it)."""
    if common.get_world_size() == 1:
        return x
    g, n, r = common.all_gather_nograd(x), x.shape[0], common.get_rank()
    return torch.cat([g[:r * n], x, g[(r + 1) * n:]])


def mlp(in_dim, hidden, out_dim):
    """BYOL head as the official haiku MLP: Linear (with bias) -> BN -> ReLU -> Linear (no bias)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim, bias=False))


def sample_ids(mask, num):
    """mask [N, S, S] ids < 2 S^2 -> [N, num] ids drawn uniformly with replacement among those present."""
    exists = torch.zeros(mask.shape[0], 2 * mask[0].numel(), device=mask.device)  # [N, K]: static K, no sync
    exists.scatter_(1, mask.flatten(1), 1.0)  # [N, K] 1 where the id owns >= 1 cell (every image has one)
    return torch.multinomial(exists, num, replacement=True)  # [N, num]


def mask_pool(fmap, mask, ids):
    """Mean of the feature map [N, C, S, S] over each id's cells (mask [N, S, S], ids [N, M]) -> [N, M, C]."""
    if fmap.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"feature map {tuple(fmap.shape[-2:])} and mask grid "
                         f"{tuple(mask.shape[-2:])} differ")
    sel = (mask.flatten(1)[:, None, :] == ids[:, :, None]).to(fmap.dtype)  # [N, M, S*S]
    sel = sel / sel.sum(-1, keepdim=True).clamp(min=1)  # [N, M, S*S], rows sum to 1
    return torch.bmm(sel, fmap.flatten(2).transpose(1, 2))  # [N, M, C]


class DetCon(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.temperature, self.num_masks, self.byol = args.temperature, args.num_masks, args.variant == "B"
        self.backbone, dim = common.build_backbone(args.arch, args.stem, args.img_size,
                                                   args.freeze_patch_proj, spatial=True)
        self.projector = mlp(dim, args.mlp_dim, args.proj_dim)
        if self.byol:  # DetCon_B: predictor on the online side, EMA target = backbone + projector
            self.predictor = mlp(args.proj_dim, args.mlp_dim, args.proj_dim)
            self.momentum_backbone = copy.deepcopy(self.backbone)  # exact copy at init
            self.momentum_projector = copy.deepcopy(self.projector)
            for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
                p.requires_grad = False  # updated only by EMA

    def online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def momentum_params(self):
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    @staticmethod
    def embed(backbone, projector, x, mask, ids):
        """Pool the BACKBONE map inside each sampled mask, then project: -> [N, M, D]."""
        pooled = mask_pool(common.feature_map(backbone, x), mask, ids)  # [N, M, C]
        return projector(pooled.flatten(0, 1)).view(*pooled.shape[:2], -1)  # [N, M, D]; BN over all N*M rows

    def forward(self, x1, mask1, x2, mask2, m):
        ids1, ids2 = sample_ids(mask1, self.num_masks), sample_ids(mask2, self.num_masks)  # [N, M] each
        z1 = self.embed(self.backbone, self.projector, x1, mask1, ids1)  # [N, M, D]
        z2 = self.embed(self.backbone, self.projector, x2, mask2, ids2)  # [N, M, D]
        matched = (ids1[:, :, None] == ids2[:, None, :]).any(-1).float().mean()  # rows with a positive
        if not self.byol:  # DetCon_S: the online outputs are both rows and columns
            return detcon_loss(z1, z2, z1, z2, ids1, ids2, self.temperature), matched
        p1 = self.predictor(z1.flatten(0, 1)).view_as(z1)  # [N, M, D]
        p2 = self.predictor(z2.flatten(0, 1)).view_as(z2)  # [N, M, D]
        with torch.no_grad():
            common.ema_update(self.momentum_params(), self.online_params(), m)  # first, as mocov3.py
            t1 = self.embed(self.momentum_backbone, self.momentum_projector, x1, mask1, ids1)
            t2 = self.embed(self.momentum_backbone, self.momentum_projector, x2, mask2, ids2)  # online ids
        return detcon_loss(p1, p2, t1, t2, ids1, ids2, self.temperature), matched


# ---------------------------------------------------------------------------- masks (method-specific data)


def fh_params(h, w):
    """FH (scale, min_size) for an h x w image: the official values at ImageNet size, scaled with the pixel
    count (min_size linearly, it is an area; scale sub-linearly, measured to keep ~10-15 segments/image)."""
    r = h * w / (400 * 350)  # a typical ImageNet image: where the official 1000 / 1000 apply
    return 1000.0 * r ** 0.4, max(int(1000 * r), 5)


def _felzenszwalb():
    try:  # optional dependency, imported lazily: grid masks need nothing
        from skimage.segmentation import felzenszwalb
    except ImportError:
        raise common.BadInput("--masks fh needs scikit-image: pip install scikit-image (or use --masks grid, "
                              "which needs nothing)") from None
    return felzenszwalb


def fh_shape(h, w, fh_size):
    """(h', w') that FH runs at: the image scaled so its longer side is <= fh_size (0 = native size)."""
    f = fh_size / max(h, w) if fh_size else 1.0
    return (max(1, round(h * f)), max(1, round(w * f))) if f < 1 else (h, w)


def fh_segments(img, fh_size=128, scale=0.0, min_size=0, sigma=0.8):
    """FH segments of a PIL image at fh_shape -> int32 ids [h', w'], 0..n-1."""
    h, w = fh_shape(img.height, img.width, fh_size)
    img = img.resize((w, h), Image.BILINEAR) if (h, w) != (img.height, img.width) else img
    auto_scale, auto_min = fh_params(h, w)
    ids = _felzenszwalb()(np.asarray(img), scale=scale or auto_scale, sigma=sigma,
                          min_size=min_size or auto_min)
    return ids.astype(np.int32)  # never uint8: the official cast merges ids > 255


def grid_mask(h, w, n=5):
    """n x n grid of ids [h, w] int32, 0..n^2-1 (the dependency-free fallback)."""
    return ((np.arange(h) * n // h)[:, None] * n + (np.arange(w) * n // w)[None, :]).astype(np.int32)


def cache_name(img, args):
    """An FH mask's cache file: a hash of every FH parameter and the decoded pixels (~1 ms at 500x375; path,
    size and mtime would miss a copy that keeps the mtime, and --corrupt); 256 subfolders."""
    params = f"{img.mode} {img.size} {int(args.fh_size)} {float(args.fh_scale)!r} {int(args.fh_min_size)} "
    key = hashlib.sha1(f"{params}{float(args.fh_sigma)!r}".encode() + img.tobytes()).hexdigest()
    return os.path.join(key[:2], f"{key}.png")


class MaskedImages(torch.utils.data.Dataset):
    """base[i] = (PIL image, label) -> ((image, ids [H, W] int32), label): the mask of the un-augmented image,
    computed in the loader worker; FH masks of images >= cache_min_side px are cached in cache_dir."""
    def __init__(self, base, args, cache_dir=None, cache_min_side=224):
        self.base, self.args, self.cache_dir, self.cache_min_side = base, args, cache_dir, cache_min_side
        if args.masks == "fh":
            _felzenszwalb()  # fail early, in the main process, when scikit-image is missing

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return (img, self.mask(img)), label

    def mask(self, img):
        w, h = img.size
        a = self.args
        if a.masks == "grid":
            return torch.from_numpy(grid_mask(h, w, a.grid_masks))
        shape, path, ids = fh_shape(h, w, a.fh_size), None, None
        if self.cache_dir and min(h, w) >= self.cache_min_side:
            path = os.path.join(self.cache_dir, cache_name(img, a))
            if os.path.isfile(path):  # written atomically: never half a file
                ids = np.asarray(Image.open(path), dtype=np.int32)
        if ids is None or ids.shape != shape:  # a file of another size was not written for this image
            ids = fh_segments(img, a.fh_size, a.fh_scale, a.fh_min_size, a.fh_sigma)
            if path and ids.max() < 2**16:  # a 16-bit PNG
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with common.atomic_path(path, ".png") as tmp:  # no worker or rank reads half a file
                    Image.fromarray(ids.astype(np.uint16)).save(tmp)
        if ids.shape != (h, w):  # back to image size, nearest, so crop boxes apply to image and mask alike
            ids = ids[(np.arange(h) * ids.shape[0] // h)[:, None],
                      (np.arange(w) * ids.shape[1] // w)[None, :]]
        return torch.from_numpy(np.ascontiguousarray(ids))


def reduce_mask(mask, grid):
    """ids [..., H, W] -> [..., S, S] long, S = grid: each cell's majority id (= one-hot -> average-pool ->
    argmax, ties -> lowest id) without the [K, H, W] one-hot tensor."""
    *lead, h, w = mask.shape
    m = mask.reshape(-1, h * w).long()  # [N, H*W]
    k = int(m.max()) + 1
    cell = torch.from_numpy(grid_mask(h, w, grid)).long().flatten().to(m.device)  # [H*W] each pixel's cell
    counts = torch.zeros(m.shape[0], grid * grid * k, dtype=torch.long, device=m.device)  # per (cell, id)
    counts.scatter_add_(1, cell[None] * k + m, torch.ones_like(m))  # [N, S*S*K]
    return counts.view(-1, grid * grid, k).argmax(-1).view(*lead, grid, grid)


def crop_windows(u, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """BYOL's get_random_crop_window for uniforms u [n, 4] (area, aspect, top, left) -> boxes [n, 4] float64
    (top, left, height, width); sides rounded as jnp.round, clamped; no retries, unlike RandomResizedCrop."""
    u = u.double()
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])  # [n]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])  # [n]
    bw = torch.round(torch.sqrt(area * aspect)).clamp(1, w)  # [n]
    bh = torch.round(torch.sqrt(area / aspect)).clamp(1, h)  # [n]
    top, left = torch.floor(u[:, 2] * (h - bh + 1)), torch.floor(u[:, 3] * (w - bw + 1))  # [n]
    return torch.stack([top, left, bh, bw], 1)  # [n, 4]


def crop_box(h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """One crop_windows box from one draw of torch's RNG -> (top, left, height, width) ints."""
    u = torch.rand(1, 4, generator=generator, dtype=torch.float64)  # area, aspect, top, left
    return tuple(int(v) for v in crop_windows(u, h, w, scale, ratio)[0])


def crop_ids(ids, boxes, size):
    """ids [n, H, W] cropped to each box [n, 4] and resized nearest to [n, size, size], the id under each
    output pixel's centre as the bilinear image resize (torchvision's Mask resize drifts to the top-left)."""
    top, left, bh, bw = boxes.long().unbind(1)  # [n] each
    k = 2 * torch.arange(size, device=ids.device) + 1  # [size]
    rows = top[:, None] + k * bh[:, None] // (2 * size)  # [n, size] floor((i + 0.5) * bh / size), in ints
    cols = left[:, None] + k * bw[:, None] // (2 * size)  # [n, size]
    n = torch.arange(len(ids), device=ids.device)[:, None, None]
    return ids[n, rows[:, :, None], cols[:, None, :]]  # [n, size, size]


def nearest_exact(ids, size):
    """ids [h, w] -> [size, size]: crop_ids with the whole image as the box."""
    return crop_ids(ids[None], torch.tensor([[0, 0, *ids.shape]], device=ids.device), size)[0]


def relabel(cells):
    """ids [n, V, S, S] -> each image's ids renumbered 0..U-1 over all its views (torch.unique's inverse)."""
    flat = cells.flatten(1).long()  # [n, V*S*S]
    present = torch.zeros(len(flat), int(flat.max()) + 1, dtype=torch.long, device=flat.device)  # [n, K]
    present.scatter_(1, flat, 1)
    return (present.cumsum(1) - 1).gather(1, flat).view(cells.shape)  # [n, V, S, S]


def byol_colour(blur=True):
    """BYOL's pair (MoCo v3's views) less crop and flip, done by JointViews: PIL -> normalised [3, H, W]."""
    def ops(blur_p, *solarize):
        return [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                T.RandomApply([common.RandomBlur()], p=blur_p if blur else 0.0),  # sigma ~ U(0.1, 2)
                *solarize, T.ToTensor(), T.Normalize(common.MEAN, common.STD)]  # ImageNet statistics
    return ops(1.0), ops(0.1, T.RandomSolarize(threshold=128, p=0.2))  # view 2: rarely blurred, solarized


class JointViews(common.TwoViews):
    """(image, ids) -> (view1, mask1 [S, S], view2, mask2 [S, S]), both views' ids relabelled jointly to
    0..U-1 (U <= 2 S^2). gpu (--gpu-aug) moves only the colour ops to the device (TwoViews.finish)."""
    def __init__(self, img_size, crop_min, blur, grid, gpu=False):
        self.img_size, self.scale, self.grid = img_size, (crop_min, 1.0), grid
        colour = byol_colour(blur)  # the two views' colour ops (the geometry is views()', joint)
        self.recipes = tuple(common.device_recipe(ops)[2] for ops in colour)  # what the device runs
        self.photometric = self.recipes if gpu else None  # what TwoViews.finish runs on the device
        self.colour = [T.PILToTensor()] * 2 if gpu else [T.Compose(ops) for ops in colour]

    def views(self, img, ids):
        """Full-resolution views and masks: per view ONE crop_box and ONE flip for the PIL image (bilinear,
        antialiased) and its ids [H, W] (nearest) alike; the colour ops touch the image only."""
        out = []
        for colour in self.colour:
            top, left, bh, bw = crop_box(*v2.functional.get_size(img), self.scale)
            view = v2.functional.resized_crop(img, top, left, bh, bw, [self.img_size] * 2, antialias=True)
            mask = nearest_exact(ids[top:top + bh, left:left + bw], self.img_size)  # [size, size]
            if torch.rand(()) < 0.5:
                view, mask = v2.functional.horizontal_flip(view), mask.flip(-1)
            out += [colour(view), mask]  # [3, H, W], [H, W]
        return out

    def __call__(self, sample):
        v1, m1, v2_, m2 = self.views(*sample)
        cells = relabel(reduce_mask(torch.stack([m1, m2]), self.grid)[None])[0]  # [2, S, S], joint ids
        return v1, cells[0], v2_, cells[1]

    def finish_joint(self, run, x1, m1, x2, m2, step):
        """The batch on the device -> (view 1, cells 1 [n, S, S], view 2, cells 2). With --data-on-device x1
        and m1 are the stored images and ids: views() and __call__ run here, batched, drawn per sample."""
        if not run.args.data_on_device:
            x1, x2 = self.finish(run, x1, x2, step)  # [n, 3, H, W] each
            return x1, run.to_device(m1), x2, run.to_device(m2)
        gen, x = common.device_generator(run, step), x1.float().div_(255)  # x [n, 3, S, S] in [0, 1]
        views, masks = [], []
        for recipe in self.recipes:
            u = torch.rand(len(x), 4, generator=gen, device=gen.device, dtype=torch.float64)  # [n, 4]
            boxes = crop_windows(u, x.shape[2], x.shape[3], self.scale)  # [n, 4]
            flip = torch.rand(len(x), generator=gen, device=gen.device) < 0.5  # [n]
            view = common.flip_where(common.crop_resize(x, boxes, self.img_size), flip)  # [n, 3, H, W]
            views.append(common.colour(run, view, recipe, gen))
            masks.append(common.flip_where(crop_ids(m1, boxes, self.img_size), flip))  # [n, H, W]
        cells = relabel(reduce_mask(torch.stack(masks, 1), self.grid))  # [n, 2, S, S]
        return views[0], cells[:, 0], views[1], cells[:, 1]


def show_masks(ds, views, path, n=6, tile=128):
    """PNG: per image (rows) the image | its mask, then per view: the view | its mask | its feature-grid mask.
    Also prints the mask cost (ms/image, one process) and the mean number of masks per image."""
    rows, cmap = [], common.palette()
    for i in np.linspace(0, len(ds) - 1, n).astype(int):
        (img, ids), _ = ds[int(i)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(i))
            v1, m1, v2_, m2 = views.views(img, ids)
        img = np.asarray(img, dtype=np.float64)
        rows.append([img, 0.4 * img + 0.6 * cmap[ids.numpy() % 255]])  # a fixed colour per id, never "ignore"
        for view, mask in ((common.to_image(v1), m1), (common.to_image(v2_), m2)):
            grid = reduce_mask(mask, views.grid).numpy()
            rows[-1] += [view, 0.4 * view + 0.6 * cmap[mask.numpy() % 255], cmap[grid % 255]]
    heads = ["image", "mask", "view 1", "mask 1", "grid 1", "view 2", "mask 2", "grid 2"]
    common.save_sheet(path, rows, heads, tile)
    imgs = [ds.base[int(i)][0] for i in np.linspace(0, len(ds) - 1, min(len(ds), 32)).astype(int)]
    t = time.perf_counter()
    masks = [ds.mask(im) for im in imgs]  # ds has no cache folder: computed
    ms, (w, h) = 1000 * (time.perf_counter() - t) / len(imgs), imgs[0].size
    print(f"wrote {path}; {ds.args.masks} masks: {ms:.1f} ms/image at {w}x{h} (one process), "
          f"{np.mean([len(np.unique(m.numpy())) for m in masks]):.1f} masks/image", flush=True)


# ---------------------------------------------------------------------------- training


def check_args(args):
    """Method-specific checks (BadInput), output paths included -> the side of the final feature grid."""
    if args.variant not in ("B", "S"):
        raise common.BadInput(f"unknown --variant {args.variant!r}; choose B (DetCon_B) or S (DetCon_S)")
    if args.masks not in ("fh", "grid"):
        raise common.BadInput(f"unknown --masks {args.masks!r}; choose fh or grid")
    grid = common.final_grid(args.arch, args.stem, args.img_size, need=2, method="DetCon")  # a map, >= 2x2
    if args.mask_cache not in ("auto", "off"):
        common.check_output_dir("--mask-cache", args.mask_cache)
    if args.show_masks:
        common.check_output_file("--show-masks", args.show_masks, args.output_dir)
    if args.warmup_epochs < 0:
        args.warmup_epochs = 0.01 * args.epochs  # official: 1% warmup
    return grid


@common.user_errors
def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    grid = check_args(args)  # method-specific: --variant, --masks, a final feature map >= 2x2, 1% warmup
    views = JointViews(args.img_size, args.crop_min, args.blur, grid, args.gpu_aug)
    if args.show_masks:
        return show_masks(MaskedImages(common.load_dataset(args, "train"), args), views, args.show_masks)
    run = common.setup(args, "detcon")

    # ---- data: masks from the un-augmented image, in the loader workers (--data-on-device: once, stored)
    stored = dataclasses.replace(args, fh_size=0, fh_scale=0, fh_min_size=0)  # the stored size's FH settings
    train_ds, steps_per_epoch = common.pretrain_data(args, run, views, ids=MaskedImages(None, stored).mask)
    if not args.data_on_device:  # --mask-cache -> (folder or None, smallest image side cached)
        cache = {"auto": (os.path.join(run.out, "fh_cache"), 224), "off": (None, 0)}
        train_ds.base = MaskedImages(train_ds.base, args, *cache.get(args.mask_cache, (args.mask_cache, 0)))
    knn = common.knn_monitor(args, run)

    # ---- model
    model, step_model = common.prepare_model(DetCon(args), run, sync_bn=True)  # official: cross-replica BN

    # ---- optimizer & schedules
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.build_optimizer(args, params, args.trust_coefficient)  # LARS's trust coefficient
    scaler = common.grad_scaler(run)
    base_lr = args.lr * args.batch_size / 256

    # ---- resume
    state = dict(model=model, optimizer=optimizer, scaler=scaler)  # what a checkpoint holds
    log = common.Logger(run, steps_per_epoch, common.resume(run, **state))

    # ---- train loop
    for epoch in log.epochs():  # the epochs left: none when a finished run is resumed
        model.train()
        loader = common.epoch_loader(train_ds, run, epoch, log.step % steps_per_epoch)
        for i, ((x1, m1, x2, m2), _) in log.timed(loader):  # i: index in the epoch
            e = epoch + i / steps_per_epoch  # fractional epoch: schedules are per iteration
            lr = common.cosine_lr(e, base_lr, args.warmup_epochs, args.epochs)
            common.set_lr(optimizer, lr)
            m = common.cosine_momentum(e, args.epochs, args.momentum)
            x1, m1, x2, m2 = views.finish_joint(run, x1, m1, x2, m2, log.step)  # [n, 3, H, W], [n, S, S]
            with run.autocast():
                loss, matched = step_model(x1, m1, x2, m2, run.scalar(m))
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach(), lr=lr, momentum=m, matched=matched)
            if common.end_of_step(run, log, state):  # --save-every, SIGTERM/SIGUSR1, the last step
                break

        # ---- eval & checkpoint
        log.evaluate(model.backbone, knn, epoch)
        common.save_checkpoint(run, log, state, epoch_end=True)  # every --save-epochs epochs
    common.export_backbone(run, model.backbone)
    log.summary(variant=args.variant, masks=args.masks)


if __name__ == "__main__":
    main()
