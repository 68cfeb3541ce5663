"""MoCo v3: "An Empirical Study of Training Self-Supervised Vision Transformers".

Paper: Chen, Xie, He, ICCV 2021, arXiv:2104.02057. Official code: github.com/facebookresearch/moco-v3

Idea: two augmented views of each image; the online encoder (backbone -> projector -> predictor)
embeds one view, a momentum encoder (an EMA copy of backbone -> projector) embeds the other,
and an InfoNCE loss makes each query pick its own key among all keys of the global batch. No
memory queue: the large batch supplies the negatives. Symmetrised over the two views.

Kept from the official code:
- Heads without bias and the last-BN rules (ResNet vs ViT).
- Momentum update before computing the keys.
- The summed symmetric loss scaled by 2*tau.
- Keys gathered across GPUs without gradient and labels offset by rank.
- Per-iteration lr and momentum schedules.
- LARS (ResNet) / AdamW (ViT).
- Frozen random patch projection and sin-cos position embedding for ViT.
- Official ResNet-50 recipes (ImageNet, batch 4096, crop-min 0.2 at every length): 100 epochs lr 0.6,
  wd 1e-6, m0 0.99 (the defaults); 300 epochs lr 0.3; 1000 epochs lr 0.3, wd 1.5e-6, m0 0.996.

Changed:
- Backbones are torchvision's (ViT from torchvision's VisionTransformer with MoCo v3's position
  embedding and patch init; its other layers keep torchvision's init).
- Gaussian blur samples its sigma from torch's RNG.
- Precision: bf16 autocast with TF32 matmuls and convolutions by default on CUDA (--precision
  auto); the official code uses fp16 autocast with a GradScaler (--precision fp16 here).
- SyncBN only on multi-GPU CUDA runs (PyTorch's SyncBatchNorm is CUDA-only); one process or CPU
  ranks use per-process BN.
- The `cifar` preset is solo-learn's validated recipe.
- The `cpu` preset is ours, sized for a laptop.

Commands:
  python mocov3.py                                   # CPU smoke run on synthetic data (README: quick start)
  python mocov3.py --data /imagenet --batch-size 256 --epochs 100            # 1 GPU
  torchrun --nproc_per_node=8 mocov3.py --data /imagenet --resume auto       # 1 node, batch 4096
  torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 \\
      --nproc_per_node=8 mocov3.py --data /imagenet --resume auto            # multi-node
  python mocov3.py --resume auto                    # continue the run in --output-dir
  python mocov3.py --preset imagenet-vit --data /imagenet --arch vit_base    # ViT recipe
  python mocov3.py --data /imagenet --epochs 1000 --lr 0.3 --wd 1.5e-6 --momentum 0.996  # R50, 1000 ep

Healthy loss: the loss is a sum of two 2*tau-scaled cross-entropies, so with tau = 1 and
B = 4096 it starts near 2 * 2 * ln(B) ~= 33 and plateaus around 27 on ImageNet. In the cpu preset
(tau 0.2, B 32) it starts near 4 * 0.2 * ln 32 ~= 2.8 and falls slowly and noisily (README's MoCo v3
section, "Healthy loss").
"""
import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common


@dataclasses.dataclass
class Args(common.CommonArgs):
    arch: str = "resnet50"
    """backbone: resnet18, resnet50, vit_small, vit_base"""
    epochs: int = 100
    """pretraining epochs (ImageNet: 100, 300 or 1000)"""
    batch_size: int = 4096
    """global batch over all processes (ImageNet: 4096)"""
    optimizer: str = "lars"
    """lars (ResNet recipe), adamw (ViT recipe) or sgd"""
    lr: float = 0.6
    """base lr for batch 256, scaled by batch/256 (ImageNet R50: 0.6 for 100 ep, 0.3 for 300/1000 ep)"""
    wd: float = 1e-6
    """weight decay (ImageNet R50: 1e-6 for 100/300 ep, 1.5e-6 for 1000 ep; ViT: 0.1)"""
    warmup_epochs: float = 10
    """linear lr warmup epochs before the cosine decay (ImageNet: 10 R50, 40 ViT)"""
    trust_coefficient: float = 0.001
    """LARS trust coefficient (ImageNet: 0.001; solo-learn CIFAR: 0.02)"""
    temperature: float = 1.0
    """softmax temperature tau (ImageNet R50: 1.0; ViT and CIFAR: 0.2)"""
    momentum: float = 0.99
    """initial momentum-encoder coefficient m0, cosine-scheduled to 1 (0.996 for 1000 epochs)"""
    proj_dim: int = 256
    """output dim of projector and predictor"""
    mlp_dim: int = 4096
    """hidden dim of projector and predictor"""
    crop_min: float = 0.2
    """lower bound of RandomResizedCrop's scale (ImageNet R50: 0.2 for 100, 300 and 1000 ep; ViT: 0.08)"""
    blur: bool = True
    """Gaussian blur in the augmentation (off in the CIFAR recipe: 32-px images are already blurry)"""
    freeze_patch_proj: bool = True
    """ViT: keep the random patch projection frozen (MoCo v3's stability trick)"""

    # the allowed values of the numbers above (checked with the shared flags' before any work: one line naming
    # the flag); rotation_aux.py's Args inherits them
    RANGES = {"trust_coefficient": common.POSITIVE, "temperature": common.POSITIVE,
              "momentum": common.Range(0, 1), "proj_dim": common.Range(1), "mlp_dim": common.Range(1),
              "crop_min": common.Range(0, 1, lo_excluded=True)}


