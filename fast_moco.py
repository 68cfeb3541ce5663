"""Fast-MoCo: "Fast-MoCo: Boost Momentum-based Contrastive Learning with Combinatorial Patches".

Paper: Ci, Lin, Wang, Li, Liu, Ouyang, ECCV 2022, arXiv:2207.08220. Official code: github.com/orashi/Fast-MoCo

Idea: MoCo v3 gets one training signal per view and image. Fast-MoCo cuts each augmented view
into a 2x2 grid of non-overlapping patches, encodes the four patches with the online backbone
(the same pixels as one view, so about the same cost), and averages the pooled features of every
pair of patches: C(4,2) = 6 "combined" queries per view instead of 1. Each combined query must
pick out the momentum encoder's embedding of the *full, other* view among the keys of the global
batch. Six positives per view and step make each epoch worth more (ImageNet linear 73.5 at 100
epochs, above MoCo v3's 68.9 at 100 and 72.8 at 300).

Kept from the paper/official code:
- Split by tensor slicing (no resize).
- All patches of a view in one backbone pass.
- Combination after the backbone's pooling and before the projector.
- Target = EMA backbone + projector on the un-split other view.
- InfoNCE with tau = 1 averaged over the 12 (6 combinations x 2 directions) cross-entropies without
  MoCo v3's 2*tau factor.
- The heads: Linear with bias, BN after every projector layer, 2048 -> 512 -> 2048 predictor.
- SGD with a constant predictor lr.
- 1 warm-up epoch rising linearly from a quarter of the peak lr at the first iteration to the peak at
  the last warm-up iteration (the official WCosConLR: 0.025 -> 0.1).
- Grad-norm clipping 1.0.
- Constant EMA 0.99.
- MoCo v2's symmetric augmentation.

Changed:
- torchvision ResNets as in the official code (other torchvision models that take two input sizes run
  too; a ViT built for full views does not take half-size patches).
- The momentum encoder starts as an exact copy of the online backbone + projector; the official
  one is initialised independently (its own random draw).
- Head BN layers keep PyTorch's init (gamma = 1); the official heads draw BN gamma ~ U[0, 1).
- After the warm-up the lr follows the half-cosine of the other methods here, from the peak to 0
  over the remaining iterations; the official WCosConLR's decay part is not verified to match it.
- Precision: bf16 autocast with TF32 matmuls and convolutions by default on CUDA (--precision
  auto); the official code trains in fp32 (--precision fp32 here, TF32 still on).
- SyncBN only on multi-GPU CUDA runs (PyTorch's SyncBatchNorm is CUDA-only); one process or CPU
  ranks use per-process BN.
- Patches are numbered row-major (any fixed order gives the same set of pairs and so the same loss).
- --grid / --combine generalise the 2x2 / pairs choice.
- The `cifar` and `cpu` presets are ours.

Commands:
  python fast_moco.py                                # CPU smoke run on synthetic data (README: quick start)
  python fast_moco.py --data /imagenet --batch-size 256 --epochs 100         # 1 GPU (lr scales to 0.05)
  torchrun --nproc_per_node=8 fast_moco.py --data /imagenet --resume auto    # 1 node, batch 512 as the paper
  torchrun --nnodes=2 --node_rank=$R --master_addr=$HOST --master_port=29500 \\
      --nproc_per_node=8 fast_moco.py --data /imagenet --resume auto         # multi-node
  python fast_moco.py --resume auto                 # continue the run in --output-dir
  python fast_moco.py --grid 3 --combine 3 --img-size 96   # 3x3 patches, means of triples (C(9,3) = 84)

Healthy loss: a mean of cross-entropies over the global batch B of keys (no 2*tau), so it starts
at ln B (ImageNet, B = 512: 6.24). With tau = 1 and unit vectors the logits live in [-1, 1], so it
can never fall below ln(1 + (B - 1) e^-2) (= 4.25 for B = 512): expect a slow, shallow decline.
In the cpu preset (tau 0.2, B 32) it starts near ln 32 = 3.47 and declines slowly and noisily
(README's Fast-MoCo section describes the curve).

Options that change the method (defaults = the paper):
  --grid G      each view -> G*G patches of (img_size / G)^2 pixels; smaller patches see less context
  --combine K   average every K-subset of the G*G patch features -> C(G*G, K) queries per view;
                K = 1 trains on single patches (no combination),
                K = G*G is a single query per view again. The backbone cost does not depend on K;
                the heads and the loss run on C(G*G, K) * N rows.
                --grid 1 --combine 1 is MoCo v3 with Fast-MoCo's heads, loss scale and recipe.
"""
import copy
import dataclasses
import functools
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


