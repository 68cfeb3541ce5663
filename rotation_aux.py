"""MoCo v3 + rotation prediction: "Towards Efficient and Effective Self-Supervised \
Learning of Visual Representations".

Paper: Addepalli, Bhogale, Dey, Babu, ECCV 2022, arXiv:2210.09866. Official code: github.com/val-iisc/EffSSL

Idea: add a pretext task that needs the image's orientation to a contrastive method. Each
augmented view is rotated once more by k * 90 degrees (k in {0, 1, 2, 3}, uniform per image) and
a small head on the online backbone's pooled feature predicts k. The base method (here MoCo v3)
runs unchanged on the unrotated views; the rotated views are extra inputs through the online
backbone only, and the total loss is L_MoCo + 0.1 * (CE(view 1) + CE(view 2)). The paper's claim
is better accuracy at low epoch budgets, bought with ~75% more compute per step.

This file needs mocov3.py beside it: MoCo v3 is imported from there, not copied (MoCoV3,
build_mlp, contrastive_loss inside MoCoV3, Args and PRESETS). Copy rotation_aux.py + mocov3.py
+ common.py. `diff mocov3.py rotation_aux.py` shows the method: the extra Args fields, the
rotation head and loss, and the few changed lines of main().

Kept from the paper / official code:
- MoCo v3 untouched on the unrotated views.
- The rotation is applied after all other augmentation (to the normalised square crop, on the device,
  inside the step), 0 degrees included.
- Each rotated view is its own backbone forward pass (own BN batch statistics) and never reaches the
  projector, predictor or momentum encoder.
- Rotation head Linear(C, C) -> BN -> ReLU -> Linear(C, 4) on the pooled backbone feature, dropped at
  export.
- Weight 0.1 on the sum of the two views' cross-entropies.

Changed / ours:
- Everything mocov3.py's docstring lists for the MoCo v3 part, including the precision (bf16
  autocast with TF32 on CUDA by default; the official MoCo v3 base uses fp16 autocast with a
  GradScaler: --precision fp16 here) and SyncBN only on multi-GPU CUDA runs.
- The head reuses MoCo v3's bias-free MLP builder (a bias before BN is redundant; the 4 classes
  are balanced by construction).
- The rotated passes also update the backbone's BN running statistics (train mode), which the
  exported backbone keeps.
- `--rot-size` (off by default) rotates a bilinearly downscaled copy to cut the extra cost (not for
  ViTs: torchvision's ViT takes one input size).
- `--rot-weight 0` still runs the rotated passes (an equal-compute ablation: loss and gradients
  equal mocov3.py's, only BN running statistics see the rotated views); use mocov3.py itself for
  the plain baseline.

Cost per step (4 online backbone passes with backward instead of 2, momentum passes unchanged):
expected ~1.75x mocov3.py's step time; --rot-size img_size/2 ~1.2x by FLOPs (the rotated passes
cost ~1/4; small passes are overhead-bound on a CPU, so expect more there). Measured ratios and
peak memory: benchmarks/results/model_cost_cpu.md and model_cost_gpu.md (RESULTS.md: Model cost). Peak
activation memory grows by ~the online backbone's share, up to ~2x. Compare with mocov3.py at
equal epochs *and* at equal wall-clock (benchmarks/).

Commands:
  python rotation_aux.py                                   # CPU smoke run (README: quick start)
  python rotation_aux.py --data /imagenet --batch-size 256 --epochs 100            # 1 GPU
  torchrun --nproc_per_node=8 rotation_aux.py --data /imagenet --resume auto       # 1 node, batch 4096
  torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 \\
      --nproc_per_node=8 rotation_aux.py --data /imagenet --resume auto            # multi-node
  python rotation_aux.py --resume auto                    # continue the run in --output-dir
  python rotation_aux.py --data /imagenet --img-size 224 --rot-size 112  # cheaper: half-size copies

Healthy loss: mocov3.py's curve plus 0.1 * (CE1 + CE2); the rotation term starts at
0.1 * 2 * ln 4 ~= 0.28 and shrinks as rot_acc (percent, both views) rises from 25; on natural
images rot_acc should pass 90 quickly. On the synthetic data many shapes look the same
after some rotations (disk, ring, square, plus), so rot_acc stays well below that.
"""
import dataclasses

import torch
import torch.nn.functional as F

import common
import mocov3


@dataclasses.dataclass
class Args(mocov3.Args):
    rot_weight: float = 0.1
    """weight of the rotation loss CE(view 1) + CE(view 2) (paper: 0.1);
    0 = equal-compute ablation without its gradient"""
    rot_size: int = 0
    """side of the rotated copies, 0 = the crop size (paper);
    half the crop cuts the extra cost to ~1/4 (ResNet only)"""

    RANGES = {"rot_weight": common.Range(0)}  # added to MoCo v3's (--rot-size's depends on --img-size)


PRESETS = mocov3.PRESETS  # MoCo v3's recipes: the auxiliary task needs no other setting changed


