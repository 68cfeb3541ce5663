"""Kernel timings, model-only on random data: the LARS step and DenseCL's dense loss, each old vs new.

(a) LARS step: common.LARS (multi-tensor torch._foreach_* ops) vs the per-tensor loop it replaced (a copy is
    kept below), on the parameters of a ResNet-18 and a ResNet-50 with random gradients.
(b) DenseCL dense loss, forward + backward w.r.t. the queries: densecl.dense_loss (1/tau folded into the
    queries, no concatenation, fp32-accumulated logsumexp over the logits in their own dtype) vs the
    concatenating cross-entropy it replaced (a copy is kept below), fp32, at N = 64, D = 128, S = 4 and 7,
    K = 4096 and 16384. Also reported: the bytes each version saves for backward and writes, in fp32 and
    under bf16 autocast (counted with saved-tensor hooks and a dispatch mode, not timed), and how far the new
    loss and gradient are from the old ones.

Each case: 2 warm-up calls, then --reps timed calls, old and new alternating so that drifting machine load
hits them alike; the median is reported. Writes benchmarks/results/kernels_{cpu,gpu}.md, prints it, ends with
a JSON line.

  python benchmarks/kernels.py                   # CPU, 1 torch thread (default): kernels_cpu.md
  python benchmarks/kernels.py --threads 2 --reps 20
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import common  # noqa: E402
import densecl  # noqa: E402
from throughput import device_name  # noqa: E402

# N, D, S, K: batch 64, DenseCL's 128-d heads, the final grid of the cpu preset (4) and of 224 px (7),
# queues of the size small-data runs use
DENSE_SHAPES = [(64, 128, 4, 4096), (64, 128, 4, 16384), (64, 128, 7, 4096), (64, 128, 7, 16384)]


class LoopLARS(torch.optim.Optimizer):
    """common.LARS as it was: one parameter at a time."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["trust_coefficient"]
                                                                  * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def concat_dense_loss(q_dense, k_dense, match, queue, temperature):
    """densecl.dense_loss as it was: an fp32 copy of the logits, positives and negatives concatenated."""
    q, k = F.normalize(q_dense.float(), dim=1), F.normalize(k_dense.float(), dim=1)  # [N, D, S^2]
    k_pos = torch.gather(k, 2, match[:, None].expand(-1, k.shape[1], -1))  # [N, D, S^2]
    l_pos = (q * k_pos).sum(1).reshape(-1, 1)  # [N * S^2, 1]
    q = q.transpose(1, 2).reshape(-1, q.shape[1])  # [N * S^2, D]
    l_neg = (q @ queue.T).float()  # [N * S^2, K]
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # [N * S^2, 1 + K]
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def alternate(fns, reps, sync):
    """{name: median ms} of `reps` calls of each fn(), the fns alternating, after 2 warm-up calls each."""
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(1000 * (time.perf_counter() - t))
    return {name: statistics.median(v) for name, v in times.items()}


def lars_case(arch, device, reps, sync):
    """Old and new LARS steps on `arch`'s parameters (two identical copies) with fixed random gradients."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)().to(device)
    copies = [[p.detach().clone() for p in net.parameters()] for _ in range(2)]
    for old, new in zip(*copies):
        old.grad = torch.randn_like(old)
        new.grad = old.grad.clone()
    # the MoCo v3 recipe's values; they do not change the work done
    kw = dict(lr=0.3, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)
    opts = {"old": LoopLARS(copies[0], **kw), "new": common.LARS(copies[1], **kw)}
    ms = alternate({k: o.step for k, o in opts.items()}, reps, sync)
    diff = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(copies[1], copies[0]))
    return {"arch": arch, "tensors": len(copies[0]), "matrices": sum(p.ndim > 1 for p in copies[0]),
            "numel": sum(p.numel() for p in copies[0]), "old_ms": ms["old"], "new_ms": ms["new"],
            "rel_diff": diff}


class Writes(TorchDispatchMode):
    """MiB the ops write into their outputs (views excluded, in-place ops included): the write half of the
    memory traffic, dominated here by the logit-sized tensors."""
    mib = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.mib += t.numel() * t.element_size() / 2**20
        return out


def memory(fn, q, kd, match, queue, bf16, device):
    """(MiB autograd saves for backward, MiB written by all ops) in one forward + backward of the dense loss
    fn, in fp32 or under bf16 autocast."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    q = q.detach().requires_grad_()
    writes = Writes()
    with writes:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(q, kd, match, queue, 0.2)
        loss.backward()
    return sum(seen.values()) / 2**20, writes.mib


