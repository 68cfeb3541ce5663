"""DenseCL: "Dense Contrastive Learning for Self-Supervised Visual Pre-Training".

Paper: Wang, Zhang, Shen, Kong, Li, CVPR 2021, arXiv:2011.09157. Official code: github.com/WXinlong/DenseCL

Idea: MoCo v2 learns one global vector per image, which is what image classification wants
but not what detection and segmentation want. DenseCL adds a second, *dense* contrastive loss
on the final feature map: every query location of view 1 is pulled towards its corresponding
location in view 2 and pushed away from a queue of negatives. The correspondence is not given
by the augmentation geometry but found on the fly: the key location whose backbone feature is
most similar (cosine) to the query location's. Total loss = (1 - lambda) * global + lambda * dense.

Kept from the official code:
- The MoCo v2 base: momentum encoder updated before the keys, constant m = 0.999, tau = 0.2, one
  direction (query = view 1, key = view 2).
- The neck: global head avgpool -> Linear -> ReLU -> Linear, dense head 1x1 conv -> ReLU -> 1x1 conv,
  no BN.
- Two queues of random unit vectors, the second filled with the *pooled* dense keys.
- Correspondence by argmax cosine of L2-normalised *backbone* features, query -> key only.
- The dense positive gathered from the key's dense-head grid.
- Enqueue after the loss.
- Shuffle-BN across GPUs (gather + broadcast permutation).
- lambda = 0.5 with an optional warm-up (the official DenseCLWarmupHook's lambda = 0).
- BN stays per GPU (no SyncBN), as in the official code: shuffle-BN needs each GPU's own batch statistics.

Changed:
- Backbone from common.py: torchvision ResNet with zero_init_residual=True (the paper's); the official
  code zero-inits no residual branch and uses kaiming (fan_in) init for the backbone's convolutions.
- Any model with a final spatial map also runs (common.feature_map).
- The heads keep PyTorch's default init; the official code uses kaiming (fan_in) init for the heads as well.
- Precision: bf16 autocast with TF32 matmuls and convolutions by default on CUDA (--precision
  auto); the official code trains in fp32 (--precision fp32 here, TF32 still on).
- The queue pointer moves without a host sync.
- With one process, shuffle-BN is emulated by running the key encoder on --shuffle-splits shuffled
  sub-batches (the official code on one GPU has no shuffle-BN at all; the official MoCo CIFAR demo
  splits BN the same way).
- --dense-weight 0 skips the dense branch (plain MoCo v2, for comparisons).
- --show-matches draws the correspondences.
- The `cifar` and `cpu` presets are ours.

Commands:
  python densecl.py                                  # CPU smoke run on synthetic data (README: quick start)
  python densecl.py --data /imagenet --epochs 200    # 1 GPU, batch 256 (the paper's recipe)
  torchrun --nproc_per_node=8 densecl.py --data /imagenet --resume auto       # 1 node
  torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 \\
      --nproc_per_node=8 densecl.py --data /imagenet --batch-size 1024 --resume auto   # multi-node
  python densecl.py --resume auto                   # continue the run in --output-dir
  python densecl.py --dense-weight 0                # plain MoCo v2 (baseline)
  python densecl.py --show-matches matches.png      # also draw query -> key correspondences

Healthy loss: both losses are InfoNCE over 1 positive + K queue negatives. The queues start as
random unit vectors, which are easy negatives, so the loss starts *low* and **rises** for roughly
the first K / B steps while real keys (far more similar to the queries) replace them; only then
does it fall. Do not read the early rise as divergence. The dense loss sits above the global one
(a location is harder to tell apart than an image). In the cpu preset (K = 1024, B = 32, S = 4)
the rise lasts about K / B = 32 of its 120 steps. DenseCL's gains show on dense transfer (VOC/COCO
detection and segmentation); its ImageNet linear accuracy (~63%) is *below* MoCo v2's, so do not
judge a run by the kNN monitor or linear probing alone.
"""
import copy
import dataclasses
import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


