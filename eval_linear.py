"""Evaluate a pretrained backbone: weighted kNN, linear probe, or fine-tuning.

Protocols (every number this script prints says which one produced it):
  knn       weighted kNN (InstDisc voting, cosine similarity, k = 200, T = 0.1) of the pooled,
            L2-normalised features; train split = bank, val split = queries; no training.
  linear    MoCo v3's linear protocol: the ONLINE backbone, projector dropped, frozen and kept in
            eval() mode (BN statistics frozen); a Linear head initialised N(0, 0.01), bias 0; SGD
            momentum 0.9, wd 0, lr 0.1 x B/256 (ViT: 3 x B/256), cosine, no warmup; RandomResizedCrop +
            flip for train, resize + center crop for val. The backbone is checked unchanged at the end.
  finetune  all weights trained (SGD momentum 0.9, wd 1e-4, lr 0.1 x B/256, cosine); with
            `--pretrained none` this is the supervised-from-scratch baseline.

`--pretrained` takes a checkpoint.pth or backbone.pth written by any training script (their arch,
stem and image size are used; a conflicting flag is an error), or `none` for a random init.

  python eval_linear.py --pretrained runs/mocov3/backbone.pth --mode knn
  python eval_linear.py --pretrained runs/mocov3/checkpoint.pth --mode linear --epochs 90 --data /imagenet
  torchrun --nproc_per_node=8 eval_linear.py --pretrained backbone.pth --mode linear --data /imagenet
  python eval_linear.py --pretrained none --mode finetune   # supervised baseline

The last line printed is a JSON summary with top1 and top5 (percent).
"""
import dataclasses
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


@dataclasses.dataclass
class Args(common.CommonArgs):
    pretrained: str = "none"
    """checkpoint.pth or backbone.pth of a training run, or none (random init)"""
    mode: str = "knn"
    """knn, linear or finetune"""
    arch: str = "resnet18"
    """backbone when --pretrained none (otherwise read from the file)"""
    epochs: int = 90
    """training epochs for linear / finetune (ImageNet linear: 90)"""
    batch_size: int = 256
    """global batch (ImageNet linear: 1024)"""
    lr: float = 0.0
    """base lr for batch 256 (0 = protocol default: linear 0.1, ViT linear 3.0, finetune 0.1)"""
    wd: float = -1.0
    """weight decay (negative = protocol default: linear 0, finetune 1e-4)"""
    optimizer: str = "sgd"
    """sgd (the protocol's optimizer)"""
    bn_head: bool = False
    """put a BatchNorm1d(affine=False) before the linear head (less sensitive to the lr)"""
    labels_per_class: int = 0
    """train the head (and fill the kNN bank) with K seeded labeled images per class (0 = all)"""
    granularity: str = "fine"
    """fine (the dataset's classes) or coarse (CIFAR-100: 20 superclasses; synthetic: 3 shape families; folders: --coarse-map)"""
    coarse_map: str = ""
    """JSON file {class folder name: coarse class name} for --granularity coarse on an image folder"""


PRESETS = {
    "imagenet": {},
    "cifar": dict(stem="small", img_size=32, epochs=100),
    "cpu": dict(img_size=64, epochs=10, batch_size=128, workers=2, log_every=20),
}


def check_meta(args, meta, flags_given):
    """Use the arch/stem/img size recorded in the file; an explicit conflicting flag is an error."""
    for key in ("arch", "stem", "img_size"):
        if meta.get(key) is None:
            continue
        if key in flags_given and getattr(args, key) != meta[key]:
            raise common.BadInput(f"--{key.replace('_', '-')} {getattr(args, key)} conflicts with the pretrained "
                                  f"file, which was made with {key}={meta[key]}")
        setattr(args, key, meta[key])


SYNTHETIC_COARSE = {"disk": "round", "ring": "round", "crescent": "round", "square": "polygon", "frame": "polygon",
                    "triangle": "polygon", "plus": "stroke", "star": "stroke", "bar": "stroke", "ell": "stroke"}


def coarse_labels(args, ds):
    """Coarse label of every image of ds (the granularity lens of Cole et al.)."""
    if args.data == "cifar100":  # torchvision keeps only the fine labels; the coarse ones are in the same file
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
        raise common.BadInput("--granularity coarse needs cifar100, synthetic, or an image folder with --coarse-map")
    missing = sorted(set(ds.classes) - set(mapping))
    if missing:
        raise common.BadInput(f"--coarse-map has no coarse class for {missing[:5]}")
    names = sorted(set(mapping[c] for c in ds.classes))
    return [names.index(mapping[ds.classes[y]]) for y in common.labels_of(ds)]


