"""Evaluate a pretrained backbone: weighted kNN, linear probe, fine-tuning, or dense probes.

Protocols (the summary's `protocol` says which one produced a number):
  knn       weighted kNN (InstDisc voting, cosine, k = 200, T = 0.1) of the pooled, L2-normalised features;
            train split = bank, val split = queries.
  linear    MoCo v3's: the ONLINE backbone, projector dropped, frozen in eval() (BN statistics frozen); a
            Linear head N(0, 0.01), bias 0; SGD momentum 0.9, wd 0, lr 0.1 x B/256 (ViT 3 x B/256), cosine,
            no warmup; RandomResizedCrop + flip for train, resize + centre crop for val.
  finetune  every weight trained (as linear, but wd 1e-4 and lr 0.1 x B/256); with `--pretrained none` the
            supervised-from-scratch baseline.
  seg       frozen linear segmentation probe (Leopart / VICRegL): a 1x1 conv on the final maps (ResNet layer4,
            ViT patch tokens) of the train images, cached once, unaugmented, standardised per channel; its
            logits upsampled to --seg-res, cross-entropy (255 ignored) + L2, full-batch L-BFGS to convergence.
  seg-knn   dense retrieval (Hummingbird-style): each val cell takes the label distributions of its k = 5 most
            similar (centred, cosine) train cells, weighted softmax(sim / 0.02); no training.
linear, finetune and seg check the frozen backbone unchanged at the end. `--pretrained` gives the arch, stem
and image size (a conflicting flag is an error, but for --img-size in the dense modes). Usage, the dense data
(synthetic, a PASCAL VOC 2012 root or {train,val}/images + masks) and metrics: README.md, "Evaluation". The
last line printed is the JSON summary; val_images counts each image once, also under torchrun.
"""
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
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


# --preset -> (the values of every mode, what the dense modes set over them). The dense values are ours:
# imagenet is Leopart's VOC size and loss resolution (batch = images per forward while caching and
# evaluating); cpu is the small stem at the synthetic images' native 64 px (an 8x8 grid), and 1280 images
# keep a CPU run short. Explicit flags override both.
PRESET_TABLE = {
    "imagenet": ({}, dict(img_size=448, seg_res=100, batch_size=64)),
    "cifar": (dict(stem="small", img_size=32, epochs=100), {}),
    "cpu": (dict(img_size=64, epochs=10, batch_size=128, workers=2, log_every=20),
            dict(stem="small", img_size=64, synthetic_size=1280)),
}
# seg-knn's k and T (ours): T is Hummingbird's; its k = 30 leaves random init on the background-only floor
# when most cells are background (30 neighbours of a shape cell are mostly background); k = 5 had the widest
# gap between random and trained features of k = 1-30 on the synthetic scenes
SEG_KNN = dict(knn_k=5, knn_t=0.02)


def presets(mode):  # the table common.parse_args applies (and --help lists) in --mode
    return {name: {**every, **(dense if mode in DENSE else {}), **(SEG_KNN if mode == "seg-knn" else {})}
            for name, (every, dense) in PRESET_TABLE.items()}


PRESETS = presets("knn")  # the classification modes' table
# an 8x8 final grid at least: on 4x4 a synthetic shape covers 2-3 cells and even true per-cell labels score
# low (benchmarks/dense.py's reference row); dense transfer evaluates larger than it pretrained (VOC: 448)
MIN_GRID = 8


# ============================================================================ main

@common.user_errors
def main(argv=None):
    args, sd, meta = parse(argv)
    run = common.setup(args, f"eval_{args.mode}")
    common.seed_everything(args.seed)  # the same random init (--pretrained none) and head on every rank
    net, dim = load_net(args, sd, run)
    protocol = knn if args.mode == "knn" else dense_eval if args.mode in DENSE else train_head
    return protocol(args, meta, net, dim, run)


