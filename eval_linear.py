"""Evaluate a pretrained backbone: weighted kNN, linear probe, fine-tuning, or dense probes.

Protocols (the summary's `protocol` says which one produced a number):
  knn       weighted kNN (InstDisc voting, cosine, k = 200, T = 0.1) of the pooled, L2-normalised features;
            train split = bank, val split = queries.
  linear    MoCo v3's: the ONLINE backbone, projector dropped, frozen in eval() (BN statistics frozen); a
            Linear head N(0, 0.01), bias 0; SGD momentum 0.9, wd 0, lr 0.1 x B/256 (ViT 3 x B/256), cosine,
            no warmup; RandomResizedCrop + flip for train, resize + centre crop for val.
  finetune  every weight trained (SGD momentum 0.9, wd 1e-4, lr 0.1 x B/256, cosine); with `--pretrained
            none` the supervised-from-scratch baseline.
  seg       frozen linear segmentation probe (Leopart / VICRegL), fit to convergence: the final map (ResNet
            layer4, ViT patch tokens) of every train image computed once, unaugmented; each channel
            standardised (the BatchNorm DINOv2 and VICRegL put before the head); a 1x1 conv whose logits,
            upsampled bilinearly to --seg-res (default 2 x the grid), meet the masks resized nearest: mean
            cross-entropy over pixels not labelled 255 + wd/2 ||W||^2 (wd 1e-4), full-batch L-BFGS (strong
            Wolfe) from zero until max |grad| < 1e-5 or the loss changes < 1e-6 (converged) or 1000
            iterations (not). Every train cell is kept: VOC train_aug at 448 px with ResNet-50 is 8.5 GB in
            fp16 on CUDA (17 GB fp32 on a CPU).
  seg-knn   training-free dense retrieval (Hummingbird-style): a bank of (feature, label distribution) of
            every final-grid cell of the train images, centred on its mean and L2-normalised; a val cell
            takes the distributions of its --knn-k most similar cells, weighted softmax(sim / --knn-t),
            upsampled bilinearly; argmax. k = 5, T = 0.02. The bank is scanned in chunks.
linear, finetune and seg check the frozen backbone unchanged at the end.

Dense metrics (percent, val split, pixels not labelled 255, masks at --img-size): miou over the classes in
ground truth or prediction, miou_fg (background left out), floor_miou (background everywhere), pixel_acc,
iou per class. Dense data (--data): `synthetic` (0 background, shape class + 1: 11 classes), a PASCAL VOC 2012
root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/; SegmentationClassAug/ + train_aug.txt for
train when present; 21 classes), or a folder {train,val}/images/* + {train,val}/masks/<stem>.png of class
ids (classes = largest train id + 1, or --num-classes).

`--pretrained`: a checkpoint.pth or backbone.pth of any training script (its arch, stem and image size are
used; a conflicting flag is an error, but for --img-size in the dense modes), or `none` (random init).

  python eval_linear.py --pretrained runs/mocov3/backbone.pth --mode knn
  torchrun --nproc_per_node=8 eval_linear.py --pretrained backbone.pth --mode linear --data /imagenet
  python eval_linear.py --pretrained none --mode finetune   # supervised baseline
  python eval_linear.py --pretrained runs/densecl/backbone.pth --mode seg --show-seg seg.png
  python eval_linear.py --pretrained backbone.pth --mode seg --data VOC2012   # 448 px, loss at 100x100

The last line printed is a JSON summary: top1 and top5, or the dense metrics with eval_s (seg: probe_loss,
probe_iters, probe_grad, converged); val_images (each counted once, also under torchrun) and protocol.
Dense defaults (ours): synthetic at the small stem, 64 px (an 8x8 grid), 1280 train images; other data 448
px, --seg-res 100 (Leopart's VOC). Without --img-size the file's size is doubled until the grid is 8x8.
"""
import dataclasses
import json
import math
import os
import sys
import time
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
TRAINED, CLASSIFY = ("linear", "finetune"), ("knn", "linear", "finetune")
# the modes in which a flag does something: given explicitly in another mode, it is refused
MODE_FLAGS = {**dict.fromkeys(("epochs", "lr", "optimizer", "bn_head", "max_steps", "time_limit"), TRAINED),
              "wd": (*TRAINED, "seg"), "knn_k": ("knn", "seg-knn"), "knn_t": ("knn", "seg-knn"),
              "seg_res": ("seg",), "num_classes": DENSE, "show_seg": DENSE,
              **dict.fromkeys(("labels_per_class", "granularity", "coarse_map", "corrupt", "data_on_device",
                               "store_size"), CLASSIFY)}