def train_transform(img_size):
    """RandomResizedCrop + flip: the linear-probe / fine-tune training transform (evaluation only)."""
    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(common.MEAN, common.STD)])


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


@torch.no_grad()
def evaluate(net, head, ds, run):
    """Top-1/top-5 (percent) of head(net(x)) on ds, sharded across ranks."""
    net.eval()
    head.eval()
    sampler = torch.utils.data.DistributedSampler(ds, run.world, run.rank, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, 256, sampler=sampler, num_workers=run.args.workers)
    correct, n = torch.zeros(2, device=run.device), torch.zeros((), device=run.device)
    for x, y in loader:
        with run.autocast():
            logits = head(net(run.to_device(x))).float()  # [n, classes]
        y = y.to(run.device)
        top1, top5 = common.topk_accuracy(logits, y, (1, min(5, logits.shape[1])))
        correct += torch.tensor([top1, top5], device=run.device) * len(y) / 100
        n += len(y)
    if run.world > 1:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(n)
    return (100 * correct / n).tolist()


@common.user_errors
def main(argv=None):
    flags_given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
                   if a.startswith("--")}
    args = common.parse_args(Args, PRESETS, argv)
    if args.mode not in ("knn", "linear", "finetune"):
        raise common.BadInput(f"unknown mode {args.mode!r}; choose from knn, linear, finetune")
    sd, meta = (None, {}) if args.pretrained == "none" else common.load_backbone(args.pretrained)
    check_meta(args, meta, flags_given)
    run = common.setup(args, f"eval_{args.mode}")

    # ---- backbone
    net, dim = common.build_backbone(args.arch, args.stem, args.img_size)
    if sd is not None:
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise common.BadInput(f"{args.pretrained} does not fit {args.arch} (stem {args.stem}): "
                                  f"{str(e).splitlines()[1].strip()[:200]}") from None
    net = net.to(run.device)

    # ---- data
    train_base, val_base = eval_splits(args)
    val_ds = common.Views(val_base, common.eval_transform(args.img_size))
    protocol = {"knn": f"weighted kNN k={args.knn_k} T={args.knn_t}", "finetune": f"fine-tune {args.epochs} ep",
                "linear": f"linear probe (MoCo v3 protocol) {args.epochs} ep"}[args.mode]
    protocol += f", {args.data}, {args.img_size}px, {args.granularity} labels" + (
        f", {args.labels_per_class} labels/class" if args.labels_per_class else "") + (
        f", train images corrupted {args.corrupt}" if args.corrupt else "")
    if args.mode == "knn":
        top1, top5 = common.knn_eval(net, common.Views(train_base, common.eval_transform(args.img_size)), val_ds,
                                     run, args.knn_k, args.knn_t)
        return finish(run, args, meta, protocol, top1, top5)

    # ---- head, optimizer & schedule
    n_cls = common.num_classes(train_base)
    head = nn.Linear(dim, n_cls)
    nn.init.normal_(head.weight, std=0.01)  # MoCo v3 protocol: N(0, 0.01), zero bias
    nn.init.zeros_(head.bias)
    if args.bn_head:
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), head)
    head = head.to(run.device)
    linear = args.mode == "linear"
    args.lr = args.lr or (3.0 if linear and args.arch.startswith("vit") else 0.1)
    args.wd = args.wd if args.wd >= 0 else (0.0 if linear else 1e-4)
    if linear:
        net.requires_grad_(False)
        frozen = {k: v.clone() for k, v in net.state_dict().items()}
    model = nn.Sequential(net, head)
    if run.world > 1 and run.device.type == "cuda" and not linear:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    optimizer = common.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scaler = common.grad_scaler(run)
    train_ds = common.Views(train_base, train_transform(args.img_size), args.seed)
    steps_per_epoch = len(train_ds) // args.batch_size
    if steps_per_epoch == 0:
        raise common.BadInput(f"--batch-size {args.batch_size} is larger than the dataset ({len(train_ds)} images)")
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
            with run.autocast():
                loss = F.cross_entropy(step_model(run.to_device(x)).float(), y.to(run.device))
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach())
            if log.done:
                break

    # ---- eval
    if linear:
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, frozen[k].to(v.device))]
        if changed:
            raise RuntimeError(f"linear probe changed the frozen backbone: {changed[:3]}")
    top1, top5 = evaluate(net, head, val_ds, run)
    log.summary(top1=top1, top5=top5, protocol=protocol)


def finish(run, args, meta, protocol, top1, top5):
    if run.main:
        print(json.dumps({"event": "summary", "mode": args.mode, "pretrained": args.pretrained, "arch": args.arch,
                          "top1": top1, "top5": top5, "protocol": protocol, "method": meta.get("method")}), flush=True)


if __name__ == "__main__":
    main()