def parse(argv):  # every refusal comes before any work
    args = common.parse_args(Args, lambda flags: presets(flags.get("mode", Args.mode)), argv)  # per --mode
    if args.mode not in MODES:
        raise common.BadInput(f"unknown mode {args.mode!r}; choose from {', '.join(MODES)}")
    for flag, modes in MODE_FLAGS.items():
        if flag in args.given and args.mode not in modes:
            raise common.BadInput(f"--{flag.replace('_', '-')} does nothing in --mode {args.mode} (it is for "
                                  f"--mode {', '.join(modes)})")
    if args.mode in TRAINED and args.epochs < 1:
        raise common.BadInput(f"--epochs {args.epochs}: --mode {args.mode} trains for at least 1 epoch")
    if "coarse_map" in args.given and args.granularity != "coarse":
        raise common.BadInput("--coarse-map is for --granularity coarse")
    if "coarse_map" in args.given and args.data in ("synthetic", "cifar100"):
        raise common.BadInput(f"--coarse-map does nothing with --data {args.data}, which has its own coarse "
                              "classes (it is for an image folder)")
    sd, meta = (None, {}) if args.pretrained == "none" else load_backbone(args.pretrained)
    dense = args.mode in DENSE
    for key in ("arch", "stem", "img_size"):  # as the file records them: a conflicting flag is an error
        if meta.get(key) is None or (dense and key == "img_size" and key in args.given):
            continue
        if key in args.given and getattr(args, key) != meta[key]:
            raise common.BadInput(f"--{key.replace('_', '-')} {getattr(args, key)} conflicts with the "
                                  f"pretrained file, which was made with {key}={meta[key]}")
        setattr(args, key, meta[key])
    if dense and "img_size" not in args.given:  # e.g. DenseCL's cpu preset (small stem, 32 px) -> 64 px: 8x8
        while common.final_grid(args.arch, args.stem, args.img_size) < MIN_GRID:
            args.img_size *= 2
    if dense:  # a 1x1 map puts one label on the whole image: the score is the background floor
        common.final_grid(args.arch, args.stem, args.img_size, need=2, method=f"--mode {args.mode}")
    if args.seg_res > args.img_size and "seg_res" in args.given:
        raise common.BadInput(f"--seg-res {args.seg_res} is larger than --img-size {args.img_size}: the "
                              "masks are scored at --img-size, so a finer loss only slows the probe")
    if args.show_seg:
        common.check_output_file("--show-seg", args.show_seg, args.output_dir)
    return args, sd, meta


def load_backbone(path):
    if os.path.isdir(path):
        raise common.BadInput(f"--pretrained {path} is a folder: give its checkpoint.pth or backbone.pth")
    obj = common.load_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("args"), dict):
        # a training checkpoint: the online backbone
        sd = {k.removeprefix("backbone."): v for k, v in obj["model"].items() if k.startswith("backbone.")}
        meta = {"method": obj.get("method"), **{k: obj["args"].get(k) for k in ("arch", "stem", "img_size")}}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, meta = obj, dict(getattr(obj, "_metadata", {}).get("effssl", {}))
    else:
        raise common.BadInput(f"{path} is not a compatible checkpoint "
                              "(expected checkpoint.pth or backbone.pth)")
    if not sd:
        raise common.BadInput(f"{path} holds no backbone weights")
    return sd, meta


def load_net(args, sd, run):
    net, dim = common.build_backbone(args.arch, args.stem, args.img_size, spatial=args.mode in DENSE)
    if sd is not None:
        own = net.state_dict()
        pos = sd.get("encoder.pos_embedding") if args.arch in common.VIT_SIZES else None  # others: learned
        if pos is not None and pos.shape != own["encoder.pos_embedding"].shape:
            # ViT at another size than pretrained (a dense probe): the fixed sin-cos embedding of this grid
            sd = {**sd, "encoder.pos_embedding": own["encoder.pos_embedding"].clone()}
        wrong = {"weights missing": [k for k in own if k not in sd],
                 "unexpected weights": [k for k in sd if k not in own],
                 "weights of another shape": [k for k in own if k in sd and own[k].shape != sd[k].shape]}
        misfit = "; ".join(f"{len(keys)} {what} (first: {keys[0]})" for what, keys in wrong.items() if keys)
        if misfit:
            raise common.BadInput(f"{args.pretrained} does not fit {args.arch} (stem {args.stem}): {misfit}")
        net.load_state_dict(sd, strict=True)
    return net.to(run.device), dim