@dataclasses.dataclass
class Args(common.CommonArgs):
    pretrained: str = "none"
    """checkpoint.pth or backbone.pth of a training run, or none (random init)"""
    mode: str = "knn"
    """knn, linear, finetune, seg (frozen linear segmentation probe) or seg-knn (dense retrieval)"""
    arch: str = "resnet18"
    """backbone when --pretrained none (otherwise read from the file)"""
    epochs: int = 90
    """training epochs for linear / finetune (ImageNet linear: 90)"""
    batch_size: int = 256
    """global batch (ImageNet linear: 1024)"""
    lr: float = 0.0
    """base lr for batch 256 (0 = protocol default: linear 0.1, ViT linear 3.0, finetune 0.1)"""
    wd: float = -1.0
    """weight decay (-1 = protocol default: linear 0, finetune 1e-4; seg: its L2 weight, 1e-4)"""
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
    """seg: side of the logits the probe's loss is computed on (masks resized nearest to it; 0 = 2 x the
    final grid, at most --img-size; Leopart: 100); the evaluation always scores the --img-size masks"""
    num_classes: int = 0
    """dense modes: number of classes (0 = auto: synthetic 11, VOC 21, folder: largest train mask id + 1)"""
    show_seg: str = ""
    """dense modes: write a PNG of image / ground truth / prediction for the first val images to this path"""

    RANGES = {"wd": common.Range(0, also=(-1,)), "labels_per_class": common.Range(0),
              "seg_res": common.Range(0), "num_classes": common.Range(0)}
    # pretraining-only fields of CommonArgs: not flags of this script
    not_flags = ("resume", "subset", "mix_fraction", "knn_every", "gpu_aug", "save_every", "save_epochs")


PRESETS = {
    "imagenet": {},
    "cifar": dict(stem="small", img_size=32, epochs=100),
    "cpu": dict(img_size=64, epochs=10, batch_size=128, workers=2, log_every=20),
}
# dense modes: over PRESETS for every flag not given (ours; "imagenet" is Leopart's VOC size and loss
# resolution; batch = images per forward while caching and evaluating)
DENSE_PRESETS = {
    "imagenet": dict(img_size=448, seg_res=100, batch_size=64),
    "cifar": {},
    # the small stem at the synthetic images' native 64 px: an 8x8 grid; 1280 images keep a CPU run short
    "cpu": dict(stem="small", img_size=64, synthetic_size=1280),
}
# seg-knn's k and T (ours): T is Hummingbird's; its k = 30 leaves random init on the background-only floor
# when most cells are background (30 neighbours of a shape cell are mostly background); k = 5 had the widest
# gap between random and trained features of k = 1-30 on the synthetic scenes
SEG_KNN = dict(knn_k=5, knn_t=0.02)
# an 8x8 final grid at least: on 4x4 a synthetic shape covers 2-3 cells and even true per-cell labels score
# low (benchmarks/dense.py's reference row); dense transfer evaluates larger than it pretrained (VOC: 448)
MIN_GRID = 8


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


