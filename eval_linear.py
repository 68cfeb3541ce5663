"""Evaluate a pretrained backbone: weighted kNN, linear probe, fine-tuning, or dense probes.

Protocols (every number this script prints says which one produced it):
  knn       weighted kNN (InstDisc voting, cosine similarity, k = 200, T = 0.1) of the pooled,
            L2-normalised features; train split = bank, val split = queries; no training.
  linear    MoCo v3's linear protocol: the ONLINE backbone, projector dropped, frozen and kept in
            eval() mode (BN statistics frozen); a Linear head initialised N(0, 0.01), bias 0; SGD
            momentum 0.9, wd 0, lr 0.1 x B/256 (ViT: 3 x B/256), cosine, no warmup; RandomResizedCrop +
            flip for train, resize + center crop for val. The backbone is checked unchanged at the end.
  finetune  all weights trained (SGD momentum 0.9, wd 1e-4, lr 0.1 x B/256, cosine); with
            `--pretrained none` this is the supervised-from-scratch baseline.
  seg       frozen linear segmentation probe (the Leopart / VICRegL protocol, in small): the online
            backbone frozen in eval(); its final feature map (ResNet layer4, ViT patch tokens) goes through a
            1x1 conv to the classes (N(0, 0.01), bias 0), bilinearly upsampled to --seg-res (0 = the crop
            size); cross-entropy over the pixels not labelled 255; SGD momentum 0.9, wd 0, lr 0.1 x B/256,
            cosine, no warmup. Train: RandomResizedCrop(scale 0.8-1) + flip, the same box and flip on image
            and mask (the mask resized nearest); val: image (bilinear) and mask (nearest) resized to
            --img-size x --img-size. The 1x1 conv is applied before the upsampling: both are linear and the
            bilinear weights sum to 1, so this equals "upsample, then classify" at a fraction of the memory.
            The backbone is checked unchanged at the end.
  seg-knn   training-free dense retrieval (Hummingbird-style): a bank of (L2-normalised feature, label
            distribution) for every cell of the final feature grid of the train images (resized like val;
            a cell's distribution is the histogram of its valid mask pixels; cells with only 255 pixels are
            left out); every val cell takes the label distributions of its --knn-k most similar bank cells
            (cosine), weighted softmax(sim / --knn-t) (the kNN monitor's exp(sim / T) votes, normalised);
            the [classes] scores per cell are upsampled bilinearly to the mask; argmax. The bank is scanned
            in chunks, so memory is the bank plus one chunk (benchmarks/results/dense_memory.md).

Dense metrics: mIoU over the classes present in the ground truth or the prediction of the val split (one
confusion matrix over all pixels not labelled 255, at the --img-size resolution of the resized masks) and
pixel accuracy, both in percent.

Dense data (--data): `synthetic` (the renderer's per-pixel labels: 0 background, shape class + 1, so 11
classes), a PASCAL VOC 2012 root (JPEGImages/, SegmentationClass/ palette PNGs, ImageSets/Segmentation/
{train,val}.txt; SegmentationClassAug/ + train_aug.txt for train when present; 21 classes), or a folder
with {train,val}/images/*.jpg|png and {train,val}/masks/<same stem>.png (class ids; classes = the largest
train id + 1, or --num-classes). 255 = ignore everywhere.

`--pretrained` takes a checkpoint.pth or backbone.pth written by any training script (their arch,
stem and image size are used; a conflicting flag is an error, except --img-size in the dense modes,
where the probe resolution is an evaluation choice), or `none` for a random init.

  python eval_linear.py --pretrained runs/mocov3/backbone.pth --mode knn
  python eval_linear.py --pretrained runs/mocov3/checkpoint.pth --mode linear --epochs 90 --data /imagenet
  torchrun --nproc_per_node=8 eval_linear.py --pretrained backbone.pth --mode linear --data /imagenet
  python eval_linear.py --pretrained none --mode finetune   # supervised baseline
  python eval_linear.py --pretrained runs/densecl/backbone.pth --mode seg --show-seg seg.png
  python eval_linear.py --pretrained backbone.pth --mode seg --data VOC2012 --img-size 448 --seg-res 100
  python eval_linear.py --pretrained backbone.pth --mode seg-knn --data VOC2012 --img-size 448

The last line printed is a JSON summary. Classification modes: top1 and top5 (percent). Dense modes:
miou, pixel_acc and iou (per class, null for a class absent from ground truth and prediction), all in
percent; their top1 and top5 are null (there is no image-level prediction). Every mode: val_images (each
val image is counted once, also under torchrun) and protocol.

Dense defaults (ours; explicit flags and the file's arch, stem and size win): synthetic (`cpu` preset)
ResNet-18 with the small stem at 32 px (a 4x4 final grid, as DenseCL's and DetCon's cpu presets), 1280
train images (256 val), 4 probe epochs at batch 128, so each dense mode runs within 2 minutes on 2 CPU
cores; other data 448 px (Leopart's VOC size), 25 epochs (Leopart's), batch 64. The grid decides what a
dense probe can show: a 2x2 grid (ResNet stem at 64 px, the MoCo v3 cpu preset) cannot place a shape, so
evaluate such a backbone with `--img-size 128` (4x4). seg-knn uses --knn-k and --knn-t (k = 200, T = 0.1).
"""
import dataclasses
import json
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import common