def frozen(net):
    """Freezes net (no gradients); returns check(what), a RuntimeError if net's state has changed since."""
    net.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def check(what):
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k].to(v.device))]
        if changed:
            raise RuntimeError(f"{what} changed the frozen backbone: {changed[:3]}")
    return check


def finish(run, args, meta, **metrics):  # the summary line of the modes without a training loop
    rec = {"event": "summary", "mode": args.mode, "pretrained": args.pretrained, "arch": args.arch, **metrics,
           "method": meta.get("method")}
    if run.main:
        print(json.dumps(rec), flush=True)
    return rec


# ============================================================================ classification data

SYNTHETIC_COARSE = {"disk": "round", "ring": "round", "crescent": "round", "square": "polygon",
                    "frame": "polygon", "triangle": "polygon", "plus": "stroke", "star": "stroke",
                    "bar": "stroke", "ell": "stroke"}


def eval_splits(args):
    train, val = common.load_dataset(args, "train"), common.load_dataset(args, "val")
    if val is None or min(common.labels_of(train)) < 0:
        raise common.BadInput(f"{args.data} has no labeled train and val split to evaluate on")
    if args.granularity not in ("fine", "coarse"):
        raise common.BadInput(f"unknown granularity {args.granularity!r}; choose from fine, coarse")
    if args.granularity == "coarse":
        train, val = (coarse(args, ds) for ds in (train, val))
    if args.labels_per_class:
        train = common.Subset(train, labeled(common.labels_of(train), args.labels_per_class, args.seed))
    if args.corrupt:  # the supervised baseline trains on the same corrupted images; val stays clean
        train = common.Corrupted(train, common.parse_corruptions(args.corrupt), args.seed)
    return train, val


def labeled(labels, k, seed):
    """The sorted indices of each class's first k images in common.balanced_order (a class with fewer: all of
    them); on a split where every class has k, the first k x classes of that order."""
    taken, keep = np.zeros(max(labels) + 1, dtype=int), []
    for i in common.balanced_order(labels, seed):
        taken[labels[i]] += 1
        if taken[labels[i]] <= k:
            keep.append(i)
    return sorted(keep)


def coarse(args, ds):
    """ds with the coarse label of every image (the granularity lens of Cole et al.)."""
    relabeled = common.Subset(ds, range(len(ds)))  # every image, in order; its targets: the labels it returns
    if args.data == "cifar100":  # torchvision keeps only the fine labels; the coarse ones are in its file
        import pickle
        name = (ds.train_list if ds.train else ds.test_list)[0][0]
        with open(os.path.join(ds.root, ds.base_folder, name), "rb") as f:
            relabeled.targets = pickle.load(f, encoding="latin1")["coarse_labels"]
        return relabeled
    if args.data == "synthetic":
        mapping = SYNTHETIC_COARSE
    elif args.coarse_map:
        try:
            mapping = json.load(open(args.coarse_map))
        except (OSError, ValueError) as e:
            raise common.BadInput(f"cannot read --coarse-map {args.coarse_map}: {e}") from None
        if not (isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values())):
            raise common.BadInput(f"--coarse-map {args.coarse_map} must be a JSON object "
                                  "{class folder name: coarse class name}")
    else:
        raise common.BadInput("--granularity coarse needs cifar100, synthetic, or an image folder with "
                              "--coarse-map")
    missing = sorted(set(ds.classes) - set(mapping))
    if missing:
        raise common.BadInput(f"--coarse-map has no coarse class for {missing[:5]}")
    names = sorted(set(mapping[c] for c in ds.classes))
    relabeled.targets = [names.index(mapping[ds.classes[y]]) for y in common.labels_of(ds)]
    return relabeled


def eval_view(args, run, base):
    if args.data_on_device:  # held in device memory, resized and centre-cropped there
        return common.held_split(args, run, base)
    return common.Views(base, common.eval_transform(args.img_size))


def data_note(args, train):  # the protocol's data part
    note = f", {args.data}, {args.img_size}px, {args.granularity} labels"
    if args.labels_per_class:  # the labels actually used: a class may have fewer images than asked for
        counts = np.bincount(common.labels_of(train))
        lo, hi = int(counts.min()), int(counts.max())
        note += f", {lo} labels/class" if lo == hi else f", {lo}-{hi} labels/class"
    return note + (f", train images corrupted {args.corrupt}" if args.corrupt else "")