@dataclasses.dataclass
class Args(common.CommonArgs):
    arch: str = "resnet50"
    """backbone: resnet18, resnet50 (official: resnet50) or any torchvision model with a final spatial map"""
    epochs: int = 200
    """pretraining epochs (ImageNet: 200; COCO: 800)"""
    batch_size: int = 256
    """global batch over all processes (ImageNet: 256 on 8 GPUs)"""
    optimizer: str = "sgd"
    """sgd (MoCo v2 recipe, momentum 0.9), lars or adamw"""
    lr: float = 0.03
    """base lr for batch 256, scaled by batch/256 (ImageNet: 0.03; COCO 800 ep: 0.3)"""
    wd: float = 1e-4
    """weight decay (ImageNet: 1e-4)"""
    warmup_epochs: float = 0
    """linear lr warmup epochs before the cosine decay (DenseCL: none)"""
    temperature: float = 0.2
    """softmax temperature tau of both losses (ImageNet: 0.2, as MoCo v2)"""
    momentum: float = 0.999
    """momentum-encoder coefficient, constant as in MoCo v2 (ImageNet: 0.999; lower it for short runs)"""
    proj_dim: int = 128
    """output dim of the global and dense heads = queue entry size (ImageNet: 128)"""
    mlp_dim: int = 2048
    """hidden dim of the global and dense heads (ImageNet: 2048)"""
    queue_size: int = 65536
    """length K of each queue, a multiple of the global batch (ImageNet: 65536; small data: 4096-16384)"""
    dense_weight: float = 0.5
    """lambda in (1 - lambda) * L_global + lambda * L_dense (paper: 0.5);
    0 = plain MoCo v2, no dense branch"""
    dense_warmup_steps: int = 0
    """lambda = 0 for this many steps first (official warm-up hook; off in the ImageNet recipe)"""
    shuffle_splits: int = 8
    """one process only: key-encoder sub-batches emulating shuffle-BN (8 = the official 8-GPU BN groups)"""
    crop_min: float = 0.2
    """lower bound of RandomResizedCrop's scale (MoCo v2: 0.2)"""
    blur: bool = True
    """Gaussian blur (p 0.5, sigma 0.1-2 px) in the augmentation (MoCo v2); every preset keeps it, the 32-px
    cifar and cpu ones too (--no-blur turns it off)"""
    show_matches: str = ""
    """if set, write a PNG to this path at the end showing each query location's matched key location"""

    # the allowed values of the numbers above (checked with the shared flags' before any work: one line naming
    # the flag); --queue-size and --shuffle-splits must also fit --batch-size: check_args
    RANGES = {"temperature": common.POSITIVE, "momentum": common.Range(0, 1), "proj_dim": common.Range(1),
              "mlp_dim": common.Range(1), "queue_size": common.Range(1),
              "dense_weight": common.Range(0, 1),  # weights 1 - lambda and lambda: above 1, a negative loss
              "dense_warmup_steps": common.Range(0), "shuffle_splits": common.Range(1),
              "crop_min": common.Range(0, 1, lo_excluded=True)}
    RESUME_FREE = ("show_matches",)  # a resumed run may change it: it does not change what a step computes


PRESETS = {
    "imagenet": {},
    # ours, after the official MoCo CIFAR-10 demo (wd 5e-4, m 0.99, queue 4096, split BN);
    # small stem -> 4x4 grid
    "cifar": dict(arch="resnet18", stem="small", img_size=32, batch_size=256, epochs=200, wd=5e-4,
                  momentum=0.99, queue_size=4096, knn_every=10),
    # ours: the quick-start tuning shared by every method file (README, "The cpu preset"); here also:
    # Small stem at 32 px -> 4x4 final grid; a queue of 32 batches; 4 shuffle-BN groups of 8.
    "cpu": dict(arch="resnet18", stem="small", img_size=32, batch_size=32, epochs=3, synthetic_size=1280,
                optimizer="adamw", lr=1.6e-2, wd=1e-6, momentum=0.9, queue_size=1024, shuffle_splits=4,
                workers=2, log_every=10),
}


# ---------------------------------------------------------------------------- the method