PRESETS = {
    "imagenet": {},
    "imagenet-vit": dict(arch="vit_base", optimizer="adamw", lr=1.5e-4, wd=0.1, warmup_epochs=40, epochs=300,
                         temperature=0.2, crop_min=0.08),
    # solo-learn's validated MoCo v3 CIFAR recipe (ResNet-18, small stem)
    "cifar": dict(arch="resnet18", stem="small", img_size=32, batch_size=256, lr=0.3, trust_coefficient=0.02,
                  wd=1e-6, temperature=0.2, crop_min=0.08, blur=False, epochs=1000, knn_every=10),
    # ours: the quick-start tuning shared by every method file (README, "The cpu preset"); here also:
    # crops of >= 60% keep the main shape in both views; no blur: at 64 px a sigma of 2 px erases shapes
    "cpu": dict(arch="resnet18", stem="imagenet", img_size=64, batch_size=32, epochs=3, synthetic_size=1280,
                optimizer="adamw", lr=1.6e-2, wd=1e-6, momentum=0.9, warmup_epochs=0.5, temperature=0.2,
                crop_min=0.6, blur=False, mlp_dim=1024, workers=2, log_every=20),
}


# ---------------------------------------------------------------------------- the method


def contrastive_loss(q, k, temperature):
    """InfoNCE of queries q [N, D] against the keys of the global batch; positives on the diagonal."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)  # [N, D]
    k = common.all_gather_nograd(k)  # [B, D], B = N * world; no gradient flows into the keys
    logits = q @ k.T / temperature  # [N, B]
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + n * common.get_rank()  # my queries' keys sit at rank * N
    return F.cross_entropy(logits, labels) * (2 * temperature)  # x 2 tau: gradient scale independent of tau


def build_mlp(num_layers, in_dim, mlp_dim, out_dim, last_bn=True):
    """MoCo v3 MLP: Linear layers without bias; Linear-BN-ReLU hidden layers;
    optional last BN without affine."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else mlp_dim, out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))  # SimCLR's design: BN on the output
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.temperature = args.temperature
        self.backbone, dim = common.build_backbone(args.arch, args.stem, args.img_size,
                                                   args.freeze_patch_proj)
        vit = args.arch.startswith("vit")
        # ResNet: 2-layer projector + last BN, predictor without last BN; ViT: 3-layer projector, both last BN
        self.projector = build_mlp(3 if vit else 2, dim, args.mlp_dim, args.proj_dim)
        self.predictor = build_mlp(2, args.proj_dim, args.mlp_dim, args.proj_dim, last_bn=vit)
        self.momentum_backbone = copy.deepcopy(self.backbone)  # exact copy at init
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad = False  # updated only by EMA

    def online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def momentum_params(self):
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.projector(self.backbone(x1)))  # [N, proj_dim]
        q2 = self.predictor(self.projector(self.backbone(x2)))  # [N, proj_dim]
        with torch.no_grad():
            common.ema_update(self.momentum_params(), self.online_params(), m)  # before the keys, as official
            k1 = self.momentum_projector(self.momentum_backbone(x1))  # [N, proj_dim]
            k2 = self.momentum_projector(self.momentum_backbone(x2))  # [N, proj_dim]
        return contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)


# ---------------------------------------------------------------------------- training


def check_args(args):
    """MoCo v3's argument errors (one line, exit 2), before any work."""
    if args.arch.startswith("vit") and args.img_size % 16:
        raise common.BadInput(f"--img-size {args.img_size} is not a multiple of the ViT patch size 16")


def byol_augmentations(img_size, crop_min, blur=True):
    """MoCo v3's two views (main_moco.py's augmentation1 and 2: BYOL's asymmetric pair), PIL image ->
    normalised tensor [3, img_size, img_size]. --gpu-aug and --data-on-device run the same on the device."""
    normalize = T.Normalize(common.MEAN, common.STD)  # ImageNet statistics
    augmentation1 = [
        T.RandomResizedCrop(img_size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # not strengthened
        T.RandomGrayscale(p=0.2),
        T.RandomApply([common.RandomBlur()], p=1.0 if blur else 0.0),  # sigma ~ U(0.1, 2)
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ]
    augmentation2 = [
        T.RandomResizedCrop(img_size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([common.RandomBlur()], p=0.1 if blur else 0.0),
        T.RandomSolarize(threshold=128, p=0.2),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ]
    return augmentation1, augmentation2


@common.user_errors
def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv)
    check_args(args)
    run = common.setup(args, "mocov3")

    # ---- data
    views = common.TwoViews(*byol_augmentations(args.img_size, args.crop_min, args.blur), args.gpu_aug)
    train_ds, steps_per_epoch = common.pretrain_data(args, run, views)
    knn = common.knn_monitor(args, run)

    # ---- model
    model, step_model = common.prepare_model(MoCoV3(args), run, sync_bn=True)  # official: SyncBN across GPUs

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
                loss = step_model(x1, x2, run.scalar(m))
            common.optimizer_step(loss, optimizer, scaler)
            log.log_step(loss.detach(), lr=lr, momentum=m)
            if common.end_of_step(run, log, state):  # --save-every, SIGTERM/SIGUSR1, the last step
                break

        # ---- eval & checkpoint
        log.evaluate(model.backbone, knn, epoch)
        common.save_checkpoint(run, log, state, epoch_end=True)  # every --save-epochs epochs
    common.export_backbone(run, model.backbone)
    log.summary()


if __name__ == "__main__":
    main()