@dataclasses.dataclass
class Args(common.CommonArgs):
    arch: str = "resnet50"
    """backbone: resnet18, resnet50 (the official code and all paper numbers are ResNet-50) or any torchvision
    model that takes the patches' size (not a ViT: built for one input size)"""
    epochs: int = 100
    """pretraining epochs (ImageNet: 100, 200 or 400)"""
    batch_size: int = 512
    """global batch over all processes (ImageNet: 512)"""
    optimizer: str = "sgd"
    """sgd (Fast-MoCo), lars or adamw"""
    lr: float = 0.05
    """base lr for batch 256, scaled by batch/256 (ImageNet: 0.1 at batch 512 = 0.05 per 256)"""
    wd: float = 1e-4
    """weight decay (ImageNet: 1e-4)"""
    warmup_epochs: float = 1
    """warm-up epochs, lr linear from a quarter of the peak to the peak, then cosine decay (ImageNet: 1)"""
    clip_grad: float = 1.0
    """max global grad norm (ImageNet: 1.0; 0 = off)"""
    temperature: float = 1.0
    """softmax temperature tau (ImageNet: 1.0)"""
    momentum: float = 0.99
    """EMA coefficient m of the momentum encoder, constant (ImageNet: 0.99; MoCo v3 schedules it to 1)"""
    mlp_dim: int = 2048
    """projector hidden and output width = predictor input/output width (ImageNet: 2048)"""
    proj_dim: int = 0
    """output width of projector and predictor; 0 = --mlp-dim (Fast-MoCo: 2048, unlike MoCo v3's 256)"""
    pred_dim: int = 0
    """predictor bottleneck width; 0 = --mlp-dim / 4 (ImageNet: 512)"""
    crop_min: float = 0.2
    """lower bound of RandomResizedCrop's scale (MoCo v2 augmentation: 0.2)"""
    blur: bool = True
    """Gaussian blur p 0.5 in the augmentation (off in the cifar preset: 32-px images are already blurry)"""
    grid: int = 2
    """split each view into a grid x grid array of patches (Fast-MoCo: 2; see the module docstring)"""
    combine: int = 2
    """patches averaged per combined query: C(grid^2, combine) queries per view (Fast-MoCo: 2)"""

    # the allowed values of the numbers above (checked with the shared flags' before any work: one line naming
    # the flag); --combine's upper bound depends on --grid: check_args
    RANGES = {"clip_grad": common.Range(0), "temperature": common.POSITIVE, "momentum": common.Range(0, 1),
              "mlp_dim": common.Range(1), "proj_dim": common.Range(1, also=(0,)),
              "pred_dim": common.Range(1, also=(0,)), "crop_min": common.Range(0, 1, lo_excluded=True),
              "grid": common.Range(1)}


PRESETS = {
    "imagenet": {},
    # ours (not in the paper): ResNet-18, small stem, 32-px images -> 16-px patches,
    # MoCo v2-style CIFAR settings
    "cifar": dict(arch="resnet18", stem="small", img_size=32, batch_size=512, lr=0.06, wd=5e-4, epochs=800,
                  warmup_epochs=10, temperature=0.2, crop_min=0.08, blur=False, knn_every=10),
    # ours: the quick-start tuning shared by every method file (README, "The cpu preset"); here also:
    # ResNet-18 at 64 px -> 32-px patches.
    "cpu": dict(arch="resnet18", stem="imagenet", img_size=64, batch_size=32, epochs=3, synthetic_size=1280,
                optimizer="adamw", lr=1.6e-2, wd=1e-6, momentum=0.9, warmup_epochs=0.5, temperature=0.2,
                crop_min=0.3, mlp_dim=1024, workers=2, log_every=10),
}


# ---------------------------------------------------------------------------- the method


def split_patches(x, grid=2):
    """[N, C, H, W] -> [grid^2, N, C, H/grid, W/grid]: non-overlapping patches by slicing (no resize).
    Row-major order: patch i * grid + j is row i, column j
    (2x2: top-left, top-right, bottom-left, bottom-right)."""
    h, w = x.shape[-2] // grid, x.shape[-1] // grid
    if h * grid != x.shape[-2] or w * grid != x.shape[-1]:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the grid {grid}")
    return torch.stack([x[..., i * h:(i + 1) * h, j * w:(j + 1) * w]  # [N, C, h, w] each
                        for i in range(grid) for j in range(grid)])  # [grid^2, N, C, h, w]


@functools.lru_cache(maxsize=None)
def combination_weights(p, k, dtype, device):
    """[C(p, k), p] matrix, 1/k on the patches of each k-subset, in itertools.combinations order; built once
    per (p, k, dtype, device), so a training step neither rebuilds nor copies it."""
    subsets = list(itertools.combinations(range(p), k))
    weights = torch.zeros(len(subsets), p, dtype=torch.float64)  # cast from float64: 1/k rounds once
    weights[torch.arange(len(subsets)).repeat_interleave(k), torch.tensor(subsets).flatten()] = 1 / k
    return weights.to(device=device, dtype=dtype)