class SegData(torch.utils.data.Dataset):
    """(PIL image, class ids [H, W] int64) from (image path, mask path) pairs or a common.Synthetic split (the
    renderer's per-pixel labels: 0 background, shape class + 1); BadInput naming the file when a mask does
    not fit its image or holds an unknown class id, checked as each item is loaded."""
    def __init__(self, source, n_classes):
        self.source, self.n_classes = source, n_classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(self.source, common.Synthetic):
            img, ids = self.source.segmentation(i)
            ids, img_path, mask_path = np.array(ids).astype(np.int64), f"synthetic image {i}", f"mask {i}"
        else:
            img_path, mask_path = self.source[i]
            img, ids = common.load_image(img_path), read_mask(mask_path)
        if ids.shape != (img.height, img.width):
            raise common.BadInput(f"mask {mask_path} is {ids.shape[1]}x{ids.shape[0]} but its image "
                                  f"{img_path} is {img.width}x{img.height}")
        bad = ids[(ids >= self.n_classes) & (ids != IGNORE)]
        if bad.size:
            raise common.BadInput(f"mask {mask_path} has label id {int(bad.max())}, not below the number of "
                                  f"classes {self.n_classes} (255 = ignore; see --num-classes)")
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
        return [SegData(common.load_dataset(args, s), n) for s in ("train", "val")] + [n]
    if not os.path.isdir(args.data):
        raise common.BadInput(f"--mode {args.mode} needs masks: --data synthetic, a VOC 2012 root or a "
                              f"folder with train/images and train/masks ({args.data} is not a folder)")
    if is_voc(args.data):
        n = args.num_classes or VOC_CLASSES
        return [SegData(voc_pairs(args.data, s), n) for s in ("train", "val")] + [n]
    if not os.path.isdir(os.path.join(args.data, "train", "images")):
        raise common.BadInput(f"{args.data} is neither a VOC root (JPEGImages/, ImageSets/Segmentation/) nor "
                              f"a folder with train/images and train/masks")
    train, val = folder_pairs(args.data, "train"), folder_pairs(args.data, "val")
    n = args.num_classes or folder_classes(train)
    if n < 1:
        raise common.BadInput(f"the train masks of {args.data} hold no class id (only 255)")
    return SegData(train, n), SegData(val, n), n


class SegTransform:
    """(PIL image, ids [H, W]) -> (normalised image [3, S, S], ids [S, S] int64), both resized to S x S
    (aspect not kept, as Leopart): the image bilinear, the mask as a tv_tensors.Mask, so nearest (ids stay
    ids). Train and val alike: the probe and the bank see each train image once, unaugmented."""
    def __init__(self, img_size):
        self.tf = v2.Compose([v2.Resize((img_size, img_size), antialias=True),
                              v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.MEAN, common.STD)])

    def __call__(self, img, ids):
        x, m = self.tf(tv_tensors.Image(TF.pil_to_tensor(img)), tv_tensors.Mask(torch.from_numpy(ids)[None]))
        return x.as_subclass(torch.Tensor), m[0].as_subclass(torch.Tensor)  # [3, S, S], [S, S]


class SegViews(common.Views):
    """common.Views for (image, mask) pairs: the paired transform."""
    def __getitem__(self, i):
        return self.transform(*self.base[i])


# ============================================================================ dense metrics & retrieval


def confusion_matrix(pred, gt, n_classes):
    """[C, C] pixel counts (row: ground truth, column: prediction) over the pixels whose gt is not IGNORE."""
    valid = gt != IGNORE
    counts = torch.bincount(gt[valid] * n_classes + pred[valid], minlength=n_classes ** 2)  # [C * C]
    return counts.reshape(n_classes, n_classes)


def seg_metrics(conf, floor=True):
    """The dense metrics in percent from a confusion matrix [C, C]: miou (over the classes present in the
    ground truth or the prediction: a class absent from both has no IoU), miou_fg (class 0, the background,
    left out), pixel_acc, iou per class (None where absent) and floor_miou (the mIoU of predicting background
    at every pixel of this ground truth)."""
    c = conf.double()
    tp = c.diag()  # [C]
    union = c.sum(0) + c.sum(1) - tp  # [C] gt or predicted
    present = union > 0
    iou = 100 * tp / union.clamp(min=1)  # [C]
    out = dict(miou=iou[present].mean().item() if present.any() else float("nan"),
               miou_fg=iou[1:][present[1:]].mean().item() if present[1:].any() else None,
               pixel_acc=(100 * tp.sum() / c.sum().clamp(min=1)).item(),
               iou=[round(v, 4) if p else None for v, p in zip(iou.tolist(), present.tolist())])
    if floor:
        background = torch.zeros_like(conf)
        background[:, 0] = conf.sum(1)  # every pixel predicted background
        out["floor_miou"] = seg_metrics(background, floor=False)["miou"]
    return out