MODES = ("knn", "linear", "finetune", "seg", "seg-knn")
DENSE = ("seg", "seg-knn")


@dataclasses.dataclass
class Args(common.CommonArgs):
    pretrained: str = "none"
    """checkpoint.pth or backbone.pth of a training run, or none (random init)"""
    mode: str = "knn"
    """knn, linear, finetune, seg (frozen linear segmentation probe) or seg-knn (dense retrieval)"""
    arch: str = "resnet18"
    """backbone when --pretrained none (otherwise read from the file)"""
    epochs: int = 90
    """training epochs for linear / finetune / seg (ImageNet linear: 90; seg: see the dense defaults)"""
    batch_size: int = 256
    """global batch (ImageNet linear: 1024)"""
    lr: float = 0.0
    """base lr for batch 256 (0 = protocol default: linear 0.1, ViT linear 3.0, finetune 0.1, seg 0.1)"""
    wd: float = -1.0
    """weight decay (negative = protocol default: linear 0, finetune 1e-4, seg 0)"""
    optimizer: str = "sgd"
    """sgd (the protocol's optimizer)"""
    bn_head: bool = False
    """put a BatchNorm1d(affine=False) before the linear head (less sensitive to the lr; linear/finetune)"""
    labels_per_class: int = 0
    """train the head (and fill the kNN bank) with K seeded labeled images per class (0 = all)"""
    granularity: str = "fine"
    """fine (the dataset's classes) or coarse (CIFAR-100: 20 superclasses; synthetic: 3 shape families;
    folders: --coarse-map)"""
    coarse_map: str = ""
    """JSON file {class folder name: coarse class name} for --granularity coarse on an image folder"""
    seg_res: int = 0
    """seg: side of the logits the loss is computed on (masks resized nearest to it; 0 = the crop size;
    Leopart: 100)"""
    num_classes: int = 0
    """dense modes: number of classes (0 = auto: synthetic 11, VOC 21, folder: largest train mask id + 1)"""
    show_seg: str = ""
    """dense modes: write a PNG of image / ground truth / prediction for the first val images to this path"""


PRESETS = {
    "imagenet": {},
    "cifar": dict(stem="small", img_size=32, epochs=100),
    "cpu": dict(img_size=64, epochs=10, batch_size=128, workers=2, log_every=20),
}
# dense modes: applied over PRESETS for every flag not given (ours; "imagenet" follows Leopart's VOC size and
# epochs)
DENSE_PRESETS = {
    "imagenet": dict(img_size=448, epochs=25, batch_size=64),
    "cifar": {},
    # the small stem at 32 px gives DenseCL's and DetCon's cpu-preset 4x4 grid (a 2x2 grid, ResNet stem
    # at 64 px, cannot place a shape: upsampled from 2x2, even the true label shares of each cell predict
    # background only); 4 epochs of 1280 images keep each dense mode within 2 minutes on 2 cores
    "cpu": dict(stem="small", img_size=32, synthetic_size=1280, epochs=4),
}


def load_backbone(path):
    """(state_dict, meta) from a backbone.pth or checkpoint.pth; BadInput if it is neither."""
    obj = common.load_file(path)
    if isinstance(obj, dict) and "model" in obj and "args" in obj:  # training checkpoint: the online backbone
        model = obj["model"]
        sd = OrderedDict((k[len("backbone."):], v) for k, v in model.items() if k.startswith("backbone."))
        a = obj["args"]
        meta = {"method": obj.get("method"), "encoder": "online", "arch": a.get("arch"),
                "stem": a.get("stem"), "img_size": a.get("img_size")}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, meta = obj, dict(getattr(obj, "_metadata", {}).get("effssl", {}))
    else:
        raise common.BadInput(f"{path} is not a compatible checkpoint "
                              "(expected checkpoint.pth or backbone.pth)")
    if not sd:
        raise common.BadInput(f"{path} holds no backbone weights")
    return sd, meta



def check_meta(args, meta, flags_given, free=()):
    """Use the arch/stem/img size recorded in the file; an explicit conflicting flag is an error (unless the
    key is in `free`)."""
    for key in ("arch", "stem", "img_size"):
        if meta.get(key) is None or (key in free and key in flags_given):
            continue
        if key in flags_given and getattr(args, key) != meta[key]:
            raise common.BadInput(f"--{key.replace('_', '-')} {getattr(args, key)} conflicts with the "
                                  f"pretrained file, which was made with {key}={meta[key]}")
        setattr(args, key, meta[key])


SYNTHETIC_COARSE = {"disk": "round", "ring": "round", "crescent": "round", "square": "polygon",
                    "frame": "polygon", "triangle": "polygon", "plus": "stroke", "star": "stroke",
                    "bar": "stroke", "ell": "stroke"}