def dense_case(shape, device, reps, sync):
    """Old and new dense loss, forward + backward w.r.t. q_dense, on random inputs of one shape."""
    n, d, s, k = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(n, d, s * s, generator=g).to(device).requires_grad_()  # [N, D, S^2]
    kd = torch.randn(n, d, s * s, generator=g).to(device)  # [N, D, S^2]
    match = torch.randint(0, s * s, (n, s * s), generator=g).to(device)  # [N, S^2]
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1).to(device)  # [K, D]
    fns = {"old": concat_dense_loss, "new": densecl.dense_loss}
    values = {}

    def step(name):
        q.grad = None
        loss = fns[name](q, kd, match, queue, 0.2)
        loss.backward()
        values[name] = (loss.detach(), q.grad)

    ms = alternate({name: lambda name=name: step(name) for name in fns}, reps, sync)
    (v_old, g_old), (v_new, g_new) = values["old"], values["new"]
    mem = {(name, bf16): memory(fn, q, kd, match, queue, bf16, device)
           for name, fn in fns.items() for bf16 in (False, True)}
    return {"shape": shape, "old_ms": ms["old"], "new_ms": ms["new"],
            "value_rel_diff": (abs(v_new - v_old) / v_old).item(),
            "grad_rel_diff": ((g_new - g_old).norm() / g_old.norm()).item(),
            **{f"{kind}_{name}_{'bf16' if bf16 else 'fp32'}_mib": v[i]
               for (name, bf16), v in mem.items() for i, kind in enumerate(("saved", "written"))}}


def tables(lars, dense, head):
    lines = [head, "", "LARS step (common.LARS): multi-tensor ops (new) vs the per-tensor loop (old); random "
             "gradients, parameters as torchvision builds them.", "",
             "| parameters | tensors (>1-D) | elements | old ms | new ms | speed-up | max rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for r in lars:
        lines.append(f"| {r['arch']} | {r['tensors']} ({r['matrices']}) | {r['numel'] / 1e6:.1f} M "
                     f"| {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['old_ms'] / r['new_ms']:.2f}x "
                     f"| {r['rel_diff']:.1e} |")
    lines += ["", "DenseCL dense loss (densecl.dense_loss), forward + backward w.r.t. the queries, fp32, "
              "tau 0.2: new vs the concatenating cross-entropy (old).", "",
              "| N, D, S^2, K | logits | old ms | new ms | speed-up | rel. diff loss / grad |",
              "|---|---|---|---|---|---|"]
    for r in dense:
        n, d, s, k = r["shape"]
        lines.append(f"| {n}, {d}, {s * s}, {k} | {n * s * s} x {k} | {r['old_ms']:.1f} | {r['new_ms']:.1f} "
                     f"| {r['old_ms'] / r['new_ms']:.2f}x "
                     f"| {r['value_rel_diff']:.0e} / {r['grad_rel_diff']:.0e} |")
    lines += ["", "Its memory in one forward + backward (counted, not timed): the tensors saved for "
              "backward, and the bytes all ops write (views excluded, in-place ops included).", "",
              "| N, D, S^2, K | precision | saved old / new MiB | written old / new MiB |",
              "|---|---|---|---|"]
    for r in dense:
        n, d, s, k = r["shape"]
        for p in ("fp32", "bf16"):
            lines.append(f"| {n}, {d}, {s * s}, {k} | {p if p == 'fp32' else 'bf16 autocast'} "
                         f"| {r[f'saved_old_{p}_mib']:.0f} / {r[f'saved_new_{p}_mib']:.0f} "
                         f"| {r[f'written_old_{p}_mib']:.0f} / {r[f'written_new_{p}_mib']:.0f} |")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared CPU)")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 8)), help="timed calls per case")
    ap.add_argument("--out", default="", help="markdown file (default: benchmarks/results/kernels_DEVICE.md)")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    lars = []
    for arch in ("resnet18", "resnet50"):
        lars.append(lars_case(arch, device, opts.reps, sync))
        print(f"lars {arch}: {lars[-1]['old_ms']:.2f} -> {lars[-1]['new_ms']:.2f} ms", flush=True)
    dense = []
    for shape in DENSE_SHAPES:
        dense.append(dense_case(shape, device, opts.reps, sync))
        print(f"dense loss {shape}: {dense[-1]['old_ms']:.1f} -> {dense[-1]['new_ms']:.1f} ms", flush=True)
    cmd = " ".join(["python benchmarks/kernels.py", *map(shlex.quote, argv)])
    head = (f"Device: {device_name()}. torch {torch.__version__}, {datetime.date.today().isoformat()}. "
            f"Command: `{cmd}`. Median of {opts.reps} calls per variant after 2 warm-up calls, old and new "
            "alternating.")
    lines = tables(lars, dense, head)
    out = opts.out or os.path.join(ROOT, "benchmarks", "results", f"kernels_{'gpu' if cuda else 'cpu'}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n(wrote {out}, {time.perf_counter() - t0:.0f} s)")
    print(json.dumps({"event": "summary", "device": device_name(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "reps": opts.reps, "lars": lars,
                      "dense_loss": [{**r, "shape": list(r["shape"])} for r in dense]}), flush=True)


if __name__ == "__main__":
    main()