def upsample(scores, size):
    """Bilinear upsampling of per-cell scores [N, C, s, s] -> [N, C, H, W] (align_corners=False: cells as
    equal bins)."""
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


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
    """Bank rows of one batch: (cell features [M, D], label distributions [M, C]) of the M cells with at least
    one valid pixel; feats [N, D, S, S], ids [N, H, W]."""
    counts = cell_histograms(ids, n_classes, feats.shape[-1]).flatten(0, 1).float()  # [N*S*S, C]
    cells = feats.flatten(2).transpose(1, 2).flatten(0, 1)  # [N*S*S, D]
    keep = counts.sum(1) > 0  # cells with only ignore pixels are left out
    return cells[keep], counts[keep] / counts[keep].sum(1, keepdim=True)


def unit_cells(cells, mean):
    """cells [M, D] centred on mean [D] and L2-normalised, in place (the bank can be most of the memory)."""
    return cells.sub_(mean).div_(torch.linalg.vector_norm(cells, dim=1, keepdim=True).clamp_(min=1e-12))


BANK_CHUNK = 16384  # bank cells per similarity block: [QUERY_CHUNK, BANK_CHUNK] fp32 = 128 MiB
QUERY_CHUNK = 2048  # query cells per block


def knn_vote(queries, bank, bank_dist, k, t, bank_chunk=None):
    """Label distribution [Q, C] of each query cell [Q, D] (unit length): the distributions of its k most
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


def knn_scores(feats, mean, bank, bank_dist, k, t):
    """Per-cell class scores [N, C, S, S] of val features [N, D, S, S], centred on the bank's mean [D] and
    L2-normalised as the bank was, in chunks of QUERY_CHUNK cells."""
    n, _, s, _ = feats.shape
    q = unit_cells(feats.flatten(2).transpose(1, 2).reshape(n * s * s, -1), mean)  # [N*S*S, D] (a copy)
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

PROBE_CHUNK = 512  # images per block of the probe's loss: bounds the upsampled logits [chunk, C, R, R]
# L-BFGS stops (converged) once the largest gradient entry is below PROBE_TOL or the loss changes by less than
# PROBE_TOL / 10 in an iteration (relative ~2e-6), else after PROBE_ITERS (not converged); fitting on to 1e-9
# moved the synthetic scenes' mIoU by less than 0.1
PROBE_TOL = 1e-5
PROBE_ITERS = 1000
# the L2 weight, fixed (ours) so that methods are ranked at one value: weaker fits trained features better
# but converges slower; 1e-4 converges in a few hundred iterations on the synthetic scenes
PROBE_WD = 1e-4


def features(net, x, run):
    """Frozen final feature map [n, C, S, S] in fp32."""
    with torch.no_grad(), run.autocast():
        return common.feature_map(net, run.to_device(x)).float()


@torch.no_grad()
def cache_train(net, ds, run, shape, n_classes, batch_size, res=0):
    """The frozen final maps of the train split, computed once, sharded across ranks and gathered to every
    rank (rank order); shape = (grid S, channels D). res > 0 (the probe): (every cell [N, S*S, D], fp16 on
    CUDA, fp32 on CPU; masks resized nearest to res x res [N, res, res] int32). res = 0 (the bank): (the cells
    with a valid pixel [M, D] fp32, their label distributions [M, C]). Rows go into preallocated buffers: the
    peak is the cache itself, not a list plus its concatenation."""
    loader = torch.utils.data.DataLoader(ds, batch_size, sampler=shard(len(ds), run),
                                         num_workers=run.args.workers)
    (s, d), n, on = shape, len(loader.sampler), dict(device=run.device)
    if res:  # fp16 halves VOC's cache on a GPU; the loss reads it back in fp32, PROBE_CHUNK images at a time
        cells = torch.empty(n, s * s, d, dtype=torch.float16 if run.device.type == "cuda" else None, **on)
        targets = torch.empty(n, res, res, dtype=torch.int32, **on)
    else:
        cells, targets = torch.empty(n * s * s, d, **on), torch.empty(n * s * s, n_classes, **on)
    m = 0
    for x, y in loader:
        fmap, y = features(net, x, run), y.to(run.device)  # [b, D, S, S], [b, H, W]
        if res:
            rows = fmap.flatten(2).transpose(1, 2)  # [b, S*S, D]
            target = F.interpolate(y[:, None].float(), size=(res, res), mode="nearest")[:, 0]  # [b, R, R]
        else:
            rows, target = bank_entries(fmap, y, n_classes)  # [m_b, D], [m_b, C]
        cells[m:m + len(rows)], targets[m:m + len(rows)] = rows, target
        m += len(rows)
    return gather_rows(cells[:m]), gather_rows(targets[:m])


def fit_seg_probe(cells, masks, n_classes, wd, max_iter=PROBE_ITERS):
    """The seg probe on cached cells [N, S*S, D] (standardised here, in place) and masks [N, R, R]: a 1x1
    conv whose logits, upsampled bilinearly from S x S to R x R, minimise the mean cross-entropy over the
    pixels not labelled IGNORE + wd / 2 ||W||^2, by full-batch L-BFGS (strong Wolfe) from zero. Returns (the
    conv on the raw features, the standardisation folded in; the fit's summary fields)."""
    s, d = math.isqrt(cells.shape[1]), cells.shape[2]
    std, mean = torch.std_mean(cells.flatten(0, 1), dim=0)  # [D] each, in the cache's dtype
    std, mean = std.float().clamp(min=1e-6), mean.float()  # a constant (dead) channel stays 0, not 0 / 0
    cells.sub_(mean).div_(std)  # in place, element by element: no copy of the cache
    weight = torch.zeros(n_classes, d, device=cells.device, requires_grad=True)  # [C, D]
    bias = torch.zeros(n_classes, device=cells.device, requires_grad=True)  # [C]
    n_valid = (masks != IGNORE).sum().clamp(min=1)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=PROBE_TOL, tolerance_change=PROBE_TOL / 10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = wd / 2 * weight.pow(2).sum()
        loss.backward()
        for x, y in zip(cells.split(PROBE_CHUNK), masks.split(PROBE_CHUNK)):
            logits = F.linear(x.float(), weight, bias).transpose(1, 2).unflatten(2, (s, s))  # [b, C, S, S]
            ce = F.cross_entropy(upsample(logits, y.shape[-2:]), y.long(), ignore_index=IGNORE,
                                 reduction="sum") / n_valid
            ce.backward()
            loss = loss.detach() + ce.detach()
        return loss

    opt.step(closure)
    loss, state = closure().item(), opt.state[weight]  # the final loss and gradient
    head = nn.Conv2d(d, n_classes, 1).to(cells.device)
    with torch.no_grad():
        w = weight / std  # [C, D]: W (x - mean) / std + b on the raw features x
        head.weight.copy_(w[:, :, None, None])
        head.bias.copy_(bias - w @ mean)
    return head, dict(probe_loss=loss, probe_iters=state["n_iter"],
                      probe_grad=max(weight.grad.abs().max().item(), bias.grad.abs().max().item()),
                      converged=state["n_iter"] < max_iter and state["func_evals"] < 2 * max_iter)


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


def save_seg_figure(path, shown, title):
    """A PNG: one row per val image (image | ground truth | prediction), VOC colours, title on top."""
    cmap = common.palette()
    rows = [[common.to_image(x), cmap[y.numpy()], cmap[p.numpy()]] for x, y, p in shown]
    side = shown[0][1].shape[-1]
    tile = side * max(1, math.ceil(96 / side))  # panels at >= 96 px, an integer zoom: masks stay readable
    common.save_sheet(path, rows, ["image", "ground truth", "prediction"], tile, title)


def dense_eval(args, meta, net, dim, run):
    """--mode seg / seg-knn: cache the train maps once, fit the probe or build the bank, then mIoU on val."""
    start = time.perf_counter()
    train_base, val_base, n_cls = seg_splits(args)
    grid = common.final_grid(args.arch, args.stem, args.img_size)
    bs = max(args.batch_size // run.world, 1)
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    net.requires_grad_(False)
    net.eval()
    where = f"{args.data}, {args.img_size}px, {n_cls} classes, {grid}x{grid} feature grid"
    # the probe's loss on the logits upsampled to 2x the grid, not per cell against the cells' label shares:
    # per cell, random init stays on the floor of the synthetic scenes (7.43 mIoU); at 2x, 4x or 8x, 11.2-11.7
    res = (args.seg_res or min(args.img_size, 2 * grid)) if args.mode == "seg" else 0  # 0: the bank
    tf = SegTransform(args.img_size)
    cached = cache_train(net, SegViews(train_base, tf), run, (grid, dim), n_cls, bs, res)
    if args.mode == "seg":
        wd = PROBE_WD if args.wd < 0 else args.wd
        head, fit = fit_seg_probe(*cached, n_cls, wd)
        if run.world > 1:  # every rank fit the same gathered cache: rank 0's head is evaluated everywhere
            for p in head.parameters():
                torch.distributed.broadcast(p.data, 0)
        protocol = f"linear seg probe (frozen, standardised, L-BFGS, wd {wd}, loss at {res}px), {where}"

        def predict(x):
            return head(features(net, x, run))
    else:
        bank, bank_dist = cached
        mean, fit = bank.mean(0), {}
        unit_cells(bank, mean)
        k = min(args.knn_k, len(bank))  # the vote takes at most the whole bank
        protocol = (f"dense kNN retrieval k={k} T={args.knn_t}, centred cells, bank of {len(bank)} "
                    f"train cells, {where}")

        def predict(x):
            return knn_scores(features(net, x, run), mean, bank, bank_dist, args.knn_k, args.knn_t)
    del cached
    show = SHOW_N if args.show_seg else 0
    conf, n_val, shown = seg_eval(predict, SegViews(val_base, tf), run, n_cls, bs, show)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, frozen[k].to(v.device))]
    if changed:
        raise RuntimeError(f"the dense evaluation changed the frozen backbone: {changed[:3]}")
    metrics = seg_metrics(conf)
    if args.show_seg and run.main and shown:
        save_seg_figure(args.show_seg, shown, f"{args.mode}: {protocol}, mIoU {metrics['miou']:.1f}")
    return finish(run, args, meta, **metrics, top1=None, top5=None, val_images=n_val, **fit,
                  eval_s=round(time.perf_counter() - start, 1), protocol=protocol)