# ============================================================================ knn

def knn(args, meta, net, dim, run):
    train, val = eval_splits(args)
    val_ds, bank_ds = (eval_view(args, run, ds) for ds in (val, train))
    top1, top5 = common.knn_eval(net, bank_ds, val_ds, run, args.knn_k, args.knn_t)
    k = min(args.knn_k, len(bank_ds))  # the vote takes at most the whole bank
    protocol = f"weighted kNN k={k} T={args.knn_t}" + data_note(args, train)
    return finish(run, args, meta, top1=top1, top5=top5, val_images=len(val_ds), protocol=protocol)


# ============================================================================ linear, finetune

def train_head(args, meta, net, dim, run):
    # BatchNorm in train mode (the --bn-head head; finetune: the backbone's) fails on a batch of 1
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if args.batch_size // run.world < 2 and (args.bn_head or args.mode == "finetune" and has_bn):
        bn = "--bn-head" if args.bn_head else f"--mode finetune of {args.arch}"
        raise common.BadInput(f"--batch-size {args.batch_size} gives 1 image per process: BatchNorm in "
                              f"training ({bn}) needs at least 2 images per process")
    train, val = eval_splits(args)
    val_ds = eval_view(args, run, val)
    head = nn.Linear(dim, common.num_classes(train))
    nn.init.normal_(head.weight, std=0.01)  # MoCo v3's head: N(0, 0.01), zero bias
    nn.init.zeros_(head.bias)
    head = (nn.Sequential(nn.BatchNorm1d(dim, affine=False), head) if args.bn_head else head).to(run.device)
    linear = args.mode == "linear"
    args.lr = args.lr or (3.0 if linear and args.arch.startswith("vit") else 0.1)
    if args.wd < 0:  # the default: none for the linear probe, 1e-4 for fine-tuning
        args.wd = 0.0 if linear else 1e-4
    check = frozen(net) if linear else None
    model = nn.Sequential(net, head)
    if run.world > 1 and run.device.type == "cuda" and not linear:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    optimizer = common.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scaler = common.grad_scaler(run)
    if args.data_on_device:
        train_ds = common.held_split(args, run, train, copies=1)
    else:
        tf = T.Compose([T.RandomResizedCrop(args.img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(common.MEAN, common.STD)])
        train_ds = common.Views(train, tf, args.seed)
    steps_per_epoch = common.full_batches(train_ds, args.batch_size)
    base_lr = args.lr * args.batch_size / 256
    log = common.Logger(run, steps_per_epoch, 0)
    for epoch in log.epochs():
        model.train()
        if linear:
            net.eval()  # frozen BN statistics: the backbone is a fixed feature extractor
        loader = common.epoch_loader(train_ds, run, epoch, log.step % steps_per_epoch)
        for i, (x, y) in log.timed(loader):
            common.set_lr(optimizer, common.cosine_lr(epoch + i / steps_per_epoch, base_lr, 0, args.epochs))
            if args.data_on_device:  # stored uint8 [n, 3, S, S]: RandomResizedCrop (0.08-1) + flip per sample
                x = common.normalize(common.device_crops(x.float().div_(255), args.img_size, (0.08, 1.0),
                                                         common.device_generator(run, log.step)))
            x = run.to_device(x)  # [n, 3, img_size, img_size]
            with run.autocast():
                loss = F.cross_entropy(step_model(x).float(), y.to(run.device))
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach())
            if log.done:
                break
    if linear:
        check("linear probe")
    top1, top5, n_val = evaluate(net, head, val_ds, run)
    ran = log.step / steps_per_epoch  # epochs actually trained (--max-steps or --time-limit may stop early)
    done = f"{args.epochs}" if ran >= args.epochs else f"{ran:.3g} of {args.epochs}"
    protocol = {"finetune": f"fine-tune {done} ep",
                "linear": f"linear probe (MoCo v3 protocol) {done} ep"}[args.mode] + data_note(args, train)
    # as finish(): "method" is the pretraining method (it overrides the Logger's, the run's name)
    return log.summary(mode=args.mode, pretrained=args.pretrained, arch=args.arch, top1=top1, top5=top5,
                       val_images=n_val, protocol=protocol, method=meta.get("method"))