def coarse_labels(args, ds):
    """Coarse label of every image of ds (the granularity lens of Cole et al.)."""
    if args.data == "cifar100":  # torchvision keeps only the fine labels; the coarse ones are in its file
        import pickle
        name = (ds.train_list if ds.train else ds.test_list)[0][0]
        with open(os.path.join(ds.root, ds.base_folder, name), "rb") as f:
            return pickle.load(f, encoding="latin1")["coarse_labels"]
    if args.data == "synthetic":
        mapping = SYNTHETIC_COARSE
    elif args.coarse_map:
        try:
            mapping = json.load(open(args.coarse_map))
        except (OSError, ValueError) as e:
            raise common.BadInput(f"cannot read --coarse-map {args.coarse_map}: {e}") from None
    else:
        raise common.BadInput("--granularity coarse needs cifar100, synthetic, or an image folder with "
                              "--coarse-map")
    missing = sorted(set(ds.classes) - set(mapping))
    if missing:
        raise common.BadInput(f"--coarse-map has no coarse class for {missing[:5]}")
    names = sorted(set(mapping[c] for c in ds.classes))
    return [names.index(mapping[ds.classes[y]]) for y in common.labels_of(ds)]


def train_transform(img_size):
    """RandomResizedCrop + flip: the linear-probe / fine-tune training transform (evaluation only)."""
    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(common.MEAN, common.STD)])


def device_train_batch(run, x, step):
    """train_transform on the device (--data-on-device): stored uint8 images [n, 3, S, S] -> RandomResizedCrop
    (scale 0.08-1) + flip per sample, normalised [n, 3, img_size, img_size]."""
    gen = common.device_generator(run, step)
    x = common.normalize(common.device_crops(x.float().div_(255), run.args.img_size, (0.08, 1.0), gen))
    return x.contiguous(memory_format=torch.channels_last) if run.args.channels_last else x


def eval_splits(args):
    """(train, val) labeled datasets after --granularity, --labels-per-class and (train only) --corrupt."""
    train, val = common.load_dataset(args, "train"), common.load_dataset(args, "val")
    if val is None or min(common.labels_of(train)) < 0:
        raise common.BadInput(f"{args.data} has no labeled train and val split to evaluate on")
    if args.granularity not in ("fine", "coarse"):
        raise common.BadInput(f"unknown granularity {args.granularity!r}; choose from fine, coarse")
    if args.granularity == "coarse":
        train, val = (Relabeled(ds, coarse_labels(args, ds)) for ds in (train, val))
    if args.labels_per_class:
        order = common.balanced_order(common.labels_of(train), args.seed)
        train = common.Subset(train, sorted(order[:args.labels_per_class * common.num_classes(train)]))
    if args.corrupt:  # the supervised baseline trains on the same corrupted images; val stays clean
        train = common.Corrupted(train, common.parse_corruptions(args.corrupt), args.seed)
    return train, val


class Relabeled(torch.utils.data.Dataset):
    def __init__(self, base, targets):
        self.base, self.targets = base, targets

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], self.targets[i]


def shard(n, run):
    """This rank's indices of a dataset of n items for evaluation: every item exactly once over all ranks
    (DistributedSampler would pad the last shard with duplicates, which a metric would count twice)."""
    return list(range(run.rank, n, run.world))


@torch.no_grad()
def evaluate(net, head, ds, run):
    """(top-1, top-5 in percent, number of images) of head(net(x)) on ds, sharded across ranks."""
    net.eval()
    head.eval()
    loader = torch.utils.data.DataLoader(ds, 256, sampler=shard(len(ds), run), num_workers=run.args.workers)
    if isinstance(ds, common.HeldSplit):  # --data-on-device: resize + centre crop on the device
        loader = ds.eval_batches(shard(len(ds), run), 256, run.args.img_size)
    hits = torch.zeros(3, dtype=torch.long, device=run.device)  # top-1 hits, top-5 hits, images: exact counts
    for x, y in loader:
        with run.autocast():
            logits = head(net(run.to_device(x))).float()  # [n, classes]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.to(run.device)[:, None]  # [n, 5]
        hits += torch.stack([top[:, 0].sum(), top.any(1).sum(), torch.tensor(len(y), device=run.device)])
    if run.world > 1:
        torch.distributed.all_reduce(hits)
    top1, top5, n = hits.tolist()
    return 100 * top1 / n, 100 * top5 / n, n


# ============================================================================ dense data

IGNORE = 255  # the VOC convention: boundary / unlabeled pixels, left out of the loss, the bank and the metric
VOC_CLASSES = 21  # background + 20 object classes
SHOW_N = 6  # val images drawn by --show-seg