def infonce_rows(l_pos, l_neg):
    """Mean cross-entropy with the positive at index 0 of [l_pos, l_neg], never concatenated: the per-row loss
    logsumexp([l_pos, l_neg]) - l_pos = logaddexp(l_pos, logsumexp(l_neg)) - l_pos. l_pos [M] fp32 and l_neg
    [M, K] (any float dtype, e.g. bf16 under autocast) are already divided by the temperature. RowLogSumExp
    (numerics, below the model) sums the K negatives in fp32 without an fp32 copy of l_neg."""
    return (torch.logaddexp(l_pos, RowLogSumExp.apply(l_neg)) - l_pos).mean()


def global_loss(q, k, queue, temperature):
    """MoCo v2 InfoNCE (paper eq. 1): q, k [N, D] un-normalised, queue [K, D] unit negatives;
    positive at 0."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)  # [N, D]
    l_pos = (q * k).sum(1) / temperature  # [N]
    l_neg = (q / temperature) @ queue.T  # [N, K]; 1/tau on the D columns of q, not on the K of the logits
    return infonce_rows(l_pos, l_neg)


@torch.no_grad()
def match_locations(feat_q, feat_k):
    """Correspondence (paper sec. 3.3): backbone maps [N, C, S, S] each -> [N, S^2], for every query
    location the index of the key location with the highest cosine similarity (query -> key only)."""
    with torch.autocast(feat_q.device.type, enabled=False):  # fp32: bf16 ties would scramble near-equal cells
        q = F.normalize(feat_q.float().flatten(2), dim=1)  # [N, C, S^2]
        k = F.normalize(feat_k.float().flatten(2), dim=1)  # [N, C, S^2]
        return (q.transpose(1, 2) @ k).argmax(2)  # [N, S^2, S^2] -> [N, S^2]


def dense_loss(q_dense, k_dense, match, queue, temperature):
    """Dense InfoNCE (paper eq. 2): q_dense, k_dense [N, D, S^2] un-normalised dense-head outputs, match
    [N, S^2] key index per query location, queue [K, D] unit negatives; mean over the N * S^2 locations."""
    q, k = F.normalize(q_dense.float(), dim=1), F.normalize(k_dense.float(), dim=1)  # [N, D, S^2]
    k_pos = torch.gather(k, 2, match[:, None].expand(-1, k.shape[1], -1))  # [N, D, S^2]: matched key vectors
    l_pos = (q * k_pos).sum(1).flatten() / temperature  # [N * S^2]
    q = (q / temperature).transpose(1, 2).reshape(-1, q.shape[1])  # [N * S^2, D]; 1/tau on D, not K columns
    l_neg = q @ queue.T  # [N * S^2, K] in the autocast dtype: every location against every pooled dense key
    return infonce_rows(l_pos, l_neg)


def dense_lambda(step, weight, warmup_steps):
    """lambda for this step: 0 during the optional warm-up, then --dense-weight."""
    return 0.0 if step < warmup_steps else weight


def global_head(dim, mlp_dim, out_dim):
    """MoCo v2 / DenseCL global head on the pooled feature: Linear -> ReLU -> Linear, no BN."""
    return nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, out_dim))


def dense_head(dim, mlp_dim, out_dim):
    """DenseCL dense head: the global head as 1x1 convolutions, applied at every location, no BN."""
    return nn.Sequential(nn.Conv2d(dim, mlp_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(mlp_dim, out_dim, 1))


class Encoded(NamedTuple):
    """One encoder's outputs for n images, by name; the dense fields are None without the dense branch."""
    global_out: torch.Tensor  # [n, D] global head on the pooled map
    dense_out: Optional[torch.Tensor] = None  # [n, D, S^2] dense head at every location
    fmap: Optional[torch.Tensor] = None  # [n, C, S, S] backbone map: the correspondence is found on it