@torch.no_grad()
def evaluate(net, head, ds, run):  # (top-1, top-5 in percent, images), each image counted once
    net.eval()
    head.eval()
    hits = torch.zeros(3, dtype=torch.long, device=run.device)  # top-1 hits, top-5 hits, images: exact counts
    for x, y in common.eval_loader(ds, 256, run):
        with run.autocast():
            logits = head(net(run.to_device(x))).float()  # [n, classes]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.to(run.device)[:, None]  # [n, 5]
        hits += torch.stack([top[:, 0].sum(), top.any(1).sum(), torch.tensor(len(y), device=run.device)])
    if run.world > 1:
        torch.distributed.all_reduce(hits)
    top1, top5, n = hits.tolist()
    return 100 * top1 / n, 100 * top5 / n, n


# ============================================================================ masks & metrics (seg, seg-knn)

IGNORE = 255  # the VOC convention: boundary / unlabeled pixels, left out of the loss, the bank and the metric


def seg_splits(args):  # (train, val, number of classes)
    if args.data == "synthetic":  # the renderer's per-pixel labels: background + one class per shape
        n = args.num_classes or len(common.SHAPES) + 1
        return [SegData(common.load_dataset(args, s), n) for s in ("train", "val")] + [n]
    root = args.data
    if not os.path.isdir(root):
        raise common.BadInput(f"--mode {args.mode} needs masks: --data synthetic, a VOC 2012 root or a "
                              f"folder with train/images and train/masks ({root} is not a folder)")
    voc = all(os.path.isdir(os.path.join(root, *d)) for d in (("JPEGImages",), ("ImageSets", "Segmentation")))
    if not voc and not os.path.isdir(os.path.join(root, "train", "images")):
        raise common.BadInput(f"{root} is neither a VOC root (JPEGImages/, ImageSets/Segmentation/) nor "
                              f"a folder with train/images and train/masks")
    train, val = (mask_pairs(root, split, voc) for split in ("train", "val"))
    # VOC: background + 20 classes; a folder: the largest class id of its train masks + 1
    n = args.num_classes or (21 if voc else 1 + max(int(np.max(m, where=m != IGNORE, initial=-1))
                                                    for m in (read_mask(path) for _, path in train)))
    if n < 1:
        raise common.BadInput(f"the train masks of {root} hold no class id (only 255)")
    return SegData(train, n), SegData(val, n), n


def mask_pairs(root, split, voc):
    """(image, mask) paths of a split, once every file is found: the VOC 2012 split list (train:
    SegmentationClassAug + train_aug.txt if present), or root/split/images/* with masks/<same stem>.png."""
    if voc:
        lists = os.path.join(root, "ImageSets", "Segmentation")
        aug = split == "train" and os.path.isfile(os.path.join(lists, "train_aug.txt")) and os.path.isdir(
            os.path.join(root, "SegmentationClassAug"))
        list_file = os.path.join(lists, "train_aug.txt" if aug else f"{split}.txt")
        if not os.path.isfile(list_file):
            raise common.BadInput(f"VOC split list not found: {list_file}")
        # a line: an image id, or (some train_aug.txt) "/JPEGImages/ID.jpg /SegmentationClassAug/ID.png"
        files = [os.path.splitext(os.path.basename(line.split()[0]))[0] + ".jpg"
                 for line in open(list_file) if line.strip()]
        if not files:
            raise common.BadInput(f"VOC split list {list_file} is empty")
        img_dir = os.path.join(root, "JPEGImages")
        mask_dir = os.path.join(root, "SegmentationClassAug" if aug else "SegmentationClass")
    else:
        img_dir, mask_dir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
        if not os.path.isdir(img_dir):
            raise common.BadInput(f"{img_dir} not found: a segmentation folder needs train/images and "
                                  "val/images")
        files = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(common.IMG_EXT))
        if not files:
            raise common.BadInput(f"no images found in {img_dir}")
    pairs = [(os.path.join(img_dir, f), os.path.join(mask_dir, os.path.splitext(f)[0] + ".png"))
             for f in files]
    for img_path, mask_path in pairs:
        if not os.path.isfile(img_path):
            raise common.BadInput(f"image not found: {img_path}")
        if not os.path.isfile(mask_path):
            raise common.BadInput(f"no mask for image {img_path}: {mask_path} not found")
    return pairs