def combine_patches(feats, k=2):
    """[P, N, C] -> [C(P, k), N, C]: mean feature of every k-subset of the P patches, in the order of
    itertools.combinations(range(P), k) (P = 4, k = 2: (0,1), (0,2), (0,3), (1,2), (1,3), (2,3))."""
    weights = combination_weights(feats.shape[0], k, feats.dtype, feats.device)  # [K, P]
    # a matmul, not feats[idx].mean(1): the backward of that gather accumulates in a thread-dependent order
    # on the CPU, so runs (and a resume) would differ in the last bits
    return torch.einsum("kp,pnc->knc", weights, feats)  # [K, N, C]


def patch_contrastive_loss(p, z, temperature):
    """InfoNCE of the combined queries p [K, N, D] against the keys z [N, D] of the global batch:
    the mean over the K combinations of each one's cross-entropy."""
    n_comb, n = p.shape[:2]
    p = F.normalize(p, dim=2).flatten(0, 1)  # [K*N, D]; row c*N + i is combination c of image i
    z = common.all_gather_nograd(F.normalize(z, dim=1))  # [B, D], B = N * world; no gradient into the keys
    logits = p @ z.T / temperature  # [K*N, B]
    # my keys are at rank*N
    labels = (torch.arange(n, device=p.device) + n * common.get_rank()).repeat(n_comb)  # [K*N]
    return F.cross_entropy(logits, labels)  # equal-size chunks: mean over K*N rows = mean of the K chunk CEs


def fast_moco_loss(p1, p2, z1, z2, temperature):
    """p1, p2 [K, N, D] combined queries of views 1, 2; z1, z2 [N, D] momentum keys of the full views.
    Mean of the 2K (= 12) cross-entropies; no 2*tau factor (MoCo v3 has one and sums the two directions)."""
    return 0.5 * (patch_contrastive_loss(p1, z2, temperature) + patch_contrastive_loss(p2, z1, temperature))


def build_mlp(dims, last_bn=True):
    """Fast-MoCo MLP: Linear layers *with* bias; BN + ReLU between layers; optional (affine) BN at the end."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out))  # affine, unlike MoCo v3's BN(affine=False)
    return nn.Sequential(*layers)


class FastMoCo(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.temperature, self.grid, self.combine = args.temperature, args.grid, args.combine
        self.channels_last = args.channels_last
        self.backbone, dim = common.build_backbone(args.arch, args.stem, args.img_size)
        hid, out = args.mlp_dim, args.proj_dim or args.mlp_dim
        # 3 layers, BN after each (C -> 2048 -> 2048 -> 2048)
        self.projector = build_mlp([dim, hid, hid, out])
        # 2048 -> 512 -> 2048
        self.predictor = build_mlp([out, args.pred_dim or hid // 4, out], last_bn=False)
        self.momentum_backbone = copy.deepcopy(self.backbone)  # exact copy at init
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad = False  # updated only by EMA

    def online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def momentum_params(self):
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def queries(self, x):
        """Online branch on the patches of one view [N, 3, H, W] -> combined queries [K, N, D]."""
        n = x.shape[0]
        patches = split_patches(x, self.grid).flatten(0, 1)  # [P*N, 3, H/g, W/g], P = grid^2
        if self.channels_last:
            patches = patches.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(patches).unflatten(0, (-1, n))  # [P, N, C]: one pass, BN stats over all P*N
        # combine *before* the projector
        combined = combine_patches(feats, self.combine).flatten(0, 1)  # [K*N, C]
        return self.predictor(self.projector(combined)).unflatten(0, (-1, n))  # [K, N, D]

    def forward(self, x1, x2, m):
        p1, p2 = self.queries(x1), self.queries(x2)  # [K, N, D] each; the online branch never sees full views
        with torch.no_grad():
            common.ema_update(self.momentum_params(), self.online_params(), m)  # before the keys, as MoCo v3
            z1 = self.momentum_projector(self.momentum_backbone(x1))  # [N, D]: full, un-split views
            z2 = self.momentum_projector(self.momentum_backbone(x2))  # [N, D]
        return fast_moco_loss(p1, p2, z1, z2, self.temperature)


def param_groups(model):
    """Two optimizer groups: everything trainable, and the predictor, marked "fixed_lr": set_lrs keeps
    it at the base lr through warm-up and cosine decay (official: constant predictor lr)."""
    rest = [p for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith("predictor.")]
    return [{"params": rest}, {"params": list(model.predictor.parameters()), "fixed_lr": True}]


def fast_moco_lr(it, steps_per_epoch, base_lr, warmup_epochs, epochs):
    """lr at iteration `it` (0-based: official iteration i = it + 1). Warm-up over W = warmup_epochs *
    steps_per_epoch iterations (rounded), linear from base_lr / 4 at the first to base_lr at the last
    (official WCosConLR: lr(i) = init + (peak - init)(i - 1)/(W - 1), i = 1..W; W = 1: base_lr / 4),
    then the half-cosine from base_lr to 0 over the remaining iterations (common.cosine_lr's)."""
    warmup, total = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
    if it < warmup:
        init = base_lr / 4  # official init_lr 0.025 = a quarter of the peak 0.1 (batch 512)
        return init + (base_lr - init) * it / max(warmup - 1, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))


