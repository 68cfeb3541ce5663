"""The one distributed harness: main(out_dir) in one process (the tests call it in theirs) or under
`torchrun --nproc_per_node=2 tests/dist_harness.py OUT` (gloo, CPU), it does for every method what needs more
than one process, in one launch, and rank 0 writes OUT/results.json.

1. One training step on a fixed global batch (each rank takes its slice), BN layers in eval mode:
   PyTorch's SyncBatchNorm is CUDA-only, so CPU processes would otherwise normalise with their own
   half-batch statistics. Everything else is the real path: DDP gradient averaging, keys gathered
   across ranks, labels offset by rank, queues filled from all ranks. The rank-averaged loss and
   checksums of the updated weights (and DenseCL's queues) must equal one process's on the whole batch.
   rotation_aux draws its rotations per rank, so its step is MoCo v3's plus a per-sample local loss:
   it is covered by the smoke run (3). DetCon's ids are sampled per rank too, so its loss is checked on
   fixed embeddings and ids: the value and every element of both gradients against one process.
2. DenseCL's shuffle-BN across ranks: every sample comes back in place, and the key encoder saw
   samples of the other rank.
3. Each training script's main() for 2 steps, as `torchrun ... METHOD.py` runs it (rank 0 alone logs).
4. A global batch not divisible by the world size, and an output folder another run holds: one line, exit 2,
   on every rank (rank 0 alone takes the lock and tells the others).
5. eval_linear.py's linear, knn and seg-knn modes on 11 val images (odd: DistributedSampler would pad rank 1
   with a duplicate): the metrics and the val image count of 2 processes must be those of 1 (seg shares
   seg-knn's val loop); linear also with --data-on-device.
6. --data-on-device: over two epochs of a held split, every image is in exactly one rank's batches once per
   epoch, in a new order each epoch; MoCo v3 trains 2 steps with it under torchrun (part 3).
"""
import contextlib
import fcntl
import io
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import densecl  # noqa: E402
import detcon  # noqa: E402
import eval_linear  # noqa: E402
import fast_moco  # noqa: E402
import mocov3  # noqa: E402
import rotation_aux  # noqa: E402
from conftest import TINY, tiny  # noqa: E402 -- the tests' tiny runs (this file's folder is on sys.path)

MODULES = {"mocov3": mocov3, "fast_moco": fast_moco, "densecl": densecl, "detcon": detcon,
           "rotation_aux": rotation_aux}


def rank_mean(x):
    x = x.detach().clone()
    if common.get_world_size() > 1:
        dist.all_reduce(x)
        x /= common.get_world_size()
    return x


def one_step(name, model, run, args, forward, sync_bn):
    """Seeded weights, BN eval, one optimizer step on this rank's slice of a fixed global batch of 8."""
    model, step_model = common.prepare_model(model, run, sync_bn=sync_bn)
    model.eval()
    g = torch.Generator().manual_seed(1)  # the same global batch on every rank
    x1, x2 = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    n = 8 // run.world
    mine = slice(run.rank * n, (run.rank + 1) * n)
    groups = (fast_moco.param_groups(model) if name == "fast_moco"
              else [p for p in model.parameters() if p.requires_grad])
    optimizer = common.build_optimizer(args, groups)
    loss = forward(step_model, x1[mine], x2[mine])
    common.optimizer_step(loss, optimizer, common.grad_scaler(run))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    rec = {"loss": rank_mean(loss).item(), "weights": weights.sum().item(),
           "weights_abs": weights.abs().sum().item()}
    if name == "densecl":
        rec.update(queue=model.queue.double().sum().item(),
                   dense_queue=model.dense_queue.double().abs().sum().item(),
                   ptr=int(model.queue_ptr), dense_ptr=int(model.dense_queue_ptr))
    return rec


def tiny_args(cls, presets, name, out):
    return common.parse_args(cls, presets, tiny(name, os.path.join(out, f"step_{name}"), "--optimizer", "sgd",
                                                "--lr", "0.5", "--wd", "0"))