def read_mask(path):
    """Class ids [H, W] int64 of a mask PNG: a palette PNG ("P": the palette index is the class id, as in
    VOC's SegmentationClass) or grayscale ids ("L", "I", "I;16"); BadInput naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            m = Image.open(f)
            m.load()
    except Exception as e:
        raise common.BadInput(f"cannot read mask {path}: {e}") from None
    if m.mode not in ("P", "L", "I", "I;16"):
        raise common.BadInput(f"mask {path} is a {m.mode} image: expected a palette or grayscale PNG of "
                              f"class ids")
    return np.array(m).astype(np.int64)


def check_pair(img, ids, img_path, mask_path, n_classes):
    """BadInput naming the file when the mask does not fit its image or holds an unknown class id."""
    if ids.shape != (img.height, img.width):
        raise common.BadInput(f"mask {mask_path} is {ids.shape[1]}x{ids.shape[0]} but its image {img_path} "
                              f"is {img.width}x{img.height}")
    bad = ids[(ids >= n_classes) & (ids != IGNORE)]
    if bad.size:
        raise common.BadInput(f"mask {mask_path} has label id {int(bad.max())}, not below the number of "
                              f"classes {n_classes} (255 = ignore; see --num-classes)")


class SegFiles(torch.utils.data.Dataset):
    """(PIL image, class ids [H, W] int64) from (image path, mask path) pairs; each checked when loaded."""
    def __init__(self, pairs, n_classes):
        self.pairs, self.n_classes = pairs, n_classes

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, mask_path = self.pairs[i]
        img, ids = common.load_image(img_path), read_mask(mask_path)
        check_pair(img, ids, img_path, mask_path, self.n_classes)
        return img, ids


class SyntheticSeg(torch.utils.data.Dataset):
    """The built-in synthetic images with the renderer's per-pixel labels (0 background, shape class + 1)."""
    def __init__(self, base, n_classes):
        self.base, self.n_classes = base, n_classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, mask = self.base.segmentation(i)
        ids = np.array(mask).astype(np.int64)
        check_pair(img, ids, f"synthetic image {i}", f"synthetic mask {i}", self.n_classes)
        return img, ids


def existing_pairs(pairs):
    """The eager check: every image and mask of the list exists (BadInput naming the first missing file)."""
    for img_path, mask_path in pairs:
        if not os.path.isfile(img_path):
            raise common.BadInput(f"image not found: {img_path}")
        if not os.path.isfile(mask_path):
            raise common.BadInput(f"no mask for image {img_path}: {mask_path} not found")
    return pairs


def is_voc(root):
    dirs = (("JPEGImages",), ("ImageSets", "Segmentation"))
    return all(os.path.isdir(os.path.join(root, *d)) for d in dirs)


def voc_pairs(root, split):
    """VOC 2012 (image, mask) paths of a split (train: SegmentationClassAug + train_aug.txt if present)."""
    lists = os.path.join(root, "ImageSets", "Segmentation")
    aug = split == "train" and os.path.isfile(os.path.join(lists, "train_aug.txt")) and os.path.isdir(
        os.path.join(root, "SegmentationClassAug"))
    list_file = os.path.join(lists, "train_aug.txt" if aug else f"{split}.txt")
    if not os.path.isfile(list_file):
        raise common.BadInput(f"VOC split list not found: {list_file}")
    # a line is an image id, or (some train_aug.txt copies) "/JPEGImages/ID.jpg /SegmentationClassAug/ID.png"
    names = [os.path.splitext(os.path.basename(line.split()[0]))[0]
             for line in open(list_file) if line.strip()]
    if not names:
        raise common.BadInput(f"VOC split list {list_file} is empty")
    masks = os.path.join(root, "SegmentationClassAug" if aug else "SegmentationClass")
    return existing_pairs([(os.path.join(root, "JPEGImages", f"{n}.jpg"), os.path.join(masks, f"{n}.png"))
                           for n in names])


def folder_pairs(root, split):
    """(image, mask) paths of root/split/images/* and root/split/masks/<same stem>.png."""
    img_dir, mask_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
    if not os.path.isdir(img_dir):
        raise common.BadInput(f"{img_dir} not found: a segmentation folder needs train/images and val/images")
    files = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(common.IMG_EXT))
    if not files:
        raise common.BadInput(f"no images found in {img_dir}")
    return existing_pairs([(os.path.join(img_dir, f), os.path.join(mask_dir, os.path.splitext(f)[0] + ".png"))
                           for f in files])


def folder_classes(pairs):
    """Largest class id (255 left out) over the masks + 1."""
    top = -1
    for _, mask_path in pairs:
        ids = read_mask(mask_path)
        ids = ids[ids != IGNORE]
        top = max(top, int(ids.max()) if ids.size else -1)
    return top + 1


def seg_splits(args):
    """(train, val) datasets of (PIL image, class ids [H, W]) and the number of classes, from --data."""
    if args.data == "synthetic":
        n = args.num_classes or len(common.SHAPES) + 1  # background + one class per shape
        return [SyntheticSeg(common.load_dataset(args, s), n) for s in ("train", "val")] + [n]
    if not os.path.isdir(args.data):
        raise common.BadInput(f"--mode {args.mode} needs masks: --data synthetic, a VOC 2012 root or a "
                              f"folder with train/images and train/masks ({args.data} is not a folder)")
    if is_voc(args.data):
        n = args.num_classes or VOC_CLASSES
        return [SegFiles(voc_pairs(args.data, s), n) for s in ("train", "val")] + [n]
    if not os.path.isdir(os.path.join(args.data, "train", "images")):
        raise common.BadInput(f"{args.data} is neither a VOC root (JPEGImages/, ImageSets/Segmentation/) nor "
                              f"a folder with train/images and train/masks")
    train, val = folder_pairs(args.data, "train"), folder_pairs(args.data, "val")
    n = args.num_classes or folder_classes(train)
    if n < 1:
        raise common.BadInput(f"the train masks of {args.data} hold no class id (only 255)")
    return SegFiles(train, n), SegFiles(val, n), n