def set_lrs(optimizer, lr, base_lr):
    """The scheduled lr for every group except the predictor's ("fixed_lr"), which stays at base_lr."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr if g.get("fixed_lr") else lr


# ---------------------------------------------------------------------------- training


def check_args(args):
    """Fast-MoCo-specific argument errors (one line, exit 2)."""
    if args.grid < 1 or args.img_size % args.grid:
        raise common.BadInput(f"--img-size {args.img_size} must be divisible by --grid {args.grid}")
    # the online backbone takes the patches, the momentum one the full views: one net, two input sizes
    common.check_input(args.arch, args.img_size, args.img_size // args.grid,
                       f"the --grid {args.grid} patches")
    if not 1 <= args.combine <= args.grid ** 2:
        raise common.BadInput(f"--combine must be between 1 and grid^2 = {args.grid ** 2}, "
                              f"got {args.combine}")


def mocov2_augmentation(img_size, crop_min, blur=True):
    """MoCo v2's view (moco's main_moco.py --aug-plus), used for both views, PIL image -> normalised tensor
    [3, img_size, img_size]. --gpu-aug and --data-on-device run the same on the device."""
    return [
        T.RandomResizedCrop(img_size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # not strengthened
        T.RandomGrayscale(p=0.2),
        T.RandomApply([common.RandomBlur()], p=0.5 if blur else 0.0),  # sigma ~ U(0.1, 2)
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(common.MEAN, common.STD),  # ImageNet statistics
    ]


@common.user_errors
def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    check_args(args)
    run = common.setup(args, "fast_moco")

    # ---- data
    augmentation = mocov2_augmentation(args.img_size, args.crop_min, args.blur)  # both views alike
    views = common.TwoViews(augmentation, augmentation, args.gpu_aug)
    train_ds, steps_per_epoch = common.pretrain_data(args, run, views)
    knn = common.knn_monitor(args, run)

    # ---- model
    model, step_model = common.prepare_model(FastMoCo(args), run, sync_bn=True)  # official: SyncBN

    # ---- optimizer & schedules
    optimizer = common.build_optimizer(args, param_groups(model))  # every group starts at base_lr
    clip_params = [p for p in model.parameters() if p.requires_grad]
    scaler = common.grad_scaler(run)
    base_lr = args.lr * args.batch_size / 256

    # ---- resume
    state = dict(model=model, optimizer=optimizer, scaler=scaler)  # what a checkpoint holds
    log = common.Logger(run, steps_per_epoch, common.resume(run, **state))

    # ---- train loop
    m = args.momentum  # Fast-MoCo: constant EMA coefficient
    for epoch in log.epochs():  # the epochs left: none when a finished run is resumed
        model.train()
        loader = common.epoch_loader(train_ds, run, epoch, log.step % steps_per_epoch)
        for _, ((x1, x2), _) in log.timed(loader):
            # 0-based iteration
            lr = fast_moco_lr(log.step, steps_per_epoch, base_lr, args.warmup_epochs, args.epochs)
            set_lrs(optimizer, lr, base_lr)  # the predictor's group keeps base_lr
            x1, x2 = views.finish(run, x1, x2, log.step)  # [n, 3, H, W] each, n = batch / world
            with run.autocast():
                loss = step_model(x1, x2, run.scalar(m))
            common.optimizer_step(loss, optimizer, scaler, clip_params, args.clip_grad)
            log.log_step(loss.detach(), lr=lr, pred_lr=optimizer.param_groups[1]["lr"], momentum=m)
            if common.end_of_step(run, log, state):  # --save-every, SIGTERM/SIGUSR1, the last step
                break

        # ---- eval & checkpoint
        log.evaluate(model.backbone, knn, epoch)
        common.save_checkpoint(run, log, state, epoch_end=True)  # every --save-epochs epochs
    common.export_backbone(run, model.backbone)
    log.summary()


if __name__ == "__main__":
    main()