def main(out_dir):
    """Parts 1-5 in this process (alone, or as one rank of torchrun); rank 0 writes out_dir/results.json."""
    results = {}
    # ---- 1. one step per method, BN in eval mode
    run = None
    for name, forward in [
        ("mocov3", lambda m, a, b: m(a, b, 0.99)),
        ("fast_moco", lambda m, a, b: m(a, b, 0.99)),
        ("densecl", lambda m, a, b: m(a, b, 0.99, 0.5)[0]),
    ]:
        mod = MODULES[name]
        args = tiny_args(mod.Args, mod.PRESETS, name, out_dir)
        if name == "densecl":
            args.shuffle_splits, args.queue_size, args.proj_dim = 2, 16, 16
        run = common.setup(args, name)
        torch.manual_seed(0)  # the same initial weights on every rank
        build = {"mocov3": mocov3.MoCoV3, "fast_moco": fast_moco.FastMoCo, "densecl": densecl.DenseCL}[name]
        model = build(args)
        results[f"step_{name}"] = one_step(name, model, run, args, forward, sync_bn=name != "densecl")

    # DetCon's loss on fixed embeddings and ids (its id sampling is per rank)
    g = torch.Generator().manual_seed(2)
    b, m, d = 8, 4, 16
    pred1, pred2, t1, t2 = (torch.randn(b, m, d, generator=g) for _ in range(4))
    ids1, ids2 = torch.randint(0, 5, (b, m), generator=g), torch.randint(0, 5, (b, m), generator=g)
    n = b // run.world
    mine = slice(run.rank * n, (run.rank + 1) * n)
    p1, p2 = pred1[mine].clone().requires_grad_(), pred2[mine].clone().requires_grad_()
    loss = detcon.detcon_loss(p1, p2, t1[mine], t2[mine], ids1[mine], ids2[mine], 0.1)
    loss.backward()
    results["detcon_loss"] = {"loss": rank_mean(loss).item()}
    for key, grad in (("grad1", p1.grad), ("grad2", p2.grad)):  # every element of d(rank-mean loss) / d pred
        if run.world > 1:
            full = [torch.empty_like(grad) for _ in range(run.world)]
            dist.all_gather(full, grad)
            grad = torch.cat(full) / run.world
        results["detcon_loss"][key] = grad.flatten().tolist()

    # Fast-MoCo's loss on fixed embeddings: the mean of the per-rank losses is the one-process loss
    p1, p2 = torch.randn(6, 8, 16, generator=g), torch.randn(6, 8, 16, generator=g)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    loss = fast_moco.fast_moco_loss(p1[:, mine], p2[:, mine], z1[mine], z2[mine], 0.2)
    results["fast_moco_loss"] = {"loss": rank_mean(loss).item()}

    # ---- 2. DenseCL's shuffle-BN across ranks
    n = 8 // run.world
    x = (torch.arange(8.0)[:, None] * torch.ones(1, 2))[run.rank * n:(run.rank + 1) * n]  # [n, 2]: row i is i
    seen = []
    out_x, = densecl.shuffle_bn(lambda c: (seen.append(c[:, 0].tolist()) or c + 0.5,), x)
    foreign = any(int(v) // n != run.rank for v in seen[0])  # the encoder saw a sample of another rank
    flags = torch.tensor([float(torch.equal(out_x, x + 0.5)), float(foreign)])
    if run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    results["shuffle_bn"] = {"restored": bool(flags[0]), "foreign": bool(flags[1])}

    # ---- 3. each script's main() for 2 steps (under torchrun only: the test reads these from the 2-process
    # launch), and 4. a batch the world size does not divide
    runs = [(name, mod, []) for name, mod in MODULES.items()]
    runs.append(("mocov3_device", mocov3, ["--data-on-device"]))
    for name, mod, more in (runs if run.world > 1 else []):
        run_dir = os.path.join(out_dir, f"run_{name}")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            mod.main(tiny(name.split("_device")[0], run_dir, "--max-steps", "2", *more))
        lines = [line for line in stdout.getvalue().splitlines() if line.startswith('{"event": "summary"')]
        results[f"run_{name}"] = {"summary_lines": lines}
        if run.rank == 0:
            results[f"run_{name}"].update(
                world_size=json.load(open(os.path.join(run_dir, "args.json")))["world_size"],
                backbone=os.path.exists(os.path.join(run_dir, "backbone.pth")))
    if run.world > 1:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                mocov3.main([*TINY, "--batch-size", "7", "--output-dir", os.path.join(out_dir, "bad")])
                code = 0
            except SystemExit as e:
                code = e.code
        results["bad_batch"] = {"code": code, "stderr": stderr.getvalue().strip().splitlines()}
        locked, held = os.path.join(out_dir, "locked"), None
        if run.rank == 0:  # another open file of .lock: flock refuses this process's own run too
            os.makedirs(locked)
            held = open(os.path.join(locked, ".lock"), "w")
            fcntl.flock(held, fcntl.LOCK_EX)
        dist.barrier()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                mocov3.main(tiny("mocov3", locked, "--max-steps", "1"))
                code = 0
            except SystemExit as e:
                code = e.code
        results["run_locked"] = {"code": code, "stderr": stderr.getvalue().strip().splitlines(),
                                 "files": sorted(os.listdir(locked)) if run.rank == 0 else None}
        if held:
            held.close()

    # ---- 5. eval_linear counts each val image once, alone and under torchrun
    EVAL = ["--pretrained", "none", "--synthetic-size", "55", "--img-size", "32", "--stem", "small",
            "--batch-size", "8", "--workers", "0"]
    train, vote = ["--epochs", "1"], ["--knn-k", "10"]
    for mode, more in (("linear", train), ("knn", vote), ("seg-knn", vote),
                       ("linear", [*train, "--data-on-device"])):
        key = f"eval_{mode}" + ("_device" if "--data-on-device" in more else "")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            eval_linear.main(["--mode", mode, *EVAL, *more, "--output-dir", os.path.join(out_dir, key)])
        if common.get_rank() == 0:
            results[key] = json.loads(stdout.getvalue().strip().splitlines()[-1])

    # ---- 6. a held split's epochs, sharded by rank: each image once per epoch
    argv = [*TINY, "--synthetic-size", "24", "--data-on-device",
            "--output-dir", os.path.join(out_dir, "held")]
    args = common.parse_args(mocov3.Args, mocov3.PRESETS, argv)
    run = common.setup(args, "mocov3")
    held = common.HeldSplit(torch.zeros(24, 3, 2, 2, dtype=torch.uint8), torch.arange(24))  # label = index
    seen = [[y.tolist() for _, y in common.epoch_loader(held, run, epoch)] for epoch in (0, 1)]
    every = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(every, seen)
    else:
        every = [seen]
    results["held_epochs"] = every  # [rank][epoch][batch] -> indices

    # rank 0 reports; every rank's own view of the smoke runs is gathered so the test sees that only rank 0
    # printed
    views = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(views, {k: v for k, v in results.items() if k.startswith("run_")})
    else:
        views = [{k: v for k, v in results.items() if k.startswith("run_")}]
    if run.rank == 0:
        results["per_rank_runs"] = views
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
