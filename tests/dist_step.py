"""One MoCo v3 training step on a fixed global batch, run alone or under torchrun (gloo, CPU).

BN layers are put in eval mode: PyTorch's SyncBatchNorm is CUDA-only, so on CPU each process
would otherwise normalise with its own half-batch statistics. Everything else is the real path:
DDP gradient averaging, keys gathered across ranks, labels offset by rank. Prints the
rank-averaged loss and a checksum of the updated weights as JSON (rank 0).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import mocov3  # noqa: E402

args = mocov3.Args(arch="resnet18", img_size=32, mlp_dim=32, proj_dim=16, temperature=0.2, batch_size=8,
                   optimizer="sgd", lr=0.5, wd=0.0, workers=0, output_dir=sys.argv[1])
run = common.setup(args, "mocov3")
torch.manual_seed(0)  # the same initial weights and global batch on every rank
model, step_model = common.prepare_model(mocov3.MoCoV3(args), run)
g = torch.Generator().manual_seed(1)
x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
n = 8 // run.world
x1, x2 = x1[run.rank * n:(run.rank + 1) * n], x2[run.rank * n:(run.rank + 1) * n]
model.eval()
optimizer = common.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
loss = step_model(x1, x2, 0.99)
common.optimizer_step(loss, optimizer, common.grad_scaler(run))
loss = loss.detach()
if run.world > 1:
    dist.all_reduce(loss)
    loss /= run.world
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
if run.rank == 0:
    print(json.dumps({"loss": loss.item(), "weights": weights.double().sum().item(),
                      "weights_abs": weights.double().abs().sum().item()}))