def read_mask(path):
    """Class ids [H, W] int64 of a grayscale PNG or a palette one (the index is the id, as in VOC)."""
    try:
        with Image.open(path) as m:
            mode, ids = m.mode, np.array(m).astype(np.int64)
    except Exception as e:
        raise common.BadInput(f"cannot read mask {path}: {e}") from None
    if mode not in ("P", "L", "I", "I;16"):
        raise common.BadInput(f"mask {path} is a {mode} image: expected a palette or grayscale PNG of "
                              "class ids")
    return ids


class SegData(torch.utils.data.Dataset):
    """(PIL image, class ids [H, W] int64) of (image path, mask path) pairs or of a common.Synthetic split,
    checked on load (also inside a loader worker): the mask fits its image, every id is a class or 255."""
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


class SegTransform:
    """(PIL image, ids [H, W]) -> (normalised image [3, S, S], ids [S, S] int64), both resized to S x S
    (aspect not kept, as Leopart; the mask as a tv_tensors.Mask: nearest). Unaugmented: train and val."""
    def __init__(self, img_size):
        self.tf = v2.Compose([v2.ToImage(), v2.Resize((img_size, img_size), antialias=True),
                              v2.ToDtype(torch.float32, scale=True), v2.Normalize(common.MEAN, common.STD)])

    def __call__(self, img, ids):
        x, m = self.tf(img, tv_tensors.Mask(torch.from_numpy(ids)))
        return x.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)  # [3, S, S], [S, S]


class SegViews(common.Views):  # of (image, mask) pairs: the paired transform, no random draws
    def __getitem__(self, i):
        return self.transform(*self.base[i])


def confusion_matrix(pred, gt, n_classes):
    """[C, C] pixel counts (row: ground truth, column: prediction) over the pixels whose gt is not IGNORE."""
    valid = gt != IGNORE
    counts = torch.bincount(gt[valid] * n_classes + pred[valid], minlength=n_classes ** 2)  # [C * C]
    return counts.reshape(n_classes, n_classes)


def seg_metrics(conf, floor=True):
    """In percent: miou over the classes in ground truth or prediction (iou None for a class in neither),
    miou_fg (background left out), pixel_acc, iou per class, floor_miou (background predicted everywhere)."""
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
    """Per-cell scores [N, C, s, s] -> [N, C, H, W], bilinear (align_corners=False: cells as equal bins)."""
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


# ============================================================================ dense evaluation (seg, seg-knn)

SHOW_N = 6  # val images drawn by --show-seg