# ============================================================================ main


def head_init(head):
    """MoCo v3 protocol: weights N(0, 0.01), zero bias."""
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def load_net(args, sd, run):
    """The backbone with the pretrained weights (random init for --pretrained none)."""
    net, dim = common.build_backbone(args.arch, args.stem, args.img_size, spatial=args.mode in DENSE)
    if sd is not None:
        pos = sd.get("encoder.pos_embedding") if args.arch in common.VIT_SIZES else None  # others: learned
        if pos is not None and pos.shape != net.encoder.pos_embedding.shape:
            # ViT at another size than pretrained (a dense probe): the fixed 2-D sin-cos embedding of this
            # grid
            sd = {**sd, "encoder.pos_embedding": net.encoder.pos_embedding.detach().clone()}
        misfit = state_misfit(net.state_dict(), sd)
        if misfit:
            raise common.BadInput(f"{args.pretrained} does not fit {args.arch} (stem {args.stem}): {misfit}")
        net.load_state_dict(sd, strict=True)
    return net.to(run.device), dim


def state_misfit(own, sd):
    """"" when state_dict sd loads strictly into a model with state_dict own, else what does not fit."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    parts = [f"{len(v)} {what} (first: {v[0]})" for v, what in ((missing, "weights missing"),
             (unexpected, "unexpected weights"), (shape, "weights of another shape")) if v]
    return "; ".join(parts)


@common.user_errors
def main(argv=None):
    given = sys.argv[1:] if argv is None else argv
    flags_given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in given if a.startswith("--")}
    args = common.parse_args(Args, PRESETS, argv)
    if args.mode not in MODES:
        raise common.BadInput(f"unknown mode {args.mode!r}; choose from {', '.join(MODES)}")
    dense = args.mode in DENSE
    if dense:
        defaults = {**DENSE_PRESETS[args.preset], **(SEG_KNN if args.mode == "seg-knn" else {})}
        for key, value in defaults.items():
            if key not in flags_given:
                setattr(args, key, value)
    for flag, modes in MODE_FLAGS.items():
        if flag in flags_given and args.mode not in modes:
            raise common.BadInput(f"--{flag.replace('_', '-')} does nothing in --mode {args.mode} (it is for "
                                  f"--mode {', '.join(modes)})")
    if args.mode in TRAINED and args.epochs < 1:
        raise common.BadInput(f"--epochs {args.epochs}: --mode {args.mode} trains for at least 1 epoch")
    sd, meta = (None, {}) if args.pretrained == "none" else load_backbone(args.pretrained)
    check_meta(args, meta, flags_given, free=("img_size",) if dense else ())
    if dense and "img_size" not in flags_given:  # e.g. DenseCL's cpu preset (small stem, 32 px) -> 64 px: 8x8
        while common.final_grid(args.arch, args.stem, args.img_size) < MIN_GRID:
            args.img_size *= 2
    if args.show_seg:
        common.check_output_file("--show-seg", args.show_seg, args.output_dir)
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
    where = f", {args.data}, {args.img_size}px, {args.granularity} labels{labels_used(args, train_base)}" + (
        f", train images corrupted {args.corrupt}" if args.corrupt else "")
    if args.mode == "knn":
        bank_ds = (common.held_split(args, run, train_base) if args.data_on_device
                   else common.Views(train_base, common.eval_transform(args.img_size)))
        top1, top5 = common.knn_eval(net, bank_ds, val_ds, run, args.knn_k, args.knn_t)
        k = min(args.knn_k, len(bank_ds))  # the vote takes at most the whole bank
        protocol = f"weighted kNN k={k} T={args.knn_t}" + where
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
    ran = log.step / steps_per_epoch  # epochs actually trained (--max-steps or --time-limit may stop early)
    done = f"{args.epochs}" if ran >= args.epochs else f"{ran:.3g} of {args.epochs}"
    protocol = {"finetune": f"fine-tune {done} ep",
                "linear": f"linear probe (MoCo v3 protocol) {done} ep"}[args.mode] + where
    return log.summary(top1=top1, top5=top5, val_images=n_val, protocol=protocol)


def labels_used(args, train):
    """", K labels/class" (or "K1-K2" where classes have fewer images than --labels-per-class asks)."""
    if not args.labels_per_class:
        return ""
    counts = np.bincount(common.labels_of(train))
    lo, hi = int(counts.min()), int(counts.max())
    return f", {lo} labels/class" if lo == hi else f", {lo}-{hi} labels/class"


def finish(run, args, meta, **metrics):
    """The summary line of the modes without a training loop (knn, seg-knn)."""
    rec = {"event": "summary", "mode": args.mode, "pretrained": args.pretrained, "arch": args.arch, **metrics,
           "method": meta.get("method")}
    if run.main:
        print(json.dumps(rec), flush=True)
    return rec


if __name__ == "__main__":
    main()