# ---------------------------------------------------------------------------- the method


def rotate_batch(x, generator=None):
    """Rotate image i of x [N, C, H, W] (square) by k[i] * 90 degrees over (H, W), k uniform in {0, 1, 2, 3}
    (0 included: "upright" is one of the four classes). Returns (rotated [N, C, H, W], k [N] long)."""
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"rotate_batch needs square images, got {h}x{w}")  # rot90 would change the shape
    device = generator.device if generator is not None else x.device
    k = torch.randint(4, (n,), generator=generator, device=device).to(x.device)  # [N]
    # counter-clockwise quarter turns
    rots = torch.stack([torch.rot90(x, j, dims=(2, 3)) for j in range(4)])  # [4, N, C, H, W]
    return rots[k, torch.arange(n, device=x.device)], k  # [N, C, H, W]: a gather, so no host sync on CUDA


class RotationAux(mocov3.MoCoV3):
    """MoCo v3 exactly as in mocov3.py, plus a rotation head on the online backbone."""

    def __init__(self, args):
        super().__init__(args)  # built first: with the same seed, the MoCo v3 weights equal mocov3.py's
        dim = self.projector[0].in_features  # C, the pooled backbone feature dim
        # Linear(C, C) -> BN -> ReLU -> Linear(C, 4); pretraining only, never exported
        self.rot_head = mocov3.build_mlp(2, dim, dim, 4, last_bn=False)
        self.rot_weight, self.rot_size, self.channels_last = (args.rot_weight, args.rot_size,
                                                              args.channels_last)

    def rotation_loss(self, x):
        """Rotation CE and accuracy (percent) of one view: its own online backbone pass,
        so its own BN statistics."""
        if self.rot_size and self.rot_size != x.shape[-1]:  # the cheap option: a downscaled copy
            x = F.interpolate(x, size=self.rot_size, mode="bilinear", antialias=True)  # [N, 3, S, S]
        x, k = rotate_batch(x)  # [N, 3, S, S], [N]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # backbone only: no projector, predictor or momentum encoder
        logits = self.rot_head(self.backbone(x))  # [N, 4]
        return F.cross_entropy(logits, k), 100.0 * (logits.argmax(1) == k).float().mean()

    def forward(self, x1, x2, m):
        loss = super().forward(x1, x2, m)  # MoCo v3 on the unrotated views, unchanged
        ce1, acc1 = self.rotation_loss(x1)
        ce2, acc2 = self.rotation_loss(x2)
        rot_ce = ce1 + ce2  # summed over the two views, as in the paper
        return loss + self.rot_weight * rot_ce, rot_ce.detach(), (acc1 + acc2).detach() / 2


# ---------------------------------------------------------------------------- training


def check_args(args):
    """MoCo v3's checks plus the rotation flags (one line, exit 2), before any work."""
    mocov3.check_args(args)
    if args.rot_size and not 0 < args.rot_size <= args.img_size:
        raise common.BadInput(f"--rot-size {args.rot_size} needs 0 < size <= --img-size {args.img_size}")
    if args.rot_size:  # the rotated views are resized: the backbone must take that size (a ViT does not)
        common.check_input(args.arch, args.img_size, args.rot_size, "--rot-size")


@common.user_errors
def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    check_args(args)
    run = common.setup(args, "rotation_aux")

    # ---- data
    augmentations = mocov3.byol_augmentations(args.img_size, args.crop_min, args.blur)  # as MoCo v3
    views = common.TwoViews(*augmentations, args.gpu_aug)
    train_ds, steps_per_epoch = common.pretrain_data(args, run, views)
    knn = common.knn_monitor(args, run)

    # ---- model
    model, step_model = common.prepare_model(RotationAux(args), run, sync_bn=True)  # as MoCo v3

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
        for i, ((x1, x2), _) in log.timed(loader):  # i: index in the epoch
            e = epoch + i / steps_per_epoch  # fractional epoch: schedules are per iteration
            lr = common.cosine_lr(e, base_lr, args.warmup_epochs, args.epochs)
            common.set_lr(optimizer, lr)
            m = common.cosine_momentum(e, args.epochs, args.momentum)
            x1, x2 = views.finish(run, x1, x2, log.step)  # [n, 3, H, W] each, n = batch / world
            with run.autocast():
                loss, rot_ce, rot_acc = step_model(x1, x2, run.scalar(m))  # the rotated views are made inside
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach(), lr=lr, momentum=m, rot_ce=rot_ce, rot_acc=rot_acc)
            if common.end_of_step(run, log, state):  # --save-every, SIGTERM/SIGUSR1, the last step
                break

        # ---- eval & checkpoint
        log.evaluate(model.backbone, knn, epoch)
        common.save_checkpoint(run, log, state, epoch_end=True)  # every --save-epochs epochs
    common.export_backbone(run, model.backbone)  # the online backbone only: the rotation head is dropped
    log.summary()


if __name__ == "__main__":
    main()