class DenseCL(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.temperature, self.splits = args.temperature, args.shuffle_splits
        self.backbone, dim = common.build_backbone(args.arch, args.stem, args.img_size, spatial=True)
        self.global_head = global_head(dim, args.mlp_dim, args.proj_dim)
        # method-specific: the dense branch; --dense-weight 0 builds none of it (plain MoCo v2)
        self.dense_head = dense_head(dim, args.mlp_dim, args.proj_dim) if args.dense_weight > 0 else None
        self.momentum_backbone = copy.deepcopy(self.backbone)  # exact copies at init
        self.momentum_global_head = copy.deepcopy(self.global_head)
        self.momentum_dense_head = copy.deepcopy(self.dense_head)
        for p in self.momentum_params():
            p.requires_grad = False  # updated only by EMA
        # queues are buffers, so checkpoints hold them and their pointers; random unit vectors at start
        self.register_buffer("queue",
                             F.normalize(torch.randn(args.queue_size, args.proj_dim), dim=1))  # [K, D]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if self.dense_head is not None:
            self.register_buffer("dense_queue",
                                 F.normalize(torch.randn(args.queue_size, args.proj_dim), dim=1))
            self.register_buffer("dense_queue_ptr", torch.zeros(1, dtype=torch.long))

    def online_params(self):
        return [p for m in (self.backbone, self.global_head, self.dense_head) if m is not None
                for p in m.parameters()]

    def momentum_params(self):
        return [p for m in (self.momentum_backbone, self.momentum_global_head, self.momentum_dense_head)
                if m is not None for p in m.parameters()]

    def encode(self, x, momentum=False):
        """x [n, 3, H, W] -> Encoded's fields as a plain tuple of tensors (what shuffle_bn gathers): (global
        [n, D],) or, with the dense branch, (global [n, D], dense [n, D, S^2], backbone map [n, C, S, S])."""
        net, g_head, d_head = ((self.momentum_backbone, self.momentum_global_head, self.momentum_dense_head)
                               if momentum else (self.backbone, self.global_head, self.dense_head))
        fmap = common.feature_map(net, x)  # [n, C, S, S]
        g = g_head(fmap.mean((2, 3)))  # [n, D]: avgpool -> MLP
        if d_head is None:
            return (g,)
        return g, d_head(fmap).flatten(2), fmap  # [n, D], [n, D, S^2], [n, C, S, S]

    def forward(self, x_q, x_k, m, dense_weight):
        """One direction: queries from view 1 (online), keys from view 2 (momentum). Returns (loss, parts)."""
        q = Encoded(*self.encode(x_q))
        with torch.no_grad():
            common.ema_update(self.momentum_params(), self.online_params(), m)  # before the keys, as official
            k = Encoded(*shuffle_bn(lambda x: self.encode(x, momentum=True), x_k,
                                    self.splits if common.get_world_size() == 1 else 1))
        # .clone(): the queues are overwritten below, before backward needs the values the loss saw
        loss_g = global_loss(q.global_out, k.global_out, self.queue.clone(), self.temperature)
        parts = {"loss_global": loss_g.detach()}
        loss = loss_g
        if self.dense_head is not None:
            match = match_locations(q.fmap, k.fmap)  # [n, S^2]
            loss_d = dense_loss(q.dense_out, k.dense_out, match, self.dense_queue.clone(), self.temperature)
            loss = (1 - dense_weight) * loss_g + dense_weight * loss_d  # paper eq. 3
            parts["loss_dense"] = loss_d.detach()
            # pooled *before* L2 norm: [n, D]
            enqueue(self.dense_queue, self.dense_queue_ptr, k.dense_out.mean(2))
        enqueue(self.queue, self.queue_ptr, k.global_out)
        return loss, parts


# ---------------------------------------------------------------------------- queues and shuffle-BN (MoCo v2)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Replace the oldest entries of queue [K, D] with the L2-normalised keys [n, D] of all ranks."""
    keys = common.all_gather_nograd(F.normalize(keys.float(), dim=1))  # [B, D], B = global batch
    idx = (ptr + torch.arange(len(keys), device=keys.device)) % len(queue)  # [B]; no .item(): no host sync
    queue.index_copy_(0, idx, keys.to(queue.dtype))
    ptr.add_(len(keys)).remainder_(len(queue))


@torch.no_grad()
def shuffle_bn(encoder, x, splits=1):
    """Shuffle-BN (MoCo): run `encoder` (x [n, ...] -> tuple of [n, ...]) on a shuffled batch so the key's
    BN statistics come from other images than the query's; return the outputs in the original order.
    Distributed: shuffle the global batch across ranks. One process: shuffle, then `splits` sub-batches."""
    world = common.get_world_size()
    if world > 1:
        x_all = common.all_gather_nograd(x)  # [B, ...]
        perm = torch.randperm(len(x_all), device=x.device)  # [B]
        dist.broadcast(perm, src=0)  # every rank uses rank 0's permutation
        mine = perm.view(world, -1)[common.get_rank()]  # [n]
        outs = encoder(x_all[mine])
        back = torch.argsort(perm).view(world, -1)[common.get_rank()]  # [n]: where my samples went
        return tuple(common.all_gather_nograd(o)[back] for o in outs)
    perm = torch.randperm(len(x), device=x.device)  # [n]
    chunks = [encoder(c) for c in x[perm].chunk(splits)]  # each sub-batch has its own BN statistics
    back = torch.argsort(perm)  # [n]
    return tuple(torch.cat(o)[back] for o in zip(*chunks))


# ---------------------------------------------------------------------------- numerics: a lean log-sum-exp


# Logits upcast at once by RowLogSumExp (whole rows): each fp32 temporary holds at most this many elements
# (64 MiB): few chunks, so few kernel launches on a GPU, yet small next to the logits of a large batch.
LSE_CHUNK = 2**24


class RowLogSumExp(torch.autograd.Function):
    """logsumexp over dim 1 of x [M, K], accumulated in at least fp32 -> [M]. torch.logsumexp returns x's
    dtype (bf16: up to half a bf16 step of ~log K, ~0.03, off) and x.float() would hold an fp32 copy of all
    the logits; a bf16 or fp16 x is instead upcast by chunks of rows. Backward returns softmax(x) * grad in
    x's dtype (what the matmul that made x takes), by the same chunks of the saved x."""
    @staticmethod
    def forward(ctx, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        rows = max(1, len(x) if dtype == x.dtype else LSE_CHUNK // max(x.shape[1], 1))
        out = torch.cat([torch.logsumexp(c.to(dtype), 1) for c in x.split(rows)])  # [M]
        ctx.save_for_backward(x)
        ctx.rows, ctx.dtype = rows, dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # softmax(x) = exp(x - logsumexp(x)): the fused softmax kernel reads and writes less than that formula
        if len(x) <= ctx.rows:
            return torch.softmax(x.to(ctx.dtype), 1).mul_(grad[:, None]).to(x.dtype)  # [M, K]
        out = torch.empty_like(x)  # [M, K]
        for c, o, g in zip(x.split(ctx.rows), out.split(ctx.rows), grad.split(ctx.rows)):
            o.copy_(torch.softmax(c.to(ctx.dtype), 1).mul_(g[:, None]))  # [rows, K], rounded to x's dtype
        return out


# ---------------------------------------------------------------------------- picture of the matches


@torch.no_grad()
def draw_matches(model, ds, run, path, pairs=4, px=192):
    """PNG: for `pairs` image pairs, view 1 (left) and view 2 (right) with a line from every query cell to
    its matched key cell (colour = query location), as the loss uses them."""
    from PIL import Image, ImageDraw
    import colorsys
    was = model.training
    model.eval()
    mean, std = torch.tensor(common.MEAN)[:, None, None], torch.tensor(common.STD)[:, None, None]
    gap, top = 24, 20
    canvas = Image.new("RGB", (2 * px + gap, pairs * (px + top)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(pairs):
        (x1, x2), _ = ds[i]
        fq = common.feature_map(model.backbone, run.to_device(x1[None]))  # [1, C, S, S]
        fk = common.feature_map(model.momentum_backbone, run.to_device(x2[None]))  # [1, C, S, S]
        match, s = match_locations(fq, fk)[0].cpu(), fq.shape[-1]  # [S^2]
        y0 = i * (px + top) + top
        for j, x in enumerate((x1, x2)):
            img = ((x * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(img).resize((px, px), Image.NEAREST), (j * (px + gap), y0))
        draw.text((2, y0 - top + 4), f"pair {i}: query view (online) -> key view (momentum), {s}x{s} grid",
                  fill="black")
        cell = px / s
        colours = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(a / (s * s), 0.9, 1.0))
                   for a in range(s * s)]
        ends = [(((a % s + 0.5) * cell, y0 + (a // s + 0.5) * cell),  # query cell centre (left)
                 (px + gap + (int(b) % s + 0.5) * cell,
                  y0 + (int(b) // s + 0.5) * cell))  # matched key cell (right)
                for a, b in enumerate(match)]
        for (pa, pb), colour in zip(ends, colours):
            draw.line([pa, pb], fill=colour, width=2)
        for (pa, pb), colour in zip(ends, colours):  # dots on top of every line
            for p in (pa, pb):
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour, outline="black")
    canvas.save(path)
    model.train(was)
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------- training


def check_args(args):
    """DenseCL's argument errors (one line, exit 2), before any work."""
    common.final_grid(args.arch, args.stem, args.img_size, need=2, method="DenseCL")  # a map, >= 2x2
    if args.queue_size % args.batch_size:
        raise common.BadInput(f"--queue-size {args.queue_size} is not a multiple of the global --batch-size "
                              f"{args.batch_size}")
    alone = int(os.environ.get("WORLD_SIZE", 1)) == 1  # one process emulates shuffle-BN with sub-batches
    if alone and args.batch_size % args.shuffle_splits:
        raise common.BadInput(f"--shuffle-splits {args.shuffle_splits} must divide "
                              f"--batch-size {args.batch_size}")
    if args.show_matches:  # drawn after training: checked before it
        common.check_output_file("--show-matches", args.show_matches, args.output_dir)


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
    run = common.setup(args, "densecl")

    # ---- data
    augmentation = mocov2_augmentation(args.img_size, args.crop_min, args.blur)  # both views alike
    views = common.TwoViews(augmentation, augmentation, args.gpu_aug)
    train_ds, steps_per_epoch = common.pretrain_data(args, run, views)
    knn = common.knn_monitor(args, run)

    # ---- model
    # official: per-GPU BN (shuffle-BN needs it)
    model, step_model = common.prepare_model(DenseCL(args), run, sync_bn=False)

    # ---- optimizer & schedules
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.build_optimizer(args, params)
    scaler = common.grad_scaler(run)
    base_lr = args.lr * args.batch_size / 256

    # ---- resume (queues and their pointers are buffers of `model`)
    state = dict(model=model, optimizer=optimizer, scaler=scaler)  # what a checkpoint holds
    log = common.Logger(run, steps_per_epoch, common.resume(run, **state))

    # ---- train loop
    for epoch in log.epochs():  # the epochs left: none when a finished run is resumed
        model.train()
        loader = common.epoch_loader(train_ds, run, epoch, log.step % steps_per_epoch)
        for i, ((x1, x2), _) in log.timed(loader):  # i: index in the epoch
            e = epoch + i / steps_per_epoch  # fractional epoch: schedules are per iteration
            lr = common.cosine_lr(e, base_lr, args.warmup_epochs, args.epochs)
            common.set_lr(optimizer, lr)
            lam = dense_lambda(log.step, args.dense_weight, args.dense_warmup_steps)
            x1, x2 = views.finish(run, x1, x2, log.step)  # [n, 3, H, W] each, n = batch / world
            with run.autocast():
                loss, parts = step_model(x1, x2, run.scalar(args.momentum), lam)
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach(), lr=lr, momentum=args.momentum, dense_weight=lam, **parts)
            if common.end_of_step(run, log, state):  # --save-every, SIGTERM/SIGUSR1, the last step
                break

        # ---- eval & checkpoint
        log.evaluate(model.backbone, knn, epoch)
        common.save_checkpoint(run, log, state, epoch_end=True)  # every --save-epochs epochs
    common.export_backbone(run, model.backbone)
    if args.show_matches and run.main:
        draw_matches(model, train_ds, run, args.show_matches)
    log.summary()


if __name__ == "__main__":
    main()