class SegTransform:
    """Paired geometry on (PIL image, ids [H, W]) -> (normalised image [3, S, S], ids [S, S] int64): the mask
    is a tv_tensors.Mask, so it gets the image's crop box and flip and is resized nearest (ids stay ids).
    train: RandomResizedCrop(scale 0.8-1) + horizontal flip; val: resize to S x S (aspect not kept, as
    Leopart)."""
    def __init__(self, img_size, train):
        geometry = [v2.Resize((img_size, img_size), antialias=True)]
        if train:
            geometry = [v2.RandomResizedCrop(img_size, scale=(0.8, 1.0), antialias=True),
                        v2.RandomHorizontalFlip()]
        self.tf = v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(common.MEAN, common.STD)])

    def __call__(self, img, ids):
        x, m = self.tf(tv_tensors.Image(TF.pil_to_tensor(img)), tv_tensors.Mask(torch.from_numpy(ids)[None]))
        return x.as_subclass(torch.Tensor), m[0].as_subclass(torch.Tensor)  # [3, S, S], [S, S]


class SegViews(common.Views):
    """common.Views for (image, mask) pairs: the paired transform, seeded as Views seeds its samples."""
    def __getitem__(self, i):
        img, ids = self.base[i]
        with self.rng(i):
            return self.transform(img, ids)


# ============================================================================ dense metrics & retrieval


def confusion_matrix(pred, gt, n_classes):
    """[C, C] pixel counts (row: ground truth, column: prediction) over the pixels whose gt is not IGNORE."""
    valid = gt != IGNORE
    counts = torch.bincount(gt[valid] * n_classes + pred[valid], minlength=n_classes ** 2)  # [C * C]
    return counts.reshape(n_classes, n_classes)


def seg_metrics(conf):
    """(mIoU, pixel accuracy, per-class IoU or None) in percent from a confusion matrix [C, C]. The mean runs
    over the classes present in the ground truth or the prediction (a class absent from both has no IoU)."""
    conf = conf.double()
    tp = conf.diag()  # [C]
    union = conf.sum(0) + conf.sum(1) - tp  # [C] gt or predicted
    present = union > 0
    iou = 100 * tp / union.clamp(min=1)  # [C]
    miou = iou[present].mean().item() if present.any() else float("nan")
    acc = (100 * tp.sum() / conf.sum().clamp(min=1)).item()
    return miou, acc, [round(v, 4) if p else None for v, p in zip(iou.tolist(), present.tolist())]