def dense_eval(args, meta, net, dim, run):
    """--mode seg / seg-knn: the train maps cached once, the probe fit or the bank built, then mIoU on val."""
    start = time.perf_counter()
    train, val, n_cls = seg_splits(args)
    grid = common.final_grid(args.arch, args.stem, args.img_size)
    bs = max(args.batch_size // run.world, 1)
    check = frozen(net)
    net.eval()
    tf = SegTransform(args.img_size)
    fit = seg_probe if args.mode == "seg" else seg_knn
    predict, fields, protocol = fit(args, net, SegViews(train, tf), run, (grid, dim), n_cls, bs)
    protocol += f", {args.data}, {args.img_size}px, {n_cls} classes, {grid}x{grid} feature grid"
    conf = torch.zeros(n_cls, n_cls, dtype=torch.long, device=run.device)
    n_val, shown = torch.zeros((), dtype=torch.long, device=run.device), []  # each image counted once
    with torch.no_grad():
        for x, fmap, y in maps(net, SegViews(val, tf), run, bs):
            pred = upsample(predict(fmap), y.shape[-2:]).argmax(1)  # [b, H, W]
            conf += confusion_matrix(pred, y, n_cls)
            n_val += len(y)
            if args.show_seg:  # this rank's first SHOW_N (image, ground truth, prediction)
                shown += list(zip(x, y.cpu(), pred.cpu()))[:SHOW_N - len(shown)]
    if run.world > 1:
        torch.distributed.all_reduce(conf)
        torch.distributed.all_reduce(n_val)
    check("the dense evaluation")
    metrics = seg_metrics(conf)
    if args.show_seg and run.main and shown:  # one row per val image, VOC colours
        cmap, side = common.palette(), shown[0][1].shape[-1]
        rows = [[common.to_image(x), cmap[y.numpy()], cmap[p.numpy()]] for x, y, p in shown]
        tile = side * max(1, math.ceil(96 / side))  # panels at >= 96 px, an integer zoom: masks stay readable
        common.save_sheet(args.show_seg, rows, ["image", "ground truth", "prediction"], tile,
                          f"{args.mode}: {protocol}, mIoU {metrics['miou']:.1f}")
    return finish(run, args, meta, **metrics, top1=None, top5=None, val_images=int(n_val), **fields,
                  eval_s=round(time.perf_counter() - start, 1), protocol=protocol)


def maps(net, ds, run, batch_size):
    """(images, frozen final maps [b, D, S, S] in fp32, masks [b, H, W]) of this rank's share of ds."""
    for x, y in common.eval_loader(ds, batch_size, run):
        with torch.no_grad(), run.autocast():
            fmap = common.feature_map(net, run.to_device(x)).float()
        yield x, fmap, y.to(run.device)


@torch.no_grad()
def cache_train(net, ds, run, shape, n_classes, batch_size, res=0):
    """The train maps (shape: grid S, channels D) of every rank in rank order. The probe (res > 0): every
    cell [N, S*S, D], fp16 on CUDA, and the masks resized nearest [N, res, res] int32; the bank (res = 0): the
    cells with a valid pixel [M, D] and their label distributions [M, C]."""
    (s, d), n, on = shape, len(range(run.rank, len(ds), run.world)), dict(device=run.device)
    if res:  # fp16 halves VOC's cache on a GPU; the loss reads it back in fp32, PROBE_CHUNK images at a time
        cells = torch.empty(n, s * s, d, dtype=torch.float16 if run.device.type == "cuda" else None, **on)
        targets = torch.empty(n, res, res, dtype=torch.int32, **on)
    else:
        cells, targets = torch.empty(n * s * s, d, **on), torch.empty(n * s * s, n_classes, **on)
    m = 0  # rows filled: preallocated buffers keep the peak at the cache, not a list plus its concatenation
    for _, fmap, y in maps(net, ds, run, batch_size):  # [b, D, S, S], [b, H, W]
        if res:
            rows = fmap.flatten(2).transpose(1, 2)  # [b, S*S, D]
            target = F.interpolate(y[:, None].float(), size=(res, res), mode="nearest")[:, 0]  # [b, R, R]
        else:
            rows, target = bank_entries(fmap, y, n_classes)  # [m_b, D], [m_b, C]
        cells[m:m + len(rows)], targets[m:m + len(rows)] = rows, target
        m += len(rows)
    return common.gather_rows(cells[:m]), common.gather_rows(targets[:m])


# ============================================================================ seg

PROBE_CHUNK = 512  # images per block of the probe's loss: bounds the upsampled logits [chunk, C, R, R]
# L-BFGS stops (converged) once the largest gradient entry is below PROBE_TOL or the loss changes by less than
# PROBE_TOL / 10 in an iteration (relative ~2e-6), else after PROBE_ITERS (not converged); fitting on to 1e-9
# moved the synthetic scenes' mIoU by less than 0.1
PROBE_TOL = 1e-5
PROBE_ITERS = 1000
# the L2 weight, fixed (ours) so that methods are ranked at one value: weaker fits trained features better
# but converges slower; 1e-4 converges in a few hundred iterations on the synthetic scenes
PROBE_WD = 1e-4


def seg_probe(args, net, train, run, shape, n_classes, batch_size):  # (predict, summary fields, protocol)
    # the loss on the logits upsampled to 2x the grid, not per cell against the cells' label shares: per
    # cell, random init stays on the floor of the synthetic scenes (7.43 mIoU); at 2x, 4x or 8x, 11.2-11.7
    res = args.seg_res or min(args.img_size, 2 * shape[0])
    wd = PROBE_WD if args.wd < 0 else args.wd
    head, fit = fit_seg_probe(*cache_train(net, train, run, shape, n_classes, batch_size, res), n_classes, wd)
    if run.world > 1:  # every rank fit the same gathered cache: rank 0's head is evaluated everywhere
        for p in head.parameters():
            torch.distributed.broadcast(p.data, 0)
    return head, fit, f"linear seg probe (frozen, standardised, L-BFGS, wd {wd}, loss at {res}px)"


def fit_seg_probe(cells, masks, n_classes, wd, max_iter=PROBE_ITERS):
    """The probe of the module docstring on cached cells [N, S*S, D] (standardised here, in place) and masks
    [N, R, R]: (the 1x1 conv on the raw features, the standardisation folded in; the fit's summary fields)."""
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


# ============================================================================ seg-knn

QUERY_CHUNK = 2048  # query cells per block of common.knn_vote


def seg_knn(args, net, train, run, shape, n_classes, batch_size):
    bank, bank_dist = cache_train(net, train, run, shape, n_classes, batch_size)
    mean = bank.mean(0)
    unit_cells(bank, mean)
    k = min(args.knn_k, len(bank))  # the vote takes at most the whole bank

    def predict(fmap):
        return knn_scores(fmap, mean, bank, bank_dist, args.knn_k, args.knn_t)
    return predict, {}, (f"dense kNN retrieval k={k} T={args.knn_t}, centred cells, bank of {len(bank)} "
                         "train cells")


def cell_histograms(ids, n_classes, grid):
    """Valid-pixel counts per class in each cell of a grid x grid partition: ids [N, H, W] -> [N, grid^2, C];
    cells as equal bins, as the bilinear upsampling reads them."""
    n, h, w = ids.shape
    rows = torch.arange(h, device=ids.device) * grid // h  # [H]
    cols = torch.arange(w, device=ids.device) * grid // w  # [W]
    cell = rows[:, None] * grid + cols[None, :]  # [H, W]
    image = torch.arange(n, device=ids.device)[:, None, None] * grid * grid  # [N, 1, 1]
    key = (image + cell) * n_classes + ids.clamp(max=n_classes - 1)  # [N, H, W]; ignore pixels dropped below
    counts = torch.bincount(key[ids != IGNORE], minlength=n * grid * grid * n_classes)
    return counts.reshape(n, grid * grid, n_classes)


def bank_entries(feats, ids, n_classes):
    """Bank rows of a batch, feats [N, D, S, S] and ids [N, H, W]: (cell features [M, D], label distributions
    [M, C]) of the M cells with at least one valid pixel."""
    counts = cell_histograms(ids, n_classes, feats.shape[-1]).flatten(0, 1).float()  # [N*S*S, C]
    cells = feats.flatten(2).transpose(1, 2).flatten(0, 1)  # [N*S*S, D]
    keep = counts.sum(1) > 0  # cells with only ignore pixels are left out
    return cells[keep], counts[keep] / counts[keep].sum(1, keepdim=True)


def unit_cells(cells, mean):
    """cells [M, D] centred on mean [D] and L2-normalised, in place (the bank can be most of the memory)."""
    return F.normalize(cells.sub_(mean), dim=1, out=cells)


def knn_scores(feats, mean, bank, bank_dist, k, t):
    """Per-cell class scores [N, C, S, S] of val maps [N, D, S, S], centred and L2-normalised as the bank
    was, QUERY_CHUNK cells at a time."""
    n, _, s, _ = feats.shape
    q = unit_cells(feats.flatten(2).transpose(1, 2).reshape(n * s * s, -1), mean)  # [N*S*S, D] (a copy)
    out = torch.cat([common.knn_vote(q[i:i + QUERY_CHUNK], bank, bank_dist, k, t)
                     for i in range(0, len(q), QUERY_CHUNK)])  # [N*S*S, C]
    return out.reshape(n, s, s, -1).permute(0, 3, 1, 2)  # [N, C, S, S]


if __name__ == "__main__":
    main()