def upsample(scores, size):
    """Bilinear upsampling of per-cell scores [N, C, s, s] -> [N, C, H, W] (align_corners=False: cells as
    equal bins)."""
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def seg_loss(logits, target):
    """Mean cross-entropy over the pixels not labelled IGNORE: logits [N, C, H, W], target [N, H, W]
    (a batch with no valid pixel gives 0, not NaN)."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def cell_histograms(ids, n_classes, grid):
    """Valid-pixel counts per class in every cell of a grid x grid partition: ids [N, H, W] -> [N, grid^2, C].
    Pixel (h, w) falls in cell (h * grid // H, w * grid // W): equal bins, as the bilinear upsampling reads
    them."""
    n, h, w = ids.shape
    rows = torch.arange(h, device=ids.device) * grid // h  # [H]
    cols = torch.arange(w, device=ids.device) * grid // w  # [W]
    cell = rows[:, None] * grid + cols[None, :]  # [H, W]
    image = torch.arange(n, device=ids.device)[:, None, None] * grid * grid  # [N, 1, 1]
    key = (image + cell) * n_classes + ids.clamp(max=n_classes - 1)  # [N, H, W]; ignore pixels dropped below
    counts = torch.bincount(key[ids != IGNORE], minlength=n * grid * grid * n_classes)
    return counts.reshape(n, grid * grid, n_classes)


def bank_entries(feats, ids, n_classes):
    """Bank rows of one batch: (L2-normalised cell features [M, D], label distributions [M, C]) for the M
    cells with at least one valid pixel; feats [N, D, S, S], ids [N, H, W]."""
    counts = cell_histograms(ids, n_classes, feats.shape[-1]).flatten(0, 1).float()  # [N*S*S, C]
    cells = F.normalize(feats, dim=1).flatten(2).transpose(1, 2).flatten(0, 1)  # [N*S*S, D]
    keep = counts.sum(1) > 0  # cells with only ignore pixels are left out
    return cells[keep], counts[keep] / counts[keep].sum(1, keepdim=True)


BANK_CHUNK = 16384  # bank cells per similarity block: [QUERY_CHUNK, BANK_CHUNK] fp32 = 128 MiB
QUERY_CHUNK = 2048  # query cells per block


def knn_vote(queries, bank, bank_dist, k, t, bank_chunk=None):
    """Label distribution [Q, C] of each query cell [Q, D] (L2-normalised): the distributions of its k most
    similar bank cells [M, D], weighted softmax(sim / t) over the k (exp(sim / t), normalised). The bank is
    scanned in chunks with a running top-k: memory O(Q x (bank_chunk + k)) besides the bank."""
    bank_chunk = bank_chunk or BANK_CHUNK
    top_s = queries.new_empty(len(queries), 0)  # [Q, <=k] best similarities so far
    top_i = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)  # [Q, <=k] their bank rows
    for start in range(0, len(bank), bank_chunk):
        sim = queries @ bank[start:start + bank_chunk].T  # [Q, b]
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)  # [Q, k]
        top_s, j = torch.cat([top_s, s], 1).topk(min(k, top_s.shape[1] + s.shape[1]), dim=1)  # [Q, k]
        top_i = torch.cat([top_i, i + start], 1).gather(1, j)  # [Q, k]
    w = torch.softmax(top_s / t, dim=1)  # [Q, k]
    return torch.einsum("qk,qkc->qc", w, bank_dist[top_i])  # [Q, C]


def knn_scores(feats, bank, bank_dist, k, t):
    """Per-cell class scores [N, C, S, S] of val features [N, D, S, S], in chunks of QUERY_CHUNK cells."""
    n, _, s, _ = feats.shape
    q = F.normalize(feats, dim=1).flatten(2).transpose(1, 2).flatten(0, 1)  # [N*S*S, D]
    out = torch.cat([knn_vote(q[i:i + QUERY_CHUNK], bank, bank_dist, k, t)
                     for i in range(0, len(q), QUERY_CHUNK)])  # [N*S*S, C]
    return out.reshape(n, s, s, -1).permute(0, 3, 1, 2)  # [N, C, S, S]


def gather_rows(x):
    """Concatenate x [n_rank, ...] of every rank in rank order (n_rank may differ per rank); x when alone."""
    if common.get_world_size() == 1:
        return x
    sizes = common.all_gather_nograd(torch.tensor([len(x)], device=x.device)).tolist()
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[:len(x)] = x
    parts = common.all_gather_nograd(padded).split(max(sizes))
    return torch.cat([p[:m] for p, m in zip(parts, sizes)])


# ============================================================================ dense evaluation


def features(net, x, run):
    """Frozen final feature map [n, C, S, S] in fp32."""
    with torch.no_grad(), run.autocast():
        return common.feature_map(net, run.to_device(x)).float()


@torch.no_grad()
def build_bank(net, dim, ds, run, n_classes, batch_size):
    """seg-knn bank over ds: (features [M, D], label distributions [M, C]), built sharded and gathered.
    Rows are written into one preallocated buffer: the peak is the bank itself, not a list plus its concat."""
    loader = torch.utils.data.DataLoader(ds, batch_size, sampler=shard(len(ds), run),
                                         num_workers=run.args.workers)
    feats, dists, m = None, None, 0
    for x, y in loader:
        fmap = features(net, x, run)  # [b, D, S, S]
        f, d = bank_entries(fmap, y.to(run.device), n_classes)  # [m_b, D], [m_b, C]
        if feats is None:  # capacity: every cell of this rank's images
            cap = len(loader.sampler) * fmap.shape[-1] ** 2
            feats, dists = f.new_empty(cap, f.shape[1]), d.new_empty(cap, n_classes)
        feats[m:m + len(f)], dists[m:m + len(f)] = f, d
        m += len(f)
    if feats is None:  # this rank has no train image (more ranks than images)
        feats, dists = torch.empty(0, dim, device=run.device), torch.empty(0, n_classes, device=run.device)
    return gather_rows(feats[:m]), gather_rows(dists[:m])


@torch.no_grad()
def seg_eval(predict, ds, run, n_classes, batch_size, show=0):
    """(confusion matrix [C, C] summed over ranks, number of images, the first `show` (image, gt, prediction)
    of rank 0) of predict(x) -> per-cell scores [n, C, s, s], upsampled to the mask; each image counted
    once."""
    loader = torch.utils.data.DataLoader(ds, batch_size, sampler=shard(len(ds), run),
                                         num_workers=run.args.workers)
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long, device=run.device)
    n, shown = torch.zeros((), dtype=torch.long, device=run.device), []
    for x, y in loader:
        y = y.to(run.device)  # [n, H, W]
        pred = upsample(predict(x), y.shape[-2:]).argmax(1)  # [n, H, W]
        conf += confusion_matrix(pred, y, n_classes)
        n += len(y)
        shown += [(a, b, c) for a, b, c in zip(x, y.cpu(), pred.cpu())][:max(show - len(shown), 0)]
    if run.world > 1:
        torch.distributed.all_reduce(conf)
        torch.distributed.all_reduce(n)
    return conf, int(n), shown


def train_seg_probe(net, head, train_ds, run, args, res):
    """Train `head` (1x1 conv) on the frozen `net` with the seg protocol; returns the Logger. The backbone
    stays in eval() (frozen BN statistics) and outside autograd: only the head sees gradients."""
    net.eval()
    step_head = nn.parallel.DistributedDataParallel(head) if run.world > 1 else head
    optimizer = common.build_optimizer(args, head.parameters())
    scaler = common.grad_scaler(run)
    steps_per_epoch = len(train_ds) // args.batch_size
    if steps_per_epoch == 0:
        raise common.BadInput(f"--batch-size {args.batch_size} is larger than the dataset "
                              f"({len(train_ds)} images)")
    base_lr = args.lr * args.batch_size / 256
    log = common.Logger(run, steps_per_epoch, 0)
    for epoch in log.epochs():
        head.train()
        for i, (x, y) in log.batches(train_ds, epoch):
            e = epoch + i / steps_per_epoch
            common.set_lr(optimizer, common.cosine_lr(e, base_lr, 0, args.epochs))
            y = y.to(run.device)  # [n, H, W]
            if res != y.shape[-1]:  # Leopart: the loss at a fixed resolution, masks resized nearest
                y = F.interpolate(y[:, None].float(), size=(res, res), mode="nearest")[:, 0].long()
            with run.autocast():
                logits = step_head(features(net, x, run))  # [n, C, S, S]
            loss = seg_loss(upsample(logits.float(), (res, res)), y)
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach())
            if log.done:
                break
    return log


def save_seg_figure(path, shown, title):
    """A PNG: one row per val image (image | ground truth | prediction), VOC colours, title on top."""
    cmap = common.palette()
    rows = [[common.to_image(x), cmap[y.numpy()], cmap[p.numpy()]] for x, y, p in shown]
    side = shown[0][1].shape[-1]
    tile = side * max(1, math.ceil(96 / side))  # panels at >= 96 px, an integer zoom: masks stay readable
    common.save_sheet(path, rows, ["image", "ground truth", "prediction"], tile, title)


def dense_eval(args, meta, net, dim, run):
    """--mode seg / seg-knn: train the probe or build the bank, then mIoU on the val split."""
    train_base, val_base, n_cls = seg_splits(args)
    val_ds = SegViews(val_base, SegTransform(args.img_size, train=False))
    grid = common.final_grid(args.arch, args.stem, args.img_size)
    bs = args.batch_size // run.world
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    net.requires_grad_(False)
    net.eval()
    where = f"{args.data}, {args.img_size}px, {n_cls} classes, {grid}x{grid} feature grid"
    show = SHOW_N if args.show_seg else 0
    if args.mode == "seg":
        res = args.seg_res or args.img_size
        args.lr = args.lr or 0.1
        args.wd = max(args.wd, 0.0)  # negative = the protocol default, 0
        head = head_init(nn.Conv2d(dim, n_cls, 1)).to(run.device)  # the feature map has `dim` channels
        train_ds = SegViews(train_base, SegTransform(args.img_size, train=True), args.seed)
        log = train_seg_probe(net, head, train_ds, run, args, res)
        head.eval()
        protocol = f"linear seg probe (frozen, 1x1 conv, loss at {res}px) {args.epochs} ep, {where}"
        conf, n_val, shown = seg_eval(lambda x: head(features(net, x, run)).float(), val_ds, run, n_cls, bs,
                                      show)
    else:
        bank_ds = SegViews(train_base, SegTransform(args.img_size, train=False))
        bank, bank_dist = build_bank(net, dim, bank_ds, run, n_cls, bs)
        protocol = (f"dense kNN retrieval k={args.knn_k} T={args.knn_t}, bank of {len(bank)} train cells, "
                    f"{where}")
        conf, n_val, shown = seg_eval(lambda x: knn_scores(features(net, x, run), bank, bank_dist, args.knn_k,
                                                           args.knn_t), val_ds, run, n_cls, bs, show)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, frozen[k].to(v.device))]
    if changed:
        raise RuntimeError(f"the dense evaluation changed the frozen backbone: {changed[:3]}")
    miou, acc, iou = seg_metrics(conf)
    if args.show_seg and run.main and shown:
        save_seg_figure(args.show_seg, shown, f"{args.mode}: {protocol}, mIoU {miou:.1f}")
    extra = dict(miou=miou, pixel_acc=acc, iou=iou, top1=None, top5=None, val_images=n_val, protocol=protocol)
    if args.mode == "seg":
        return log.summary(**extra)
    return finish(run, args, meta, **extra)


# ============================================================================ main


def head_init(head):
    """MoCo v3 protocol: weights N(0, 0.01), zero bias."""
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def load_net(args, sd, run):
    """The backbone with the pretrained weights (random init for --pretrained none)."""
    net, dim = common.build_backbone(args.arch, args.stem, args.img_size)
    if sd is not None:
        pos = sd.get("encoder.pos_embedding")
        if pos is not None and pos.shape != net.encoder.pos_embedding.shape:
            # ViT at another size than pretrained (a dense probe): the fixed 2-D sin-cos embedding of this
            # grid
            sd = {**sd, "encoder.pos_embedding": net.encoder.pos_embedding.detach().clone()}
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise common.BadInput(f"{args.pretrained} does not fit {args.arch} (stem {args.stem}): "
                                  f"{str(e).splitlines()[1].strip()[:200]}") from None
    return net.to(run.device), dim


@common.user_errors
def main(argv=None):
    given = sys.argv[1:] if argv is None else argv
    flags_given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in given if a.startswith("--")}
    args = common.parse_args(Args, PRESETS, argv)
    if args.mode not in MODES:
        raise common.BadInput(f"unknown mode {args.mode!r}; choose from {', '.join(MODES)}")
    dense = args.mode in DENSE
    if dense:
        for key, value in DENSE_PRESETS[args.preset].items():
            if key not in flags_given:
                setattr(args, key, value)
        classification = {"labels_per_class": 0, "granularity": "fine", "corrupt": "", "bn_head": False,
                          "data_on_device": False}
        for flag, off in classification.items():
            if getattr(args, flag) != off:
                raise common.BadInput(f"--{flag.replace('_', '-')} is a classification option, not for "
                                      f"--mode {args.mode}")
    sd, meta = (None, {}) if args.pretrained == "none" else load_backbone(args.pretrained)
    check_meta(args, meta, flags_given, free=("img_size",) if dense else ())
    if args.seg_res < 0 or args.num_classes < 0:
        raise common.BadInput("--seg-res and --num-classes must be >= 0")
    if args.resume:
        raise common.BadInput("--resume is for training runs: an evaluation starts from --pretrained")
    if args.show_seg:
        common.check_output_file("--show-seg", args.show_seg)
    run = common.setup(args, f"eval_{args.mode}")
    common.seed_everything(args.seed)  # the same random init (--pretrained none) and head on every rank

    # ---- backbone
    net, dim = load_net(args, sd, run)
    if dense:
        return dense_eval(args, meta, net, dim, run)

    # ---- data
    train_base, val_base = eval_splits(args)
    if args.data_on_device:  # decoded once into the device's memory; crops and flips drawn there
        val_ds = common.held_split(args, run, val_base)
    else:
        val_ds = common.Views(val_base, common.eval_transform(args.img_size))
    protocol = {"knn": f"weighted kNN k={args.knn_k} T={args.knn_t}",
                "finetune": f"fine-tune {args.epochs} ep",
                "linear": f"linear probe (MoCo v3 protocol) {args.epochs} ep"}[args.mode]
    protocol += f", {args.data}, {args.img_size}px, {args.granularity} labels" + (
        f", {args.labels_per_class} labels/class" if args.labels_per_class else "") + (
        f", train images corrupted {args.corrupt}" if args.corrupt else "")
    if args.mode == "knn":
        bank_ds = (common.held_split(args, run, train_base) if args.data_on_device
                   else common.Views(train_base, common.eval_transform(args.img_size)))
        top1, top5 = common.knn_eval(net, bank_ds, val_ds, run, args.knn_k, args.knn_t)
        return finish(run, args, meta, top1=top1, top5=top5, val_images=len(val_ds), protocol=protocol)

    # ---- head, optimizer & schedule
    n_cls = common.num_classes(train_base)
    head = head_init(nn.Linear(dim, n_cls))
    if args.bn_head:
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), head)
    head = head.to(run.device)
    linear = args.mode == "linear"
    args.lr = args.lr or (3.0 if linear and args.arch.startswith("vit") else 0.1)
    if args.wd < 0:  # the default: none for the linear probe, 1e-4 for fine-tuning
        args.wd = 0.0 if linear else 1e-4
    if linear:
        net.requires_grad_(False)
        frozen = {k: v.clone() for k, v in net.state_dict().items()}
    model = nn.Sequential(net, head)
    if run.world > 1 and run.device.type == "cuda" and not linear:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    optimizer = common.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scaler = common.grad_scaler(run)
    if args.data_on_device:
        train_ds = common.held_split(args, run, train_base, copies=1)
    else:
        train_ds = common.Views(train_base, train_transform(args.img_size), args.seed)
    steps_per_epoch = len(train_ds) // args.batch_size
    if steps_per_epoch == 0:
        raise common.BadInput(f"--batch-size {args.batch_size} is larger than the dataset "
                              f"({len(train_ds)} images)")
    base_lr = args.lr * args.batch_size / 256
    log = common.Logger(run, steps_per_epoch, 0)

    # ---- train loop
    for epoch in log.epochs():
        model.train()
        if linear:
            net.eval()  # frozen BN statistics: the backbone is a fixed feature extractor
        for i, (x, y) in log.batches(train_ds, epoch):
            e = epoch + i / steps_per_epoch
            common.set_lr(optimizer, common.cosine_lr(e, base_lr, 0, args.epochs))
            x = device_train_batch(run, x, log.step) if args.data_on_device else run.to_device(x)
            with run.autocast():
                loss = F.cross_entropy(step_model(x).float(), y.to(run.device))
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach())
            if log.done:
                break

    # ---- eval
    if linear:
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, frozen[k].to(v.device))]
        if changed:
            raise RuntimeError(f"linear probe changed the frozen backbone: {changed[:3]}")
    top1, top5, n_val = evaluate(net, head, val_ds, run)
    log.summary(top1=top1, top5=top5, val_images=n_val, protocol=protocol)


def finish(run, args, meta, **metrics):
    """The summary line of the modes without a training loop (knn, seg-knn)."""
    rec = {"event": "summary", "mode": args.mode, "pretrained": args.pretrained, "arch": args.arch, **metrics,
           "method": meta.get("method")}
    if run.main:
        print(json.dumps(rec), flush=True)
    return rec


if __name__ == "__main__":
    main()
