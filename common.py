"""common.py -- the small shared layer of effssl.

Everything here is plumbing shared by the method files (mocov3.py, fast_moco.py, densecl.py,
detcon.py, rotation_aux.py) and eval_linear.py. Method logic never lives here: a method passes
what it needs (its param groups, its trust coefficient, its SyncBN choice, its own geometry).
Copy this file together with one method file.

Sections (=====), in the order a method file uses them, each followed by its details (-----): errors &
args | run setup | data | augmentations | backbones | optimizer & schedules | checkpoint, resume & export |
kNN monitor | logging.
"""
import argparse
import ast
import atexit
import dataclasses
import functools
import glob
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext, redirect_stderr

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2


# ============================================================================ errors & args

class BadInput(Exception):
    """A user error: reported as one line on stderr with exit code 2, never a traceback."""


# torchvision's ResNet class (resnet*, resnext*, wide_resnet*): the small stem and zero-init residual apply
RESNETS = ("resnet", "resnext", "wide_resnet")


def default_workers():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)  # loader workers per process: more than 8, or than the cores, would only contend


@dataclasses.dataclass
class CommonArgs:
    """Plumbing flags shared by every training script (method files add their hyperparameters)."""
    data: str = "synthetic"
    """synthetic (built in), cifar10, cifar100, stl10 (downloaded to --data-root) or an image folder"""
    data_root: str = "data"
    """where torchvision datasets are downloaded"""
    preset: str = "auto"
    """auto (cpu for synthetic, cifar for 32-px sets, imagenet otherwise), imagenet, cifar or cpu"""
    stem: str = "imagenet"
    """ResNet stem: imagenet (7x7/2 conv + max-pool, stride 32) or small (3x3/1 conv, no pool, stride 8)"""
    img_size: int = 224
    """crop size fed to the network"""
    workers: int = default_workers()
    """data loader worker processes per GPU/process (8, or this machine's cores if fewer)"""
    gpu_aug: bool = False
    """photometric augmentation batched on the device (per-sample parameters); workers decode, crop, flip"""
    data_on_device: bool = False
    """hold the data set decoded on the device; crops, flips and colour run there, per sample (no workers)"""
    store_size: int = 0
    """--data-on-device: side of the stored images (0 = native for built-in sets, else 1.25 x --img-size)"""
    precision: str = "auto"
    """fp32, bf16 or fp16 (GradScaler); auto = bf16 on CUDA, fp32 on CPU"""
    channels_last: bool = False
    """NHWC memory layout for convolutions (faster with bf16 on tensor cores)"""
    compile: bool = False
    """torch.compile the model (slower start, faster steps)"""
    tensorboard: bool = False
    """also write the logged scalars to <output-dir>/tb with torch.utils.tensorboard (needs tensorboard)"""
    output_dir: str = ""
    """run directory; default runs/<method>"""
    resume: str = ""
    """auto (the checkpoint in --output-dir, if any), a checkpoint path, or empty for a fresh run"""
    overwrite: bool = False
    """a fresh run replaces the run in --output-dir (its checkpoint, backbone, log, curves and tb/ go)"""
    max_steps: int = 0
    """stop after this many optimizer steps in total (0 = run all epochs); for smoke tests and benchmarks"""
    time_limit: float = 0
    """end the run cleanly after this many seconds of training (evaluation excluded; 0 = no limit)"""
    knn_every: int = 1
    """run the weighted-kNN monitor on the labeled val split every N epochs (0 = off)"""
    knn_k: int = 200
    """neighbours in the kNN monitor (InstDisc protocol)"""
    knn_t: float = 0.1
    """temperature of the kNN vote"""
    seed: int = 0
    """random seed (each process adds its rank)"""
    log_every: int = 10
    """print and log every N steps"""
    save_every: int = 0
    """also save checkpoint.pth every N steps (0 = at the end of each epoch only)"""
    save_epochs: int = 1
    """save checkpoint.pth every N epochs and at the end (raise it when a save costs more than an epoch)"""
    synthetic_size: int = 2560
    """number of images in the synthetic train split (val split: a fifth of it)"""
    subset: int = 0
    """pretrain on N train images: seeded, class-balanced, nested (1k inside 2k); 0 = all"""
    corrupt: str = ""
    """corrupt each pretraining image once, deterministically: jpeg:Q, downsample:F, saltpepper:P, blur:S"""
    mix_fraction: float = 0.5
    """with --data A,B: the share of --subset drawn from A (without --subset both are used whole)"""


def parse_args(cls, presets, argv=None):
    """Dataclass -> argparse (_Parser). Precedence: explicit flag > preset > dataclass default. `presets`:
    {name: {field: value}}, or a function of the given flags ({field: value}) that returns it (eval_linear's
    table depends on --mode). The names of the flags given are in args.given (not a field)."""
    if callable(presets):  # a first parse, without --help, reads the flags the table depends on
        try:
            presets = presets(vars(_Parser(cls, {}, add_help=False).parse_known_args(argv)[0]))
        except BadInput:
            presets = presets({})  # the full parse below says what is wrong
    given = vars(_Parser(cls, presets).parse_args(argv))
    preset = given.get("preset", "auto")
    if preset == "auto":  # the rule --help's epilog states
        data = given.get("data", cls.data)
        preset = "cpu" if data == "synthetic" else "cifar" if data in ("cifar10", "cifar100") else "imagenet"
        if preset == "imagenet" and not torch.cuda.is_available():
            preset = "cpu"  # the imagenet recipe (ResNet-50, 224 px, batch 4096) does not fit a CPU
            if os.environ.get("RANK", "0") == "0":  # rank 0 says it once
                print(f"no GPU: --preset auto picked the cpu preset for --data {data} (a recipe sized for a "
                      "CPU); --preset imagenet forces the ImageNet recipe", flush=True)
    if preset not in presets:
        raise BadInput(f"unknown preset {preset!r}; choose from auto, {', '.join(presets)}")
    args = cls(**{**presets[preset], **given, "preset": preset})
    for name, allowed in CHOICES.items():  # one line naming the flag, before any work
        v = getattr(args, name, None)
        if v is None or v in allowed:
            continue
        if name != "arch":
            raise BadInput(f"unknown {name} {v!r}; choose from {', '.join(allowed)}")
        if v not in torchvision.models.list_models(module=torchvision.models):
            raise BadInput(f"unknown arch {v!r}; choose from {', '.join(allowed)} or a classification model "
                           f"of torchvision (list them: {LIST_ARCHS})")
    if given.get("stem") == "small" and not args.arch.startswith(RESNETS):
        raise BadInput(f"--stem small is a ResNet stem (resnet*, resnext*, wide_resnet*); --arch {args.arch} "
                       "keeps its own: drop --stem")
    parse_corruptions(args.corrupt)
    check_ranges(args)
    args.given = frozenset(given)
    return args


# -------- argument parsing, path checks

def user_errors(main):
    """Decorator for main(): BadInput (also when re-raised from a loader worker) -> 1 line, exit 2."""
    def wrapped(argv=None):
        STARTING.clear()
        try:
            out = main(argv)
            for run in STARTING:  # a run that wrote nothing on its way (eval_linear's knn and dense modes)
                run.start()
            return out
        except BadInput as e:  # from a loader worker: wrapped in its traceback, "common.BadInput: ..." last
            msg = str(e).strip().splitlines()[-1].split("BadInput: ")[-1]
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        except FloatingPointError as e:  # non-finite loss: stop, name the step and the last good checkpoint
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except Preempted as e:  # requeue and rerun the same command with --resume auto: no work is lost
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            sys.exit(PREEMPTED_EXIT)
        finally:
            STARTING.clear()
            release_output_dirs()  # a process that runs main() again (tests, notebooks) may reuse the folder
            restore_signal_handlers()
    return wrapped


@functools.lru_cache(maxsize=None)  # parsing the source costs ~0.5 s; a class's docs never change
def field_docs(cls):
    """The docstring under each dataclass field (read from the source, as tyro does)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            body = ast.parse(inspect.getsource(klass).lstrip()).body[0].body
        except (OSError, TypeError, SyntaxError):  # no source, or not Python's
            continue
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


class _Parser(argparse.ArgumentParser):
    """The flags of cls's fields, the method's own before CommonArgs'; one-line errors (BadInput)."""

    def __init__(self, cls, presets, add_help=True):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
        super().__init__(description=doc, argument_default=argparse.SUPPRESS, add_help=add_help, epilog=(
            "--preset auto picks cpu for --data synthetic, cifar for cifar10/cifar100 and imagenet otherwise "
            "(cpu on a machine without a GPU); explicit flags override the preset."))
        method = self.add_argument_group("method hyperparameters")
        plumbing = self.add_argument_group("data, run and plumbing (shared by every script)")
        docs = field_docs(cls)
        common_fields = {f.name for f in dataclasses.fields(CommonArgs)}
        choices = {**CHOICES, "preset": ("auto", *presets)}
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in common_fields):
            if f.name in getattr(cls, "not_flags", ()):  # shared fields that mean nothing to this script
                continue
            help_ = docs.get(f.name, "")
            if f.name in choices:
                help_ += f" {{{', '.join(choices[f.name])}}}"
            if f.name == "arch":
                help_ += f" or any classification model of torchvision (list them: {LIST_ARCHS})"
            here = " on this machine" if f.name == "workers" else ""  # default_workers(): the cores decide
            set_by = "".join(f"; {name}: {values[f.name]}" for name, values in presets.items()
                             if f.name in values)
            help_ += f" [default: {f.default}{here}{set_by}]"
            group = plumbing if f.name in common_fields else method
            flag = "--" + f.name.replace("_", "-")
            typ = {"bool": bool, "int": int, "float": float}.get(str(f.type), f.type)
            if typ is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
            else:
                typ = typ if typ in (int, float) else str
                group.add_argument(flag, type=typ, metavar=typ.__name__.upper(), help=help_)

    def error(self, message):  # one line, exit 2 (argparse would print the usage block first)
        raise BadInput(f"{message} (see --help)")


# listed in --help, checked after parsing (one-line errors); --arch takes any registry name too
CHOICES = {"arch": ("resnet18", "resnet50", "vit_small", "vit_base"), "stem": ("imagenet", "small"),
           "precision": ("auto", "fp32", "bf16", "fp16"), "optimizer": ("lars", "sgd", "adamw")}
LIST_ARCHS = ('python -c "import torchvision; '
              'print(torchvision.models.list_models(module=torchvision.models))"')


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag allows: lo <= v (lo < v with lo_excluded), v <= hi unless hi is None, or one
    of `also` (a documented special value, such as -1 = auto)."""
    lo: float
    hi: float = None
    lo_excluded: bool = False
    also: tuple = ()

    def __contains__(self, v):  # written so that NaN is never inside
        return v in self.also or ((v > self.lo if self.lo_excluded else v >= self.lo)
                                  and (self.hi is None or v <= self.hi))

    def __str__(self):
        text = f"> {self.lo}" if self.lo_excluded else f">= {self.lo}"
        text += f" and <= {self.hi}" if self.hi is not None else ""
        return text + "".join(f" (or {a})" for a in self.also)


POSITIVE = Range(0, lo_excluded=True)  # temperatures, LARS's trust coefficient


# the ranges of the flags every script has (CommonArgs' and the recipe flags each Args declares); a method's
# own flags have theirs in a RANGES dict of Ranges in its Args or a base's, which check_ranges adds (and win)
RANGES = {"batch_size": Range(1), "img_size": Range(1), "epochs": Range(0), "workers": Range(0),
          "max_steps": Range(0), "knn_every": Range(0), "knn_k": Range(1), "knn_t": POSITIVE,
          "log_every": Range(1), "save_every": Range(0), "save_epochs": Range(1), "synthetic_size": Range(1),
          "store_size": Range(0), "time_limit": Range(0), "subset": Range(0), "mix_fraction": Range(0, 1),
          "lr": Range(0), "wd": Range(0), "warmup_epochs": Range(0)}


def check_ranges(args):
    """Every numeric flag in its range (NaN never is), before any work."""
    ranges = dict(RANGES)
    for klass in reversed(type(args).__mro__):
        ranges.update(vars(klass).get("RANGES", {}))
    for name, allowed in ranges.items():
        v = getattr(args, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in allowed:
            raise BadInput(f"--{name.replace('_', '-')} {v} is out of range: it must be {allowed}")


def check_paths(args):
    """Path flags of the right kind, before any work (a folder that cannot be created for another reason, such
    as /proc/x, is refused when setup creates it, before any write)."""
    if args.output_dir:
        check_output_dir("--output-dir", args.output_dir)
    if args.overwrite and args.resume:
        raise BadInput("--overwrite starts the run in --output-dir over: it cannot be combined with --resume")
    if args.resume not in ("", "auto") and not os.path.isfile(args.resume):
        raise BadInput(f"--resume {args.resume}: no such checkpoint file "
                       "(use auto, a checkpoint.pth path or nothing)")
    for name in args.data.split(","):
        if name not in BUILTIN_DATA and not os.path.isdir(name):
            problem = f"--data {name} is a file, not a folder" if os.path.exists(name) else \
                f"--data: data path not found: {name}"
            raise BadInput(f"{problem} (use {', '.join(BUILTIN_DATA)} or an image folder)")
    if os.path.exists(args.data_root) and not os.path.isdir(args.data_root):
        raise BadInput(f"--data-root {args.data_root} exists and is not a folder")


def check_output_dir(flag, path):
    """A folder the run writes into: an existing folder, or a path whose nearest existing parent is one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"{flag} {path} exists and is not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BadInput(f"{flag} {path} cannot be created: {parent} is a file, not a folder")


def check_output_file(flag, path, output_dir):
    """A file the run writes (a picture): in an existing folder, or --output-dir (setup creates only that)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BadInput(f"{flag} {path} is a folder; give the path of a file to write")
    if folder == os.path.abspath(output_dir) and not os.path.exists(folder):
        return  # setup checks and creates it
    if not os.path.isdir(folder):
        raise BadInput(f"{flag} {path}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BadInput(f"{flag} {path}: its folder {folder} is not writable")


def check_not_overwriting(args, method, checkpoint):
    """A run replaces another run's checkpoint.pth or backbone.pth only when asked (--resume, --overwrite)."""
    out = args.output_dir
    found = [f for f in ("checkpoint.pth", "backbone.pth") if os.path.isfile(os.path.join(out, f))]
    own = os.path.join(out, "checkpoint.pth")
    continues = checkpoint is not None and os.path.isfile(own) and os.path.samefile(checkpoint[0], own)
    if not found or continues or args.overwrite:
        return
    held = " and ".join(found)
    if method.startswith("eval_"):  # an evaluation would replace the training run's args.json and log.jsonl
        raise BadInput(f"--output-dir {out} holds a training run ({held}): use another --output-dir, or "
                       "--overwrite to delete that run's outputs")
    if args.resume not in ("", "auto"):
        raise BadInput(f"--output-dir {out} holds another run ({held}), which a run resumed from "
                       f"{args.resume} would replace: use another --output-dir")
    how = "continue it with --resume auto, " if "checkpoint.pth" in found else ""
    raise BadInput(f"--output-dir {out} holds a run ({held}): {how}use another --output-dir, or --overwrite "
                   "to start over there")


# ============================================================================ run setup

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_nograd(x):
    """Concatenate x [n, ...] from every rank in rank order -> [world * n, ...]; x itself if alone."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@dataclasses.dataclass
class Run:
    """What a training process knows about itself."""
    args: object
    method: str
    rank: int
    world: int
    device: torch.device
    out: str
    checkpoint: tuple = None  # (path, contents) of the --resume checkpoint, read and checked by setup
    held_train: object = None  # --data-on-device: the whole train split as pretraining decoded it (kNN bank)
    data_id: str = None  # the training data's size and fingerprint (pretrain_data): a checkpoint records it
    good: tuple = None  # (path, step) of the last checkpoint this run wrote or resumed from (the NaN stop's)
    pending: bool = False  # set up, nothing written yet: start() locks the folder and writes args.json
    stamp: tuple = None  # checkpoint_stamp when setup read the --resume file

    @property
    def main(self):
        return self.rank == 0

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def scalar(self, v):
        """A per-step number (the EMA coefficient) as a 0-d tensor on the device. A compiled model guards
        on the value of a Python float and would recompile every step; a fill kernel, no host sync."""
        return torch.full((), float(v), device=self.device)

    def to_device(self, x):
        layout = torch.channels_last if self.args.channels_last and x.ndim == 4 else torch.preserve_format
        return x.to(self.device, non_blocking=True, memory_format=layout)

    def start(self):
        """The run's first write, once every check has passed (start_run, under "run lock")."""
        start_run(self)


def setup(args, method):
    """torchrun-native setup: every check that needs no data, device, process group (when WORLD_SIZE > 1),
    seeds; the --resume checkpoint read and checked. Nothing is written: the folder, its lock and args.json
    come with the run's first write (Run.start, from the Logger), once data, model and state have passed."""
    check_paths(args)
    check_input(args.arch, args.img_size, args.img_size, "--img-size")  # e.g. a ViT size off its patch grid
    args.output_dir = args.output_dir or os.path.join("runs", method)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if args.batch_size % world:
        raise BadInput(f"global --batch-size {args.batch_size} is not divisible by the world size {world}")
    if args.batch_size // world < 2 and not method.startswith("eval_"):  # BatchNorm's statistics need 2
        raise BadInput(f"--batch-size {args.batch_size} gives {args.batch_size // world} image per process; "
                       "training needs at least 2 (BatchNorm, and the loss's negatives)")
    device = pick_device(args, local_rank)  # and --precision auto -> bf16 on CUDA, fp32 on a CPU
    refused = lock_output_dir(args.output_dir, create=False) if rank == 0 else None  # an existing .lock only
    if world > 1 and not dist.is_initialized():  # one process group serves every run of this process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    agree_on_lock(refused, world)  # BadInput on every rank when rank 0 was refused
    stamp = checkpoint_stamp(args)
    checkpoint = find_checkpoint(args, method)  # BadInput unless its method and the flags of a step match
    check_not_overwriting(args, method, checkpoint)
    catch_stop_signals()
    seed_everything(args.seed + rank)
    run = Run(args, method, rank, world, device, args.output_dir, checkpoint, pending=True, stamp=stamp)
    STARTING.append(run)
    return run


def prepare_model(model, run, sync_bn):
    """SyncBN (see use_sync_bn), device, layout, compile, DDP. `sync_bn` is the method's own choice.
    Returns (model, step_model): keep `model` for state_dicts and use `step_model` for forward passes."""
    if use_sync_bn(sync_bn, run):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(run.device, memory_format=torch.channels_last if run.args.channels_last else None)
    step_model = model
    if run.world > 1:
        device_ids = [run.device] if run.device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if run.args.compile:
        step_model.compile()  # in place: state_dict keys keep their names
    return model, step_model


# -------- device; run lock: one run per output folder

def use_sync_bn(sync_bn, run):
    """SyncBN only where the method's official code uses it, and only on multi-GPU CUDA runs
    (PyTorch's SyncBatchNorm is CUDA-only: CPU/gloo runs keep per-process BN)."""
    return sync_bn and run.world > 1 and run.device.type == "cuda"


def pick_device(args, local_rank):
    cuda = torch.cuda.is_available()
    if args.precision == "auto":
        args.precision = "bf16" if cuda else "fp32"
    if args.precision == "fp16" and not cuda:  # measured: about 11x slower than fp32 on a CPU
        raise BadInput("--precision fp16 needs a CUDA GPU: a CPU emulates it, many times slower than fp32 "
                       "(use fp32, the CPU default, or bf16)")
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


try:
    import fcntl
except ImportError:  # Windows: no fcntl, so no lock (keep two runs off one folder by hand there)
    fcntl = None

LOCKS = {}  # real path of an output folder -> the open <folder>/.lock file this process holds the lock with
STARTING = []  # the Runs setup made in this main() that have written nothing yet (user_errors starts them)


def start_run(run):
    """Run.start, from the Logger (or user_errors for a run that logs nothing): lock and create the folder
    (rank 0; every rank stops if another run holds it), --overwrite's deletions, args.json. A no-op once done,
    or for a Run not made by setup."""
    if not run.pending:
        return
    run.pending = False
    agree_on_lock(lock_output_dir(run.out) if run.main else None, run.world)
    if checkpoint_stamp(run.args) != run.stamp:  # written meanwhile by a run that held no lock on it
        path = os.path.join(run.out, "checkpoint.pth") if run.args.resume == "auto" else run.args.resume
        raise BadInput(f"{path} changed while this run started; run the command again")
    if run.main:
        if run.args.overwrite:  # every check has passed: the outputs of the run there go
            for name in ("checkpoint.pth", "backbone.pth", "log.jsonl", "curves.png", "tb"):
                path = os.path.join(run.out, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        record = {**dataclasses.asdict(run.args), "method": run.method, "world_size": run.world,
                  "git_sha": git_sha(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "device": str(run.device)}
        with atomic_path(os.path.join(run.out, "args.json")) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=2)


def lock_output_dir(out, create=True):
    """Lock out/.lock for this process alone: None, or the one-line reason it cannot (another run holds it, or
    the folder cannot be created). `create`: make folder and file if needed and, once locked, write this pid
    and host there (the run's first write; the other run's message names them); else (setup, which writes
    nothing) lock an existing out/.lock only. The OS drops a flock when its holder dies, even by kill -9."""
    path, real = os.path.join(out, ".lock"), os.path.realpath(out)
    f = LOCKS.get(real)  # locked already by setup, or by an earlier run in this process
    try:
        if create:
            os.makedirs(out, exist_ok=True)  # no fcntl (Windows): no lock, the folder all the same
        if f is None and fcntl is not None and (create or os.path.isfile(path)):
            f = os.fdopen(os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644), "r+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = lock_holder(f.read())
                f.close()
                return (f"--output-dir {out} is in use by another run ({holder}); wait for it or use another "
                        "folder")
            LOCKS[real] = f
        if create and f is not None:
            f.seek(0)
            f.truncate(0)
            print(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), file=f, flush=True)
    except OSError as e:
        return f"--output-dir {out} cannot be created or written: {e.strerror}" if create else None


def lock_holder(text):
    """'pid P on HOST' from a .lock file's text. A holder that has not written yet (setup locks the file of an
    earlier run and writes at its first write) leaves that run's pid, gone on this host."""
    try:
        holder = json.loads(text)
        pid, host = int(holder["pid"]), str(holder["host"])
        if host == socket.gethostname():
            os.kill(pid, 0)  # ProcessLookupError: the pid of an earlier run, not of the holder
    except PermissionError:  # alive, another user's
        pass
    except (ValueError, KeyError, TypeError, OverflowError, ProcessLookupError):
        return "pid and host not written yet"  # it has just taken the lock
    return f"pid {pid} on {host}"


def agree_on_lock(refused, world):
    """BadInput on every rank when rank 0 could not lock the folder (`refused`: its lock_output_dir answer,
    got before joining the process group, so no rank waits on a refused one), in one collective all reach."""
    if world > 1:
        answer = [refused]
        dist.broadcast_object_list(answer, src=0)
        refused = answer[0]
    if refused:
        raise BadInput(refused)


def release_output_dirs(unlock=True):
    """Unlock every output folder this process holds (a script's main() ends: the next run may take it).
    unlock=False: a forked child (a loader worker) only closes its copies of the lock files, so a worker that
    outlives a killed parent by a few seconds does not keep the folder locked."""
    for f in LOCKS.values():
        if unlock:
            fcntl.flock(f, fcntl.LOCK_UN)  # through any copy of the file: a forked child's too
        f.close()
    LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=functools.partial(release_output_dirs, unlock=False))


# -------- preemption signals

PREEMPTED_EXIT = 3  # exit code of a run stopped by SIGTERM/SIGUSR1 after writing checkpoint.pth


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived: the current step was finished and checkpoint.pth written."""


STOP_SIGNAL = [None]  # name of the preemption signal received, set by the handler below
STOP_AT_STEP = [False]  # a Ctrl-C waits for the end of the step (True from resume(): the training loop next)
INTERRUPTS = [0, -math.inf]  # Ctrl-Cs received (the second exits at once) and when the last one came
# torchrun's agent forwards the Ctrl-C its workers already got from the terminal (the process group), a few ms
# later: under torchrun a second SIGINT this soon after the first is that same Ctrl-C
TORCHRUN_ECHO_S = 1.0
INTERRUPTED_EXIT = 130  # exit code of a run a Ctrl-C ended at once: 128 + SIGINT, as a shell reports it
SAVED_HANDLERS = {}  # signal -> the handler before catch_stop_signals, put back when main() ends


def _say(text):
    """One line on stderr from a signal handler, rank 0 only (os.write: print may re-enter a cut write)."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, (text + "\n").encode())


def _on_stop_signal(signum, frame):
    if signum == signal.SIGINT:
        now = time.monotonic()
        if "TORCHELASTIC_RUN_ID" in os.environ and now - INTERRUPTS[1] < TORCHRUN_ECHO_S:
            return
        INTERRUPTS[0], INTERRUPTS[1] = INTERRUPTS[0] + 1, now
        if not STOP_AT_STEP[0] or INTERRUPTS[0] > 1:  # nothing to save yet, or a second Ctrl-C
            _say("interrupted: exiting at once" + (", losing the steps since the last checkpoint"
                                                     if STOP_AT_STEP[0] else ""))
            raise SystemExit(INTERRUPTED_EXIT)
        _say("interrupted: finishing this step, then writing checkpoint.pth (Ctrl-C again to exit at once)")
    STOP_SIGNAL[0] = STOP_SIGNAL[0] or signal.Signals(signum).name  # acted on after the step (stop_requested)


def catch_stop_signals():
    """SIGTERM (torchrun, Kubernetes, `kill`), SIGUSR1 (SLURM's `--signal`), SIGINT (Ctrl-C): finish the step,
    write checkpoint.pth, exit PREEMPTED_EXIT; a Ctrl-C before the training loop, or a second, exits now."""
    STOP_SIGNAL[0], STOP_AT_STEP[0], INTERRUPTS[:] = None, False, [0, -math.inf]
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        SAVED_HANDLERS.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, _on_stop_signal)


def restore_signal_handlers():
    """The handlers from before catch_stop_signals (main() has ended: a notebook's or pytest's Ctrl-C)."""
    for sig, handler in SAVED_HANDLERS.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    SAVED_HANDLERS.clear()


def ignore_interrupts(worker_id=None):
    """A loader worker's init: the stop signals are the main process's. A terminal's Ctrl-C, torchrun's
    SIGTERM (os.killpg) and SLURM's reach the whole process group; a worker they killed would end the run
    with a traceback before the step's checkpoint. The loader still ends its workers when it is done."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def end_loader_workers():
    """At exit, before multiprocessing's handler (atexit runs the last registered first), which would SIGTERM
    the daemonic children and wait for them: loader workers ignore SIGTERM, so a loader still alive at exit
    (its iterator held by a traceback) would hang the exit. SIGKILL them; DataLoader's SIGCHLD handler would
    report that as a failed worker, so it goes first."""
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


atexit.register(end_loader_workers)


def stop_requested(run, step):
    """True once SIGTERM/SIGUSR1 has arrived, on every rank at the same step: checked every step alone, every
    --log-every steps distributed (one all_reduce; it waits for the step's kernels, as the log line does)."""
    if run.world == 1:
        return STOP_SIGNAL[0] is not None
    if step % run.args.log_every:
        return False
    flag = torch.tensor(float(STOP_SIGNAL[0] is not None), device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


# ============================================================================ data

BUILTIN_DATA = ("synthetic", "cifar10", "cifar100", "stl10")


def load_dataset(args, split, name=None):
    """Base dataset of (PIL image, label) for split 'train' or 'val' (None if there is no such split).
    Label -1 means unlabeled. With --data A,B the val split is A's."""
    name = name or args.data.split(",")[0]
    if name == "synthetic":
        size = args.synthetic_size if split == "train" else max(args.synthetic_size // 5, 10)  # val: a fifth
        return Synthetic(size, split, args.seed)
    if name not in BUILTIN_DATA:
        return load_folder(name, split)
    try:  # CIFAR-10/100 or STL-10 from torchvision, downloaded into --data-root (STL-10's val: its test set)
        if name == "stl10":
            return datasets.STL10(args.data_root, split=split if split == "train" else "test", download=True)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(args.data_root, train=split == "train", download=True)
    except Exception as e:
        raise BadInput(f"cannot load {name} into {args.data_root}: {e}") from None


class Views(torch.utils.data.Dataset):
    """Applies `transform` to base[i] under torch's global RNG, forked and seeded by (seed, epoch, i): a
    sample gets the same augmentation whatever worker loads it and after a resume (reproducible on CPU)."""
    def __init__(self, base, transform, seed=0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)  # primes: triples apart
            return self.transform(img), label


def pretrain_data(args, run, transform, ids=None):
    """The pretraining dataset (train split with `transform`) and steps per epoch. With --data-on-device the
    split is decoded once into the device's memory (held_split) and `transform` runs in its finish() there;
    `ids`: a method's mask function (PIL image -> ids [H, W]), run once on each stored image (DetCon's)."""
    base = pretrain_base(args)
    run.data_id = base.data_id  # a checkpoint records it; a resume on other data is refused (resume)
    if args.data_on_device:
        ds = held_split(args, run, base, copies=2, ids=ids)
        if not (args.subset or args.corrupt or "," in args.data):  # the whole, clean train split
            run.held_train = ds
    else:
        ds = Views(base, transform, args.seed)
    return ds, full_batches(ds, args.batch_size)


def full_batches(ds, batch_size):
    """Steps per epoch (the last partial batch is dropped); BadInput for a data set under one batch."""
    if len(ds) < batch_size:
        raise BadInput(f"--batch-size {batch_size} is larger than the dataset ({len(ds)} images)")
    return len(ds) // batch_size


def epoch_loader(ds, run, epoch, skip_batches=0, shuffle=True, drop_last=True):
    """This rank's loader for one epoch, starting `skip_batches` batches in (mid-epoch resume)."""
    local_bs = run.args.batch_size // run.world
    sampler = torch.utils.data.DistributedSampler(ds, run.world, run.rank, shuffle, run.args.seed, drop_last)
    sampler.set_epoch(epoch)
    ds.epoch = epoch
    indices = list(sampler)[skip_batches * local_bs:]
    if isinstance(ds, HeldSplit):  # --data-on-device: the same order, batches indexed on the device
        return ds.batches(indices, local_bs, drop_last)
    return torch.utils.data.DataLoader(  # its own generator keeps the global RNG untouched
        ds, local_bs, sampler=indices, drop_last=drop_last, pin_memory=run.device.type == "cuda",
        num_workers=run.args.workers, prefetch_factor=4 if run.args.workers else None,
        generator=torch.Generator().manual_seed(run.args.seed + epoch), worker_init_fn=ignore_interrupts)


# -------- the built-in data: synthetic scenes

SHAPES = ("disk", "ring", "square", "frame", "triangle", "plus", "star", "crescent", "bar", "ell")
SYNTH_PX = 64  # native size of synthetic images: room for a main shape and a few small ones, cheap to draw
# Colour is no image ID: a per-image colour (of background or shapes) survives two crops and colour jitter, so
# contrastive learning would separate images by it (kNN accuracy below random init). Here all images share one
# grey background and near-white shapes: only the shapes' form tells images, and classes, apart.
BACKGROUND = 0.45  # grey level of the background, the same in every image
NOISE = 0.04  # sensor-like noise std on every pixel, so flat regions are never exactly equal
MAIN_AREA = (0.12, 0.2)  # area of the main shape (the label), as a fraction of the image
DISTRACTOR_AREA = (0.01, 0.03)  # area of each distractor: always well below the main shape's
DISTRACTORS = (1, 3)  # number of distractor shapes (random classes), inclusive range
OCCLUDE = 0.3  # probability that a distractor is drawn over the main shape instead of under it


def _shape_mask(k, u, v):
    """Boolean mask of shape k in local coordinates (u, v), unit radius (every shape fits the unit disk)."""
    r, au, av = np.hypot(u, v), np.abs(u), np.abs(v)
    m = np.maximum(au, av)
    masks = {
        "disk": lambda: r < 1,
        "ring": lambda: (r < 1) & (r > 0.55),
        "square": lambda: m < 0.8,
        "frame": lambda: (m < 0.9) & (m > 0.5),
        "triangle": lambda: (v > -0.6) & (v < 0.95 - 1.6 * au),
        "plus": lambda: ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95)),
        "star": lambda: r < 0.45 + 0.55 * (0.5 + 0.5 * np.cos(5 * np.arctan2(v, u))) ** 2,
        "crescent": lambda: (r < 1) & (np.hypot(u - 0.5, v) > 0.75),
        "bar": lambda: (au < 1) & (av < 0.3),
        "ell": lambda: (((u > -0.9) & (u < -0.35) & (av < 0.9))
                        | ((u > -0.9) & (u < 0.9) & (v > 0.35) & (v < 0.9))),
    }
    return masks[SHAPES[k]]()


_GRID = (np.arange(200) + 0.5) / 200 * 2 - 1  # pixel centres of a 200 x 200 grid on [-1, 1]^2
# each shape's area at unit radius, measured on that grid (the square has area 4): a bar covers ~0.4 of a
# disk, and shapes are sized by area, so size tells no class
SHAPE_AREAS = np.array([_shape_mask(k, *np.meshgrid(_GRID, _GRID)).mean() * 4 for k in range(len(SHAPES))])


def render_synthetic(seed, index, px=SYNTH_PX):
    """One deterministic image: a main shape (the label, index % 10) among much smaller distractors of random
    classes, each at a random position, area, small rotation and faint tint. Returns (PIL image, label,
    per-pixel labels [px, px] uint8: 0 background, class + 1 under each shape, later shapes on top)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(SHAPES)  # balanced classes
    img = np.full((px, px, 3), BACKGROUND)  # [px, px, 3]

    def shape(k, areas, spread):  # (class, area, centre, rotation, near-white colour with a faint tint)
        return (k, rng.uniform(*areas), rng.uniform(-spread, spread, 2), rng.uniform(-0.5, 0.5),
                np.clip(0.95 + rng.uniform(-0.04, 0.04, 3), 0, 1))
    distractors = [shape(int(rng.integers(len(SHAPES))), DISTRACTOR_AREA, 0.8)
                   for _ in range(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))]
    main = shape(label, MAIN_AREA, 0.2)  # near the centre: the eval transform's centre crop keeps it
    under = int(rng.binomial(len(distractors), 1 - OCCLUDE))  # distractors drawn before (under) the main
    seg = np.zeros((px, px), np.uint8)  # [px, px]
    coords = (np.arange(px) + 0.5) / px * 2 - 1  # pixel centres in [-1, 1]
    for k, area, centre, angle, rgb in distractors[:under] + [main] + distractors[under:]:
        # paint shape k (area: a fraction of the image; centre in [-1, 1]^2; rotation in rad) into img, k + 1
        # into seg; only the shape's bounding box, centre +- radius, is evaluated
        radius = math.sqrt(area * 4 / SHAPE_AREAS[k])
        lo = np.clip(((centre - radius + 1) * px / 2).astype(int), 0, px)  # [2] (x, y) first pixel of the box
        hi = np.clip(((centre + radius + 1) * px / 2).astype(int) + 2, 0, px)  # [2] one past the last
        x = coords[None, lo[0]:hi[0]] - centre[0]  # [1, w]
        y = coords[lo[1]:hi[1], None] - centre[1]  # [h, 1]
        u = (x * math.cos(angle) + y * math.sin(angle)) / radius  # [h, w] local coordinates, unit radius
        v = (-x * math.sin(angle) + y * math.cos(angle)) / radius  # [h, w]
        inside = _shape_mask(k, u, v)  # [h, w]
        img[lo[1]:hi[1], lo[0]:hi[0]][inside] = rgb
        seg[lo[1]:hi[1], lo[0]:hi[0]][inside] = k + 1
    img = img + rng.normal(0, NOISE, img.shape)  # [px, px, 3]
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)), label, seg


class Synthetic(torch.utils.data.Dataset):
    """Built-in procedural dataset: deterministic, labeled (class = main shape), multi-object."""
    classes = SHAPES

    def __init__(self, size, split="train", seed=0):
        self.size, self.seed = size, seed + (0 if split == "train" else 10_000)  # disjoint val images
        self.targets = [i % len(SHAPES) for i in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return render_synthetic(self.seed, i)[:2]

    def segmentation(self, i):
        """(PIL image, PIL "L" mask of per-pixel labels: 0 background, class + 1 under each shape)."""
        img, _, seg = render_synthetic(self.seed, i)
        return img, Image.fromarray(seg)  # uint8 -> mode "L"


# -------- image files

IMG_EXT = datasets.folder.IMG_EXTENSIONS  # the extensions torchvision's ImageFolder reads


def load_image(path):
    """PIL RGB image; an unreadable file is a BadInput naming it."""
    try:
        return datasets.folder.pil_loader(path)
    except Exception as e:
        raise BadInput(f"cannot read image {path}: {e}") from None


def load_folder(name, split):
    """An image folder: ImageFolder (class subfolders) or FlatFolder (unlabeled); `train/` and `val/`
    subfolders are the splits when present, else the folder is the train split and there is no val (None).
    BadInput, naming the folder of its images, for a segmentation data set (eval_linear.py's dense modes):
    its masks (images/ + masks/), or a PASCAL VOC root's label PNGs and lists, would be read as classes."""
    if not os.path.isdir(name):
        raise BadInput(f"data path not found: {name} (use {', '.join(BUILTIN_DATA)} or an image folder)")
    root = os.path.join(name, split) if os.path.isdir(os.path.join(name, "train")) else name
    if not os.path.isdir(root) or (root == name and split != "train"):
        return None  # no such split (a folder without train/ has no val)
    expect = "a training script expects a folder of images, in class subfolders or flat"
    if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "masks")):
        raise BadInput(f"--data {name} is a segmentation folder ({root} holds images/ and masks/, for "
                       f"eval_linear.py --mode seg or seg-knn); {expect}: give --data "
                       f"{os.path.join(root, 'images')} to pretrain on its images")
    for pattern in ("JPEGImages", "VOC*/JPEGImages", "VOCdevkit/VOC*/JPEGImages"):
        for images in sorted(glob.glob(os.path.join(glob.escape(name), pattern)))[::-1]:  # VOC2012 first
            if any(os.path.isdir(os.path.join(images, os.pardir, d))
                   for d in ("SegmentationClass", "ImageSets", "Annotations")):
                raise BadInput(f"--data {name} is a PASCAL VOC folder (for eval_linear.py --mode seg or "
                               f"seg-knn); {expect}: give --data {os.path.normpath(images)} to pretrain on "
                               "its images")
    if not any(os.path.isdir(os.path.join(root, d)) for d in os.listdir(root)):
        return FlatFolder(root)
    try:
        ds = datasets.ImageFolder(root, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise BadInput(f"no images found in {root}: {str(e).splitlines()[0]}") from None
    if split != "val":
        return ds
    try:  # ImageFolder numbers a split's own class folders: a val label must be train's number of its class
        train = datasets.folder.find_classes(os.path.join(name, "train"))[1]  # {class: index}
    except FileNotFoundError:  # a flat train/ (unlabeled): nothing to match
        return ds
    extra = sorted(set(ds.classes) - set(train))
    if extra:
        raise BadInput(f"--data {name}: val/ has class folders that train/ has not ({', '.join(extra[:5])}); "
                       "a val label must be one of train's classes")
    ds.samples = ds.imgs = [(path, train[ds.classes[y]]) for path, y in ds.samples]
    ds.targets, ds.classes, ds.class_to_idx = [y for _, y in ds.samples], list(train), train
    return ds


class FlatFolder(torch.utils.data.Dataset):
    """A folder of images without class subfolders: unlabeled (label -1)."""
    def __init__(self, root):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMG_EXT))
        if not self.files:
            raise BadInput(f"no images found in {root}")
        self.targets = [-1] * len(self.files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i]), -1


# -------- data-study knobs: --subset, --corrupt, --data A,B

def pretrain_base(args):
    """The pretraining images: the train split of --data (A,B mixes two domains), then --subset, --corrupt."""
    names, parts, offset, ids = args.data.split(","), [], 0, []
    shares = [args.subset] if len(names) == 1 else [round(args.subset * args.mix_fraction)] * 2
    shares[-1] = args.subset - sum(shares[:-1])
    for name, share in zip(names, shares):
        ds = load_dataset(args, "train", name)
        ids.append(data_id(name, ds))
        if share > len(ds):
            raise BadInput(f"--subset asks for {share} images of {name}, which has {len(ds)}")
        order = balanced_order(labels_of(ds), args.seed)[:share] if args.subset else range(len(ds))
        parts.append(Subset(ds, sorted(order), offset))
        offset += num_classes(ds) if min(labels_of(ds)) >= 0 else 0
    base = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    base.targets = [t for p in parts for t in p.targets]
    base = Corrupted(base, parse_corruptions(args.corrupt), args.seed) if args.corrupt else base
    base.data_id = "; ".join(ids)  # --subset, --corrupt and --mix-fraction are flags: find_checkpoint's
    return base


def data_id(name, ds):
    """What a checkpoint records of one training set: its size, a fingerprint of its labels and, for a folder,
    its file names relative to --data (a copy of the folder elsewhere is the same data)."""
    h = hashlib.sha1(np.asarray(labels_of(ds), dtype=np.int64).tobytes())
    files = [p for p, _ in ds.samples] if hasattr(ds, "samples") else getattr(ds, "files", None)
    prefix = os.path.join(name, "")  # every file path starts with it: cut (os.path.relpath: ~10 us a file)
    h.update("\0".join(f[len(prefix):] if f.startswith(prefix) else f for f in files or [name]).encode())
    return f"{len(ds)} images (fingerprint {h.hexdigest()[:10]})"


class Subset(torch.utils.data.Dataset):
    """base restricted to `indices`, labels shifted by `offset` (to keep two domains' classes apart)."""
    def __init__(self, base, indices, offset=0):
        self.base, self.indices, labels = base, list(indices), labels_of(base)
        self.targets = [labels[i] + offset if labels[i] >= 0 else -1 for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]][0], self.targets[i]


def balanced_order(labels, seed):
    """Seeded order of indices, round-robin over classes: every prefix is class-balanced and contains
    every shorter prefix, so `order[:n]` gives nested subsets."""
    rng, labels = np.random.default_rng(seed), np.asarray(labels)
    perms = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return [int(p[r]) for r in range(max(map(len, perms))) for p in perms if r < len(p)]


CORRUPTIONS = {"jpeg": lambda q: q == int(q) and 1 <= q <= 100, "downsample": lambda f: f >= 1,
               "saltpepper": lambda p: 0 <= p <= 1, "blur": lambda s: s > 0}


def parse_corruptions(spec):
    """'jpeg:10,blur:2' -> [('jpeg', 10.0), ('blur', 2.0)]; BadInput on an unknown name or bad value."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition(":")
        try:
            if not (name in CORRUPTIONS and CORRUPTIONS[name](float(value))):
                raise ValueError
        except ValueError:
            raise BadInput(f"bad --corrupt spec {item!r}: use jpeg:Q (1-100), downsample:F (>= 1), "
                           f"saltpepper:P (0-1) or blur:S (> 0)") from None
        out.append((name, float(value)))
    return out


def corrupt_image(img, specs, rng):
    """Apply the corruptions in order (the study's JPEG, resolution, salt-and-pepper and blur lenses)."""
    for name, v in specs:
        if name == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(v))
            img = Image.open(buf).convert("RGB")
        elif name == "downsample":  # down by F, back up bilinear: lower resolution at the same size
            small = tuple(max(1, round(side / v)) for side in img.size)
            img = img.resize(small, Image.BILINEAR).resize(img.size, Image.BILINEAR)
        elif name == "saltpepper":
            a, u = np.array(img), rng.random(img.size[::-1])  # u: [H, W]
            a[u < v / 2], a[(u >= v / 2) & (u < v)] = 0, 255
            img = Image.fromarray(a)
        else:
            img = img.filter(ImageFilter.GaussianBlur(v))
    return img


class Corrupted(torch.utils.data.Dataset):
    """Corrupts base[i] with an RNG seeded by (seed, i): the same stored image every epoch and worker."""
    def __init__(self, base, specs, seed=0):
        self.base, self.specs, self.seed, self.targets = base, specs, seed, labels_of(base)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return corrupt_image(img, self.specs, np.random.default_rng([self.seed, i])), label


# ============================================================================ augmentations

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics
JITTER_P, GRAY_P = 0.8, 0.2  # SimCLR / MoCo v2 / BYOL: colour jitter with p 0.8, grayscale with p 0.2
BLUR_SIGMA = (0.1, 2.0)  # blur sigma range in pixels, as the official MoCo / BYOL code
SOLARIZE_AT = 128  # solarize inverts the pixels >= 128 of 255 (PIL's ImageOps.solarize default, BYOL)


class RandomBlur:
    """PIL's Gaussian blur of radius sigma ~ U(0.1, 2) (MoCo/BYOL's code), drawn by torch's seeded RNG."""
    def __init__(self, sigma=BLUR_SIGMA):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(*self.sigma))))

    def __repr__(self):
        return f"RandomBlur(sigma={self.sigma})"


class TwoViews:
    """img -> (view 1, view 2), each a method's list of torchvision transforms (PIL -> normalised [3, H, W]).
    With gpu (--gpu-aug) the workers crop and flip, finish() does the rest (its Photometric) on the device."""
    def __init__(self, augmentation1, augmentation2, gpu=False):
        (size, crop_min, r1), (size2, crop_min2, r2) = map(device_recipe, (augmentation1, augmentation2))
        if (size, crop_min) != (size2, crop_min2):
            raise ValueError("the device path crops both views alike: give them one RandomResizedCrop")
        self.on_device = (size, crop_min, (r1, r2))  # what finish() runs with --data-on-device
        self.photometric = (r1, r2) if gpu else None  # what finish() runs with --gpu-aug
        if gpu:  # -> uint8 [3, size, size], drawn as the PIL path draws (the flip commutes with the colour);
            # resized on the tensor: antialiased bilinear, within 1 grey level of PIL's, and cheaper
            crop = v2.RandomResizedCrop(size, scale=(crop_min, 1.0), antialias=True)
            self.t1 = self.t2 = v2.Compose([v2.PILToTensor(), crop, v2.RandomHorizontalFlip()])
        else:
            self.t1, self.t2 = T.Compose(augmentation1), T.Compose(augmentation2)

    def __call__(self, img):
        return self.t1(img), self.t2(img)

    def finish(self, run, x1, x2, step):
        """x1, x2 [n, 3, H, W] from the loader (--data-on-device: the stored images) -> the model's inputs
        on the device. `step` (optimizer steps before this batch) seeds the device draws (same on resume)."""
        if run.args.data_on_device:
            return device_views(run, x1, step, *self.on_device)
        if self.photometric is None:
            return run.to_device(x1), run.to_device(x2)
        gen = device_generator(run, step)
        return tuple(device_view(run, x, recipe, gen) for x, recipe in zip((x1, x2), self.photometric))


def eval_transform(img_size):
    """Resize to 256/224 of the crop, center crop (the standard evaluation transform)."""
    resize = round(img_size * 256 / 224)
    return T.Compose([T.Resize(resize), T.CenterCrop(img_size), T.ToTensor(), T.Normalize(MEAN, STD)])


# -------- --gpu-aug: the photometric ops on the device

# --gpu-aug: every op takes a batch x [N, 3, H, W] float in [0, 1] and per-sample parameters [N], and follows
# torchvision's tensor formulas (torchvision.transforms.functional); parameters are drawn per sample, never
# one per batch (torchvision v2 on a batch and kornia's defaults share one draw across the batch).

@dataclasses.dataclass(frozen=True)
class Photometric:
    """What the device runs for one view's photometric ops (device_recipe reads it off the view's list)."""
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue strengths (ColorJitter's)
    blur_p: float = 1.0
    solarize_p: float = 0.0


def device_recipe(ops):
    """A view's transforms in the PIL path's order ([crop], jitter, grayscale, blur, [solarize], [flip],
    ToTensor, Normalize) -> (crop size, crop scale's lower bound, Photometric); size and scale None without
    a crop (DetCon crops image and mask itself). ValueError for a list the device would not reproduce."""
    def is_(i, cls, inner=None):
        op = ops[i] if i < len(ops) else None
        return isinstance(op, cls) and (inner is None or isinstance(op.transforms[0], inner))
    crop = ops[0] if is_(0, T.RandomResizedCrop) else None
    if crop and (crop.scale[1] != 1.0 or crop.ratio != (3 / 4, 4 / 3) or crop.size[0] != crop.size[1]):
        raise ValueError(f"the device path crops squares, scale (s, 1), ratio (3/4, 4/3), not {crop}")
    i, size, crop_min = (1, crop.size[0], crop.scale[0]) if crop else (0, None, None)
    jitter, gray, blur = ops[i:i + 3]
    if not (is_(i, T.RandomApply, T.ColorJitter) and jitter.p == JITTER_P and is_(i + 1, T.RandomGrayscale)
            and gray.p == GRAY_P and is_(i + 2, T.RandomApply, RandomBlur)):
        raise ValueError(f"the device path runs ColorJitter (p {JITTER_P}), RandomGrayscale (p {GRAY_P}) and "
                         f"RandomBlur in that order, not {ops[i:i + 3]}")
    cj, i = jitter.transforms[0], i + 3
    strengths = [0.0 if r is None else round(r[1] - c, 6) for r, c in zip(  # round: (1 + s) - 1 is not s
        (cj.brightness, cj.contrast, cj.saturation, cj.hue), (1, 1, 1, 0))]  # ColorJitter keeps (c-s, c+s)
    solarize = is_(i, T.RandomSolarize) and ops[i].threshold == SOLARIZE_AT
    solarize_p, i = (ops[i].p, i + 1) if solarize else (0.0, i)
    i += is_(i, T.RandomHorizontalFlip) and ops[i].p == 0.5
    tail = ops[i:]
    if not (len(tail) == 2 and isinstance(tail[0], T.ToTensor) and isinstance(tail[1], T.Normalize)
            and tuple(tail[1].mean) == MEAN and tuple(tail[1].std) == STD):
        raise ValueError(f"a view ends with its flip, ToTensor and ImageNet's Normalize for the device path, "
                         f"not {tail}")
    return size, crop_min, Photometric(tuple(strengths), blur.p, solarize_p)


def device_generator(run, step):
    """The generator of a step's --gpu-aug / --data-on-device draws, seeded by (--seed, rank, global step)."""
    seed = ((run.args.seed * 1_000_003 + run.rank) * 10_000_019 + step) % 2**63  # primes keep triples apart
    return torch.Generator(run.device).manual_seed(seed)


def device_view(run, x, recipe, gen):
    """uint8 crops [n, 3, H, W] from the loader -> the view's normalised float batch on the device."""
    return colour(run, x.to(run.device, non_blocking=True).float().div_(255), recipe, gen)  # [n, 3, H, W]


def colour(run, x, recipe, gen):
    """x float [N, 3, H, W] in [0, 1] -> the view's photometric ops (per-sample draws of gen), normalised."""
    x = apply_photometric(x, sample_photometric(recipe, x.shape[0], gen), recipe)
    return x.contiguous(memory_format=torch.channels_last) if run.args.channels_last else x


def adjust_hue(x, h):
    """Rotate the hue of x [N, 3, H, W] by h [N] (a fraction of a turn, in [-0.5, 0.5]): torchvision's
    _rgb2hsv, then the closed form of its six-sector _hsv2rgb (channel n: v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)  # [N, H, W]; maxc is v
    eqc = maxc == minc  # grey pixels: s = 0 and h = 0, no division by zero
    s = (maxc - minc) / torch.where(eqc, 1.0, maxc)
    cr = torch.where(eqc, 1.0, maxc - minc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)  # [N, H, W] in [0, 1)
    hue = torch.remainder(hue + h.to(x.dtype)[:, None, None], 1.0)  # rotated by h
    n = 5.0 - 2.0 * torch.arange(3, dtype=x.dtype, device=x.device)  # [3]: 5, 3, 1 (made on the device)
    k = torch.remainder(n[:, None, None, None] + 6.0 * hue, 6.0)  # [3, N, H, W]
    return (maxc - maxc * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)).transpose(0, 1)  # [N, 3, H, W]


BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])  # one 13-tap kernel for every sigma: 3 sigma of the largest one
# (the tails cut at sigma 2 hold 0.3% of the weight; the kernel is renormalised, as torchvision does)


def gaussian_blur(x, sigma, radius=BLUR_RADIUS):
    """Separable Gaussian blur with a per-sample sigma [N], reflect padding (torchvision's gaussian_blur with
    kernel_size 2 radius + 1). The PIL path's GaussianBlur(radius=sigma) is an extended box blur of about the
    same std: away from the borders the two differ by under 1 grey level on average, 4 at most (tested)."""
    n, c, h, w = x.shape
    sigma = sigma.to(x.dtype)[:, None]  # [N, 1]
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=sigma.device) / sigma) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, K]: a normalised kernel per channel
    y = F.pad(x, [radius] * 4, mode="reflect").reshape(1, n * c, h + 2 * radius, w + 2 * radius)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)  # [1, N*C, H + 2r, W]: along rows
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)  # [1, N*C, H, W]: along columns
    return y.reshape(n, c, h, w)


def normalize(x):
    """ImageNet normalisation of x [N, 3, H, W] (Python constants: no host-to-device copy, which syncs)."""
    return torch.stack([(x[:, c] - MEAN[c]) / STD[c] for c in range(3)], 1)  # [N, 3, H, W]


def sample_photometric(recipe, n, gen):
    """One view's parameters for n samples, drawn from `gen` as torchvision draws them per image: factors
    [N, 4] (brightness, contrast, saturation ~ U[max(0, 1 - s), 1 + s], hue ~ U[-s, s]), order [N, 4] (a
    permutation), jitter, gray, sigma, blur, solarize [N]; all drawn for any recipe (one stream layout)."""
    u = functools.partial(torch.rand, generator=gen, device=gen.device)
    bounds = [(max(0.0, 1 - s), 1 + s) for s in recipe.jitter[:3]] + [(-recipe.jitter[3], recipe.jitter[3])]
    r = u(n, 4)  # [N, 4]
    factors = torch.stack([lo + (hi - lo) * r[:, j] for j, (lo, hi) in enumerate(bounds)], 1)  # [N, 4]
    return {"jitter": u(n) < JITTER_P, "factors": factors, "order": u(n, 4).argsort(1),
            "gray": u(n) < GRAY_P, "sigma": BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u(n),
            "blur": u(n) < recipe.blur_p, "solarize": u(n) < recipe.solarize_p}


def jitter_slots(order, on):
    """Jitter order [N, 4] (0-2: brightness, contrast, saturation; 3: hue), jitter on [N] -> the ops before
    the hue and after it, [N, 3] each, -1 for none: the hue (the costly op) then runs once on the batch."""
    hue_at = (order == 3).int().argmax(1, keepdim=True)  # [N, 1]
    k = torch.arange(3, device=order.device)  # [3]
    pre = torch.where((k < hue_at) & on[:, None], order[:, :3], -1)  # [N, 3]
    after = hue_at + 1 + k  # [N, 3] positions after the hue
    post = torch.where((after < 4) & on[:, None], order.gather(1, after.clamp(max=3)), -1)  # [N, 3]
    return pre, post


def adjust_bcs(x, op, factors):
    """Per sample brightness (op 0), contrast (1), saturation (2) or nothing (-1), op [N], factor from factors
    [N, 4]: torchvision's blend of x with 0, the mean grey or the grey image, as one blend (-1: x exactly)."""
    gray = v2.functional.rgb_to_grayscale(x)  # [N, 1, H, W]
    mean = gray.mean((1, 2, 3), keepdim=True)  # [N, 1, 1, 1]
    op4 = op[:, None, None, None]  # [N, 1, 1, 1]
    target = torch.where(op4 == 1, mean, gray) * (op4 != 0)  # [N, 1, H, W]
    f = torch.where(op4 >= 0, factors.gather(1, op.clamp(min=0)[:, None]).to(x.dtype)[..., None, None], 1.0)
    return (f * x + (1.0 - f) * target).clamp(0.0, 1.0)  # torchvision's _blend


def apply_photometric(x, p, recipe):
    """x [N, 3, H, W] in [0, 1], p from sample_photometric -> the normalised view: jitter in each sample's
    order, grayscale, blur, solarize (the PIL path's order). Static shapes, no host sync: every op runs on the
    whole batch and each sample keeps its own result."""
    def where(mask, y, x):
        return torch.where(mask[:, None, None, None], y, x)
    pre, post = jitter_slots(p["order"], p["jitter"])  # [N, 3] each
    for op in pre.unbind(1):
        x = adjust_bcs(x, op, p["factors"])
    if recipe.jitter[3]:  # hue 0 is not bit-exact (HSV round trip): the samples without jitter keep x
        x = where(p["jitter"], adjust_hue(x, p["factors"][:, 3]), x)
    for op in post.unbind(1):
        x = adjust_bcs(x, op, p["factors"])
    x = where(p["gray"], v2.functional.rgb_to_grayscale(x).expand_as(x), x)
    if recipe.blur_p > 0:
        x = where(p["blur"], gaussian_blur(x, p["sigma"]), x)
    if recipe.solarize_p > 0:
        x = where(p["solarize"], v2.functional.solarize(x, SOLARIZE_AT / 255), x)
    return normalize(x)


# -------- --data-on-device: the split held on the device

# --data-on-device: the split decoded once into one uint8 tensor [N, 3, S, S] on the training device. One
# batched call per op, no Python loop over images: at GPU speed such a loop costs about a training step.

STORE_FACTOR = 1.25  # folders: stored at 1.25 x the crop (lightly: Imagenette at 160 px for 128-px crops)


def store_size(args):
    """Side of the stored square images: --store-size, native for the built-in sets, else 1.25 x the crop."""
    native = {"cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": SYNTH_PX}  # stored as they are
    sizes = [native.get(name) for name in args.data.split(",")]
    return args.store_size or (max(sizes) if None not in sizes else round(STORE_FACTOR * args.img_size))


class Stored:
    """PIL image -> its stored form, uint8 [3, S, S], or (uint8 [3, S, S], int32 ids [S, S]) with `ids`: the
    shorter side resized to S (antialiased), then the centre S x S (a square image is only resized)."""
    def __init__(self, size, ids=None):
        self.resize, self.ids = T.Compose([T.Resize(size), T.CenterCrop(size)]), ids

    def __call__(self, img):
        img = self.resize(img.convert("RGB"))
        x = T.functional.pil_to_tensor(img)  # [3, S, S] uint8
        return (x, torch.as_tensor(self.ids(img)).int()) if self.ids else x


class HeldSplit:
    """A split held on the device: images uint8 [N, 3, S, S], labels [N], optional ids [N, S, S]. A training
    batch is the stored images once per view, ((x, x), labels), or ((x, ids, x, ids), labels) with ids, for
    the views' finish() to crop, flip and colour; `copies` 1: (x, labels) (eval_linear's training split)."""
    def __init__(self, images, labels, ids=None, copies=2):
        self.images, self.labels, self.ids, self.copies = images, labels, ids, copies
        self.targets, self.epoch = labels.tolist(), 0  # targets: what labels_of reads

    def __len__(self):
        return len(self.images)

    def batches(self, indices, batch_size, drop_last=True):
        """This rank's batches of one epoch: `indices` (the sampler's order) cut into batch_size pieces."""
        idx = torch.tensor(indices, dtype=torch.long, device=self.images.device)  # [n]
        end = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        for b in idx[:end].split(batch_size):
            x, y = self.images[b], self.labels[b]  # [b, 3, S, S] uint8, [b]
            if self.copies == 1:
                yield x, y
            elif self.ids is None:
                yield (x, x), y
            else:
                ids = self.ids[b]  # [b, S, S]
                yield (x, ids, x, ids), y

    def eval_batches(self, indices, batch_size, img_size):
        """(normalised [b, 3, img_size, img_size], labels) batches of `indices`: eval_transform, on device."""
        resize, idx = round(img_size * 256 / 224), torch.tensor(indices, dtype=torch.long)
        for b in idx.to(self.images.device).split(batch_size):
            x = F.interpolate(self.images[b].float().div_(255), size=(resize, resize), mode="bilinear",
                              antialias=True, align_corners=False)  # [b, 3, resize, resize]
            top = int(round((resize - img_size) / 2.0))  # CenterCrop's offset
            yield normalize(x[..., top:top + img_size, top:top + img_size].clamp(0, 1)), self.labels[b]


def held_split(args, run, base, copies=2, ids=None):
    """Decode `base` once (loader workers, then never again) into a HeldSplit on run.device."""
    loader = torch.utils.data.DataLoader(Views(base, Stored(store_size(args), ids)), batch_size=256,
                                         num_workers=args.workers, worker_init_fn=ignore_interrupts)
    xs, ys = zip(*loader)  # per batch: uint8 [b, 3, S, S] (with `ids`: it and ids [b, S, S]), labels [b]
    masks = None
    if ids:  # wider than uint8 (the official uint8 cast merges ids > 255); int16 when they fit
        xs, ms = zip(*xs)
        masks = torch.cat(ms)
        masks = masks.to(torch.int16 if masks.max() < 2**15 else torch.int32).to(run.device)
    return HeldSplit(torch.cat(xs).to(run.device), torch.cat(ys).long().to(run.device), masks, copies)


def rrc_boxes(n, h, w, scale, gen, ratio=(3 / 4, 4 / 3), tries=10):
    """torchvision's RandomResizedCrop.get_params for n samples at once -> boxes [n, 4] float64 (top, left,
    height, width): up to `tries` draws per sample of area ~ U(scale) x h w and log aspect ~ U(log ratio), the
    first that fits the image, else its centre crop at the nearest allowed aspect (torchvision's fallback)."""
    u = torch.rand(n, tries, 4, generator=gen, device=gen.device, dtype=torch.float64)  # [n, tries, 4]
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # [n, tries]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1])
    bw, bh = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))  # half to even
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)  # [n, tries]
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # [n, 1] the first draw that fits
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731 -- [n, tries] -> [n]
    bw, bh = pick(bw), pick(bh)
    top = torch.floor(pick(u[..., 2]) * (h - bh + 1))  # randint(0, h - bh + 1)
    left = torch.floor(pick(u[..., 3]) * (w - bw + 1))
    if w / h < ratio[0]:  # torchvision's fallback box (its centre crop), the same for every sample
        fw, fh = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    fallback = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=torch.float64, device=gen.device)
    return torch.where(fits.any(1, keepdim=True), torch.stack([top, left, bh, bw], 1), fallback)  # [n, 4]


def crop_resize(x, boxes, size):
    """x float [N, C, H, W], boxes [N, 4] (top, left, height, width) -> [N, C, size, size] by roi_align: pixel
    centres at +0.5 (aligned, resized_crop's convention); ceil(box / size) bilinear samples averaged per
    output pixel and side, a box filter near the antialiased resize (tested), upsampling plain bilinear."""
    top, left, bh, bw = boxes.to(x.dtype).unbind(1)
    rois = torch.stack([torch.arange(len(x), device=x.device, dtype=x.dtype), left, top, left + bw,
                        top + bh], 1)  # [N, 5]: batch index, x1, y1, x2, y2
    return torchvision.ops.roi_align(x, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def flip_where(x, flip):
    """x [N, ...] with the samples where flip [N] is true mirrored left-right."""
    return torch.where(flip.reshape(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def device_crops(x, img_size, scale, gen):
    """x float [n, 3, S, S] -> RandomResizedCrop(img_size, scale) + horizontal flip (p 0.5), per sample."""
    boxes = rrc_boxes(len(x), x.shape[2], x.shape[3], scale, gen)  # [n, 4]
    flip = torch.rand(len(x), generator=gen, device=gen.device) < 0.5  # [n]
    return flip_where(crop_resize(x, boxes, img_size), flip)  # [n, 3, img_size, img_size]


def device_views(run, x, step, img_size, crop_min, recipes):
    """TwoViews.finish with --data-on-device: stored uint8 x [n, 3, S, S] -> each view, drawn per sample."""
    gen, x = device_generator(run, step), x.float().div_(255)  # x [n, 3, S, S] in [0, 1]
    return tuple(colour(run, device_crops(x, img_size, (crop_min, 1.0), gen), r, gen) for r in recipes)


# ============================================================================ backbones

# MoCo v3's ViT-S has 12 heads, not 6
VIT_SIZES = {"vit_small": dict(hidden_dim=384, mlp_dim=1536, num_heads=12),
             "vit_base": dict(hidden_dim=768, mlp_dim=3072, num_heads=12)}


def build_backbone(arch, stem="imagenet", img_size=224, freeze_patch_proj=True, spatial=False):
    """torchvision backbone with the classifier removed -> (net, feature dim). net(x) is the pooled feature
    [N, C]: ResNet's global average pool, ViT's class token, any other registry model's forward up to its
    last Linear (made Identity). spatial=True (DenseCL, DetCon): dim is the channels of the final spatial
    map (feature_map), and the parameters the map never reads are frozen (DDP would find them unused)."""
    if arch in VIT_SIZES:
        return moco_vit(arch, img_size, freeze_patch_proj)
    if not arch.startswith(RESNETS):
        return registry_backbone(arch, img_size, spatial)
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    if stem == "small":  # CIFAR-style stem: keeps 32-px inputs at 32x32 into layer1
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim


def feature_map(net, x):
    """Final spatial feature map [N, C, S, S] (ResNet: layer4 output; ViT: patch tokens; any other model:
    the activation traced_map found, computed by the traced forward up to it on this net's own modules)."""
    if isinstance(net, torchvision.models.ResNet):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))  # [N, C, S, S]
    if isinstance(net, torchvision.models.VisionTransformer):
        tokens = net._process_input(x)  # [N, S*S, D]
        n, s = tokens.shape[0], int(math.isqrt(tokens.shape[1]))
        tokens = net.encoder(torch.cat([net.class_token.expand(n, -1, -1), tokens], 1))[:, 1:]  # [N, S*S, D]
        return tokens.transpose(1, 2).reshape(n, -1, s, s)  # [N, D, S, S]
    forward = getattr(net, "map_forward", None)
    if forward is None:  # built without spatial=True: trace it now (eager use; the methods trace at build)
        forward = net.map_forward = traced_map(*net.effssl_arch).forward
    return forward[0 if net.training else 1](net, x)["map"]  # [N, C, S, S]


def final_grid(arch, stem, img_size, need=0, method=""):
    """Side of the final feature map for this backbone and input size. BadInput if it has none, or if it is
    under need x need: the smallest grid `method` works on (DenseCL, DetCon: 2x2)."""
    grid = map_side(arch, stem, img_size)
    if grid < need:
        flags = f"--arch {arch}" + (f" --stem {stem}" if arch.startswith(RESNETS) else "")  # a ResNet's only
        raise BadInput(f"--img-size {img_size} with {flags} gives a {grid}x{grid} final feature map; "
                       f"{method} needs at least {need}x{need} ({grid_advice(arch, stem, need)})")
    return grid


# -------- backbone checks; any model of torchvision's registry: its final map

def map_side(arch, stem, img_size):
    """Side of the final spatial map at this input size; BadInput when the arch has none."""
    if arch in VIT_SIZES:
        return img_size // 16
    if arch.startswith(RESNETS):
        return math.ceil(img_size / (8 if stem == "small" else 32))
    net = _probe_model(arch, _built_for(arch, img_size))
    if isinstance(net, torchvision.models.VisionTransformer):
        return img_size // net.patch_size
    return traced_map(arch, img_size).shape[2]


def check_input(arch, img_size, size, why):
    """Before any work: BadInput (naming --arch and `why`) unless the img_size backbone runs on size px."""
    if arch.startswith(RESNETS):  # any size
        return
    if arch in VIT_SIZES:
        err = None if size == img_size else f"it is built for {img_size}-px inputs"
    else:
        err = probe_run(arch, img_size, size)
    if err:
        raise BadInput(f"--arch {arch} does not run on {size}-px inputs ({why}): {err}")


def grid_advice(arch, stem, grid):
    """An error's advice for a final map of at least grid x grid: the least --img-size, or --stem small."""
    if arch in VIT_SIZES:
        return f"use --img-size {16 * grid} or more"
    if not arch.startswith(RESNETS):  # --stem is a ResNet's only; other families' strides vary
        return "use a larger --img-size"
    size = (grid - 1) * (8 if stem == "small" else 32) + 1  # final_grid rounds up: one pixel past a cell
    return f"use --img-size {size} or more" + (", or --stem small" if stem != "small" else "")


def registry_backbone(arch, img_size, spatial):
    """build_backbone for any other model of torchvision's registry -> (net, dim)."""
    net = registry_model(arch, img_size)
    dim = strip_classifier(net, arch)
    net.effssl_arch = (arch, img_size)  # for feature_map; plain attribute like map_forward: no state_dict key
    if spatial and not isinstance(net, torchvision.models.VisionTransformer):  # ViT: its patch tokens
        found = traced_map(arch, img_size)
        net.map_forward, dim = found.forward, found.shape[1]
        for name, p in net.named_parameters():  # freeze those the map never reads
            p.requires_grad_(p.requires_grad and name in found.params)
    return net, dim


def registry_model(arch, img_size):
    """torchvision.models.get_model(arch), random init. Its ViTs and MaxViT fix their input size when built;
    models returning auxiliary classifier outputs while training (GoogLeNet, Inception v3) are refused."""
    kw = ({"image_size": img_size} if arch.startswith("vit_") else
          {"input_size": (img_size, img_size)} if arch.startswith("maxvit") else {})
    try:
        net = torchvision.models.get_model(arch, **kw)
    except NotImplementedError:  # on the meta device (_probe_model builds it on the CPU instead)
        raise
    except (AssertionError, ValueError, RuntimeError) as e:  # e.g. a ViT size off its patch grid
        raise BadInput(f"--arch {arch} cannot be built for --img-size {img_size}: {_first_line(e)}") from None
    if getattr(net, "aux_logits", False):
        raise BadInput(f"--arch {arch} returns auxiliary classifier outputs while training; "
                       "choose another model")
    return net


def strip_classifier(net, arch):
    """Replace the model's last Linear (its classifier) by Identity, in place -> the pooled feature dim."""
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BadInput(f"--arch {arch} has no Linear classifier to remove (e.g. SqueezeNet's is a "
                       "convolution); choose another model")
    dim = net.get_submodule(linears[-1]).in_features
    net.set_submodule(linears[-1], nn.Identity())
    return dim


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _built_for(arch, img_size):
    """The size a probe model is built for: ViTs and MaxViT fix theirs; any other model takes any size (0)."""
    return img_size if arch.startswith(("vit_", "maxvit")) else 0


@functools.lru_cache(maxsize=None)
def _probe_model(arch, img_size):
    """The stripped registry model in eval() on the meta device: shapes only, no memory, no compute, no init.
    RegNet computes its widths with tensors: built on the CPU, then moved."""
    with warnings.catch_warnings(action="ignore"):  # e.g. torchvision's notes on future default inits
        try:
            with torch.device("meta"):
                net = registry_model(arch, img_size)
        except NotImplementedError:
            net = registry_model(arch, img_size).to("meta")
    strip_classifier(net, arch)  # BadInput without a Linear classifier
    return net.eval()


@functools.lru_cache(maxsize=None)
def probe_run(arch, img_size, size):
    """None if the model built for img_size runs on [1, 3, size, size], else the first line of its error."""
    net = _probe_model(arch, _built_for(arch, img_size))
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size, device="meta"))
    except NotImplementedError:  # an op without a meta kernel: the real run will tell
        return None
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        return _first_line(e)
    return None


@functools.lru_cache(maxsize=None)
def _every_node(arch, img_size):
    """(node names in graph order, extractor returning every node) of the eval graph of the probe model."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    net = _probe_model(arch, img_size)
    train_nodes, eval_nodes = get_graph_node_names(net)
    return eval_nodes, create_feature_extractor(net, train_return_nodes=train_nodes,
                                                eval_return_nodes=eval_nodes).eval()


@dataclasses.dataclass(frozen=True)
class TracedMap:
    node: str  # the graph node (torchvision.models.feature_extraction's name) of the final spatial map
    shape: tuple  # its [1, C, S, S] at --img-size
    forward: tuple  # (train, eval) forward functions up to it, called as f(net, x) -> {"map": [N, C, S, S]}
    params: frozenset  # names of the parameters it reads


@functools.lru_cache(maxsize=None)
def traced_map(arch, img_size):
    """A registry model's final spatial map (torchvision.models.feature_extraction): run on two sizes
    (128 px, twice it), the LAST activation [N, C, H, W] whose H and W change with the input while C does
    not (its pooling and head follow, at fixed sizes). ConvNeXt: features; RegNet: trunk_output; Swin: the
    permuted last stage; DenseNet: the ReLU after features. BadInput when none, or it fails at --img-size."""
    if err := probe_run(arch, img_size, img_size):
        raise BadInput(f"--arch {arch} does not run on {img_size}-px inputs: {err}")
    # 128 px: a stride-32 map is 4x4 there (8x8 at twice it), so the final map itself (not an earlier stage's)
    # is the last one whose side changes; a model built for one size (ViT, MaxViT) is probed at it
    a, shapes = _built_for(arch, img_size) or 128, []
    try:
        for size in (a, 2 * a):  # {node: output shape} of every tensor computed (node 0: the input)
            nodes, every = _every_node(arch, _built_for(arch, size))
            with torch.no_grad(), redirect_stderr(io.StringIO()):  # fx prints its code on an error
                out = every(torch.zeros(1, 3, size, size, device="meta"))
            shapes.append({k: tuple(out[k].shape) for k in nodes[1:] if torch.is_tensor(out.get(k))})
    except Exception as e:  # noqa: BLE001 -- tracing or running any model: whatever fails, no map is found
        raise BadInput(f"--arch {arch}: its final spatial map could not be traced "
                       f"({_first_line(e)})") from None
    one, two = shapes
    spatial = [k for k, v in one.items() if len(v) == 4 and k in two and v[1] == two[k][1]
               and v[2] != two[k][2] and v[3] != two[k][3]]
    if not spatial:
        raise BadInput(f"--arch {arch} has no spatial feature map (DenseCL, DetCon and the dense probes need "
                       "one): choose a convolutional or Swin-like model")
    from torchvision.models.feature_extraction import create_feature_extractor
    net = _probe_model(arch, _built_for(arch, img_size))
    gm = create_feature_extractor(net, return_nodes={spatial[-1]: "map"})
    # the generated code reads every module by its path from `self`: called with the training net as self,
    # it runs that net's own (possibly SyncBN-converted, deep-copied or compiled) modules
    forward = tuple(type(torch.fx.GraphModule(gm, g)).forward for g in (gm.train_graph, gm.eval_graph))
    with torch.no_grad():
        shape = tuple(forward[1](net, torch.zeros(1, 3, img_size, img_size, device="meta"))["map"].shape)
    return TracedMap(spatial[-1], shape, forward, frozenset(n for n, _ in gm.named_parameters()))


# -------- MoCo v3's ViT

def moco_vit(arch, img_size, freeze_patch_proj):
    """build_backbone for MoCo v3's ViT-S/16 and ViT-B/16 -> (net, dim)."""
    if img_size % 16:
        raise BadInput(f"--img-size {img_size} is not a multiple of the ViT patch size 16")
    net = torchvision.models.VisionTransformer(image_size=img_size, patch_size=16, num_layers=12,
                                               **VIT_SIZES[arch])
    dim, net.heads = net.hidden_dim, nn.Identity()
    # MoCo v3: fixed 2-D sin-cos position embedding (not learned); zero for the class token
    net.encoder.pos_embedding.data.copy_(F.pad(sincos_pos_embed(dim, img_size // 16), (0, 0, 1, 0)))
    net.encoder.pos_embedding.requires_grad = False
    # MoCo v3: uniform (Xavier-like) init of the patch projection, optionally frozen ("random patch
    # projection" stabilises training: the paper's fix for the loss spikes)
    val = math.sqrt(6.0 / float(3 * 16 * 16 + dim))
    nn.init.uniform_(net.conv_proj.weight, -val, val)
    nn.init.zeros_(net.conv_proj.bias)
    net.conv_proj.requires_grad_(not freeze_patch_proj)
    return net, dim


def sincos_pos_embed(dim, grid, temperature=10000.0):
    """MoCo v3's 2-D sin-cos position embedding -> [1, grid*grid, dim]."""
    r = torch.arange(grid, dtype=torch.float32)
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # [dim/4]
    gw, gh = torch.meshgrid(r, r, indexing="ij")
    out_w, out_h = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega  # [grid^2, dim/4] each
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], 1)[None]


# ============================================================================ optimizer & schedules

def build_optimizer(args, params, trust_coefficient=0.001):
    """`params`: parameters or param groups; every group starts at the scaled lr (the loop sets it per step).
    `trust_coefficient`: LARS's, from the method (ImageNet recipes 0.001)."""
    lr = args.lr * args.batch_size / 256  # linear scaling rule: --lr is the base lr for batch 256
    if args.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=args.wd, trust_coefficient=trust_coefficient)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.wd)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.wd)
    raise BadInput(f"unknown optimizer {args.optimizer!r}; choose from lars, sgd, adamw")


def grad_scaler(run):
    return torch.amp.GradScaler(run.device.type, enabled=run.args.precision == "fp16")


def optimizer_step(loss, optimizer, scaler, clip_params=None, clip=0.0):
    """Backward + (optional grad-norm clip) + step, GradScaler-aware (a no-op scaler unless fp16)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(clip_params, clip)
    scaler.step(optimizer)
    scaler.update()


def cosine_lr(epoch, base_lr, warmup_epochs, epochs):
    """Linear warmup then half-cosine, evaluated at a fractional epoch (per iteration)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set the lr of every parameter group (a method with per-group rules sets its groups itself)."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def cosine_momentum(epoch, epochs, m0):
    """m(e) = 1 - (1 + cos(pi e / E)) / 2 * (1 - m0): from m0 at the start to 1 at the end."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m0)


@torch.no_grad()
def ema_update(target_params, online_params, m):
    """theta_target <- m * theta_target + (1 - m) * theta_online (fused over all tensors); m a float or a 0-d
    tensor (Run.scalar: what the training loops pass, so that --compile keeps one graph)."""
    target_params, online_params = list(target_params), list(online_params)
    torch._foreach_mul_(target_params, m)
    torch._foreach_add_(target_params, torch._foreach_mul(online_params, 1.0 - m))


# -------- LARS

class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3: 1-D parameters (biases, norm weights) get neither weight decay nor trust scaling.
    For the others dp = grad + wd * p is scaled by q = trust * |p| / |dp| (q = 1 where either norm is 0); then
    mu = momentum * mu + dp and p -= lr * mu. One step is a few multi-tensor (torch._foreach_*) ops per group
    of same-kind parameters, with no host sync; the state is one momentum buffer "mu" per parameter."""
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for g in self.param_groups:
            buckets = {}  # (is >1-D, device, dtype) -> params with a grad (a _foreach op: one device, dtype)
            for p in g["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.ndim > 1, p.device, p.dtype), []).append(p)
            for (scaled, _, _), params in buckets.items():
                for p in params:
                    if "mu" not in self.state[p]:  # setdefault would build a zero tensor at every step
                        self.state[p]["mu"] = torch.zeros_like(p)
                mu = [self.state[p]["mu"] for p in params]
                grads = [p.grad for p in params]
                torch._foreach_mul_(mu, g["momentum"])
                if scaled:
                    dp = torch._foreach_add(grads, params, alpha=g["weight_decay"])
                    p_norm = torch.stack(torch._foreach_norm(params))  # [P]
                    dp_norm = torch.stack(torch._foreach_norm(dp))  # [P]
                    q = torch.where((p_norm > 0) & (dp_norm > 0),
                                    g["trust_coefficient"] * p_norm / dp_norm, 1.0)  # [P]
                    torch._foreach_addcmul_(mu, dp, q.unbind())  # mu += q * dp: dp * q never stored
                else:
                    torch._foreach_add_(mu, grads)
                torch._foreach_add_(params, mu, alpha=-g["lr"])
        return loss


# ============================================================================ checkpoint, resume & export

def save_checkpoint(run, log, state, epoch_end=False):
    """Full training state -> checkpoint.pth (rank 0, atomic). `state`: {name: object with a state_dict}.
    Refuses a non-finite loss: a good checkpoint is never overwritten by a diverged state. `epoch_end`: the
    end-of-epoch save, written every --save-epochs epochs and at the end of the run."""
    if epoch_end and not log.done and (log.step // log.spe) % run.args.save_epochs:
        return
    if not math.isfinite(float(log.loss)):
        return
    path = os.path.join(run.out, "checkpoint.pth")
    if run.main:
        ck = {"method": run.method, "args": dataclasses.asdict(run.args), "data_id": run.data_id,
              "step": log.step, "epoch": log.step / log.spe, "rng": rng_state(),
              **{k: v.state_dict() for k, v in state.items()}}
        save_atomic(ck, path)
    run.good = (path, log.step)


def end_of_step(run, log, state):
    """After every optimizer step: the --save-every checkpoint; on SIGTERM/SIGUSR1 a checkpoint at this
    step and Preempted (exit PREEMPTED_EXIT). True once the step budget is spent: leave the epoch."""
    if run.args.save_every and log.step % run.args.save_every == 0:
        save_checkpoint(run, log, state)
    if stop_requested(run, log.step):
        save_checkpoint(run, log, state)
        raise Preempted(f"{STOP_SIGNAL[0] or 'a stop signal on another rank'} at step {log.step}: wrote "
                        f"{os.path.join(run.out, 'checkpoint.pth')}; rerun with --resume auto to continue")
    return log.done


def resume(run, **state):
    """Load --resume (auto/path; setup has read and checked it) into the given objects (model=...,
    optimizer=..., scaler=...). Returns the global step to continue from (0 for a fresh run). From here on a
    Ctrl-C ends the run at the end of its step, with a checkpoint (before it, at once: nothing to save)."""
    STOP_AT_STEP[0] = True
    if run.checkpoint is None:
        return 0
    (path, ck), run.checkpoint = run.checkpoint, None  # the run no longer holds the file's tensors
    if ck.get("data_id") and run.data_id and ck["data_id"] != run.data_id:  # the flags matched (setup)
        raise BadInput(f"cannot resume from {path}: it was made on {ck['data_id']} of training data, --data "
                       f"{run.args.data} has {run.data_id}; resume on the data it was made with")
    load_states(ck, state, path)  # BadInput naming the part that does not fit
    set_rng_state(ck["rng"])
    run.good = (path, ck["step"])
    if run.main:
        print(f"resumed from {path} at step {ck['step']} (epoch {ck['epoch']})", flush=True)
    return ck["step"]


def export_backbone(run, net):
    """Online backbone -> backbone.pth: a plain state_dict (loads strict=True into the torchvision model
    with its classifier removed); arch/stem/img_size/encoder are kept in its `_metadata`."""
    if not run.main:
        return
    sd = OrderedDict((k, v.detach().cpu()) for k, v in net.state_dict().items())
    sd._metadata = getattr(net.state_dict(), "_metadata", OrderedDict()).copy()
    sd._metadata["effssl"] = {"method": run.method, "encoder": "online", "arch": run.args.arch,
                              "stem": run.args.stem, "img_size": run.args.img_size}
    save_atomic(sd, os.path.join(run.out, "backbone.pth"))


# -------- checkpoint files: checks, RNG state, atomic save, safe load

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "torch": torch.get_rng_state(), **cuda}


def set_rng_state(s):
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextmanager
def atomic_path(path, suffix=""):
    """A temporary name beside `path` (ending in `suffix`, which picks the image format) for the block to
    write, then os.replace onto `path`: a crash or a concurrent reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # a failed write or rename leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save through atomic_path, fsynced before the rename: a crash never leaves a broken file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_file(path):
    """torch.load with weights_only=True (a checkpoint is data, never code); BadInput if unreadable."""
    if not os.path.isfile(path):
        raise BadInput(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not PyTorch's text: a fragment of the unpickler's, or advice to load code
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive ("PK\3\4"); before PyTorch 1.6 a pickle (protocol 2: byte 0x80)
        why = ("it is a zip archive / pickle, but damaged or holding more than tensors and plain data"
               if head.startswith((b"PK\x03\x04", b"\x80")) else "it is not a zip archive / pickle")
        raise BadInput(f"{path} is not a checkpoint written by these scripts ({why})") from None


# The flags a resume may change (a method's Args adds its own RESUME_FREE, e.g. where it writes a picture):
# where and how often it logs, evaluates and saves, when it stops, its loader and speed switches (the same
# step up to float rounding), where the data is (DATA_ID checks the data itself). Any other flag (data flags,
# sizes, arch, batch, seed, precision, --epochs: the lr/momentum schedules, ...) must equal the checkpoint's.
RESUME_FREE = ("data", "data_root", "output_dir", "resume", "overwrite", "preset", "workers", "max_steps",
               "time_limit", "knn_every", "knn_k", "knn_t", "log_every", "save_every", "save_epochs",
               "tensorboard", "compile", "channels_last")


def find_checkpoint(args, method):
    """(path, contents) of --resume (auto: <output-dir>/checkpoint.pth if any), or None. BadInput unless a
    training checkpoint of this method, every flag but RESUME_FREE's equal (one it lacks is not compared)."""
    path = os.path.join(args.output_dir, "checkpoint.pth") if args.resume == "auto" else args.resume
    if not path or (args.resume == "auto" and not os.path.isfile(path)):
        return None
    ck = load_file(path)
    if not isinstance(ck, dict) or "model" not in ck or not isinstance(ck.get("args"), dict):
        raise BadInput(f"{path} is not a training checkpoint of this project")
    if ck.get("method") != method:
        raise BadInput(f"cannot resume from {path}: it was made with method={ck.get('method')}, "
                       f"this run has method={method}")
    free = RESUME_FREE + getattr(args, "RESUME_FREE", ())
    if "synthetic" not in args.data.split(","):  # the size of a data set this run does not read
        free += ("synthetic_size",)
    for f in dataclasses.fields(args):
        have, want = ck["args"].get(f.name), getattr(args, f.name)
        if f.name not in free and f.name in ck["args"] and have != want:
            raise BadInput(f"cannot resume from {path}: it was made with {f.name}={have}, this run has "
                           f"{f.name}={want} (--{f.name.replace('_', '-')} changes what a step computes; "
                           "start a new run in another --output-dir)")
    return path, ck


def checkpoint_stamp(args):
    """(inode, size, mtime) of the --resume file, None without one: tells whether it changed since read."""
    path = os.path.join(args.output_dir, "checkpoint.pth") if args.resume == "auto" else args.resume
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return st and (st.st_ino, st.st_size, st.st_mtime_ns)


def load_states(ck, state, path):
    """load_state_dict of every object in `state` from ck; BadInput naming the one that does not fit, in our
    words (PyTorch's message runs to pages, and cut short it ends mid-sentence)."""
    for k, obj in state.items():
        if k not in ck:
            raise BadInput(f"cannot resume from {path}: it holds no {k} state")
        try:
            obj.load_state_dict(ck[k])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError):
            raise BadInput(f"cannot resume from {path}: its {k} does not fit this run's "
                           f"({misfit(obj, ck[k])})") from None


def misfit(obj, saved):
    """How a saved state differs from obj's, briefly: a module's first missing, unexpected, resized keys."""
    if not isinstance(obj, nn.Module) or not isinstance(saved, dict):
        return f"another {type(obj).__name__} state: other parameters or settings"
    mine = obj.state_dict()
    shape = lambda v: list(v.shape) if torch.is_tensor(v) else type(v).__name__  # noqa: E731
    missing, extra = [k for k in mine if k not in saved], [k for k in saved if k not in mine]
    resized = [k for k in mine if k in saved and shape(saved[k]) != shape(mine[k])]
    parts = [f"{len(missing)} missing, e.g. {missing[0]}"] if missing else []
    parts += [f"{len(extra)} unexpected, e.g. {extra[0]}"] if extra else []
    parts += [f"{len(resized)} of another shape, e.g. {resized[0]} {shape(saved[resized[0]])} here "
              f"{shape(mine[resized[0]])}"] if resized else []
    return "; ".join(parts) or "values of another kind"


# ============================================================================ kNN monitor

def knn_monitor(args, run):
    """(train, val) datasets with the eval transform for the kNN monitor, or None when unlabeled/off."""
    if not args.knn_every:
        return None
    train, val = load_dataset(args, "train"), load_dataset(args, "val")
    if val is None or min(labels_of(train)) < 0:
        if run.main:
            print("kNN monitor off: the data has no labeled val split", flush=True)
        return None
    if args.data_on_device:
        bank = run.held_train or held_split(args, run, train)  # decoded once when pretraining holds it
        return HeldSplit(bank.images, bank.labels, copies=1), held_split(args, run, val)
    tf = eval_transform(args.img_size)
    return Views(train, tf), Views(val, tf)


# -------- kNN: features and the vote

def labels_of(ds):
    return list(getattr(ds, "targets", None) or getattr(ds, "labels"))


def num_classes(ds):
    return max(labels_of(ds)) + 1


def eval_loader(ds, batch_size, run):
    """This rank's share of ds in batches, for evaluation: every item exactly once over all ranks
    (DistributedSampler would pad the last share with duplicates, which a metric would count twice)."""
    mine = list(range(run.rank, len(ds), run.world))
    if isinstance(ds, HeldSplit):  # --data-on-device: resize + centre crop on the device
        return ds.eval_batches(mine, batch_size, run.args.img_size)
    return torch.utils.data.DataLoader(ds, batch_size, sampler=mine, num_workers=run.args.workers,
                                       worker_init_fn=ignore_interrupts)


def gather_rows(x):
    """Concatenate x [n_rank, ...] of every rank in rank order (n_rank may differ per rank); x when alone."""
    if get_world_size() == 1:
        return x
    sizes = all_gather_nograd(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])  # [max n_rank, ...]
    parts = all_gather_nograd(padded).split(max(sizes))
    return torch.cat([p[:m] for p, m in zip(parts, sizes)])


@torch.no_grad()
def extract_features(net, ds, run, batch_size=256):
    """L2-normalised pooled features [N, C] and labels [N] of the whole dataset, every rank's share gathered
    (in the order rank 0's, rank 1's, ...: features and labels stay paired, which is all kNN needs)."""
    was_training, feats, labels = net.training, [], []
    net.eval()
    for x, y in eval_loader(ds, batch_size, run):
        with run.autocast():
            feats.append(F.normalize(net(run.to_device(x)).float(), dim=1))  # [n, C]
        labels.append(y.to(run.device))
    net.train(was_training)
    return gather_rows(torch.cat(feats)), gather_rows(torch.cat(labels))


BANK_CHUNK = 16384  # bank rows per similarity block: [2048 queries, BANK_CHUNK] fp32 = 128 MiB


def knn_vote(queries, bank, bank_dist, k, t, bank_chunk=None):
    """Weighted kNN (InstDisc's weights exp(cos / t), normalised) -> [Q, C]: for each unit query [Q, D], the
    weighted mean of the label distributions bank_dist [M, C] (one-hot for image labels) of its k most similar
    bank rows [M, D]. The bank is scanned in chunks with a running top-k: memory O(Q x (bank_chunk + k))."""
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


def knn_eval(net, train_ds, val_ds, run, k=200, t=0.1, chunk=2048):
    """kNN top-1/top-5 (percent) of `net` with train_ds as the bank and val_ds as queries."""
    bank, bank_l = extract_features(net, train_ds, run)
    feats, labels = extract_features(net, val_ds, run)
    n_cls = int(max(bank_l.max(), labels.max())) + 1
    one_hot = F.one_hot(bank_l, n_cls).float()  # [M, C]: an image's label as a distribution
    scores = torch.cat([knn_vote(feats[i:i + chunk], bank, one_hot, k, t)
                        for i in range(0, len(feats), chunk)])  # [N, C]
    hit = scores.topk(min(5, n_cls), dim=1).indices == labels[:, None]  # [N, top-k]
    return [100.0 * hit[:, :top].any(1).float().mean().item() for top in (1, min(5, n_cls))]


# ============================================================================ logging

class Logger:
    """log.jsonl, a progress line every --log-every steps, the JSON summary line, and the run's clock:
    img/s and step_ms count source images over all ranks after WARMUP steps, evaluation left out;
    data_time_frac is the share of that time spent waiting for the loader (timed)."""
    WARMUP = 2  # first steps include lazy init / compilation and are left out of img/s

    def __init__(self, run, steps_per_epoch, start_step):
        self.run, self.spe = run, steps_per_epoch
        self.total = min(run.args.epochs * steps_per_epoch, run.args.max_steps or math.inf)  # 0: no cap
        self.start = self.step = start_step
        self.finished = bool(start_step) and start_step >= self.total  # a finished run resumed: no step left
        self.loss = torch.zeros(())  # the last step's loss (a tensor: read only on log steps and checkpoints)
        self.last, self.stored = {}, None  # the last log record (+ evaluations); the finished run's summary
        writer = tensorboard_writer() if run.main and run.args.tensorboard else None  # BadInput if missing
        run.start()  # every check has passed: the folder, its lock and args.json (the run's first write)
        path = os.path.join(run.out, "log.jsonl")
        if run.main and start_step and os.path.isfile(path):
            if drop_torn_tail(path):  # a crash or kill -9 cut the last write
                print(f"{path}: dropped its torn last line", flush=True)
            records = read_jsonl(path)[0]
            kept = [r for r in records if r.get("step", 0) <= start_step]  # later: the steps this run redoes
            if len(kept) < len(records):  # a crash after the checkpoint: each step stays logged once
                with atomic_path(path) as tmp, open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                print(f"{path}: dropped {len(records) - len(kept)} record(s) after step {start_step}, the "
                      "checkpoint's: this run does those steps again", flush=True)
            self.last, self.stored = recall(kept)
        self.file = open(path, "a" if start_step else "w") if run.main else None  # a resumed run appends
        self.tb = writer(os.path.join(run.out, "tb")) if writer else None
        # the clock: t_warm when the warm-up ended, t_end when the last step did (the final checkpoint and
        # export are not training); data waits since the last log line and after the warm-up; evaluation
        # seconds after the warm-up (left out of img/s) and in all (left out of train_s)
        self.t0 = self.t_last = time.perf_counter()
        self.t_warm = self.t_end = None
        self.data_time = self.data_warm = self.excluded = self.eval_s = self.eval_end = 0.0
        self.n_since = 0  # steps since the last log line

    @property
    def done(self):
        """The step budget (all epochs, or --max-steps) is spent: also true when a finished run is resumed."""
        return self.step >= self.total

    def epochs(self):
        """The epochs left to train, stopping once the budget is spent (a finished run trains no more)."""
        for epoch in range(self.step // self.spe, self.run.args.epochs):
            if self.done:
                return
            yield epoch

    def timed(self, loader):
        """(index in the epoch, batch) of an epoch's loader (a resumed epoch's starts where it stopped),
        the time spent waiting for each batch counted as data time."""
        it, t = iter(loader), time.perf_counter()  # iter() starts a DataLoader's workers: not counted
        for i, batch in enumerate(it, start=self.step % self.spe):
            waited = time.perf_counter() - t
            self.data_time += waited
            self.data_warm += waited if self.t_warm else 0.0
            yield i, batch
            t = time.perf_counter()  # the loop asks for the next batch

    def sync(self):
        if self.run.device.type == "cuda":
            torch.cuda.synchronize(self.run.device)

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb and "step" in record and record.get("event") != "summary":
            for k, v in record.items():  # every number but the step and epoch, at its step
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def log_step(self, loss, **metrics):
        """Call after every optimizer step with the (tensor) loss; syncs only on log steps."""
        self.step, self.loss = self.step + 1, loss
        step, epoch = self.step, self.step / self.spe
        self.n_since += 1
        if step - self.start == self.WARMUP:  # the throughput clock starts
            self.sync()
            self.t_warm = time.perf_counter()
        if time_up(self):
            self.total = step  # this step is the run's last: log it, then kNN, checkpoint, export, summary
        if step % self.run.args.log_every and step != self.total:
            return
        loss = float(loss)  # waits for the step's kernels
        now = time.perf_counter()
        if step == self.total:
            self.t_end, self.eval_end = now, self.eval_s  # evaluation after the last step is not training
        dt = now - self.t_last
        img_per_s, data_frac = self.n_since * self.run.args.batch_size / dt, self.data_time / dt
        self.t_last, self.data_time, self.n_since = now, 0.0, 0
        rec = {"step": step, "epoch": round(epoch, 4), "loss": loss,
               **{k: float(v) for k, v in metrics.items()},
               "img_per_s": img_per_s, "data_time_frac": data_frac,
               "peak_mem_mb": peak_mem_mb(self.run.device)}
        self.last = rec
        if not math.isfinite(loss):
            good = self.run.good  # what this run wrote or resumed from, never an older run's file
            raise FloatingPointError(f"loss is {loss} at step {step}; " + (
                f"the last good checkpoint is {good[0]} (step {good[1]}), never overwritten by this state"
                if good else "this run wrote no checkpoint before it"))
        if self.run.main:
            eta = (now - self.t0) / (step - self.start) * (self.total - step)
            extra = "".join(f" {k} {v:.4g}" for k, v in metrics.items())
            print(f"ep {epoch:.2f} step {step}/{self.total} loss {loss:.4f}{extra} img/s {img_per_s:.1f} "
                  f"data {100 * data_frac:.0f}% eta {eta / 60:.1f}m", flush=True)
            self.write(rec)

    def evaluate(self, net, knn, epoch):
        """End of an epoch: the kNN monitor of `net` every --knn-every epochs and after the last step."""
        args = self.run.args
        if knn and (self.done or (epoch + 1) % args.knn_every == 0):
            t = time.perf_counter()
            top1, top5 = knn_eval(net, *knn, self.run, args.knn_k, args.knn_t)
            self.log_eval(time.perf_counter() - t, knn_top1=top1, knn_top5=top5)

    def log_eval(self, seconds, **metrics):
        """Log evaluation metrics; `seconds` spent evaluating are left out of img/s and step_ms.
        `train_s` is the training wall-clock so far (evaluation excluded), for equal-time comparisons."""
        self.eval_s += seconds
        self.t_last += seconds
        self.excluded += seconds if self.t_warm and not self.t_end else 0.0
        rec = {"step": self.step, "epoch": round(self.step / self.spe, 4), **metrics,
               "train_s": time.perf_counter() - self.t0 - self.eval_s}
        self.last.update(metrics)
        if self.run.main:
            print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()),
                  flush=True)
            self.write(rec)

    def summary(self, **extra):
        """Print the JSON summary as the last line of the run. A finished run resumed (nothing trained) says
        so and prints the summary it ended with, appending nothing to log.jsonl."""
        if self.finished and self.step == self.start:
            return repeat_summary(self, extra)
        rec = {"event": "summary", "method": self.run.method, "steps": self.step, **run_totals(self),
               "peak_mem_mb": peak_mem_mb(self.run.device), "loss": self.last.get("loss"),
               "knn_top1": self.last.get("knn_top1"), "epochs": round(self.step / self.spe, 4), **extra}
        if self.run.main:
            self.write(rec)
            self.file.close()
            if self.tb:
                self.tb.close()
            plot_curves(os.path.join(self.run.out, "log.jsonl"), os.path.join(self.run.out, "curves.png"))
            print(json.dumps(rec), flush=True)
        return rec


# -------- run records & pictures

def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_mem_mb(device):
    """Peak memory: CUDA allocator peak on GPU, peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInput("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def time_up(log):
    """--time-limit reached (training seconds, evaluation excluded), on every rank at the same step: alone
    checked every step; distributed, the ranks agree every --log-every steps (as stop_requested)."""
    args = log.run.args
    if not args.time_limit or (log.run.world > 1 and log.step % args.log_every):
        return False
    up = time.perf_counter() - log.t0 - log.eval_s >= args.time_limit
    if log.run.world > 1:
        flag = torch.tensor(float(up), device=log.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        up = bool(flag)
    return up


def run_totals(log):
    """The summary's clock: img_per_s, step_ms and data_time_frac over the steps after the warm-up (None
    without any), evaluation left out; train_s from the start to the last step, evaluation excluded."""
    log.sync()
    steps, end = log.step - log.start - log.WARMUP, log.t_end or time.perf_counter()
    out = dict(img_per_s=None, step_ms=None, data_time_frac=None)
    if log.t_warm and steps > 0:
        dt = end - log.t_warm - log.excluded
        out = dict(img_per_s=steps * log.run.args.batch_size / dt, step_ms=1000 * dt / steps,
                   data_time_frac=log.data_warm / dt)
    return {**out, "train_s": end - log.t0 - (log.eval_end if log.t_end else log.eval_s)}


def read_jsonl(path):
    """The records of a JSON-lines file such as log.jsonl -> (records, number skipped). A line that is not a
    JSON object (torn by a crash or kill -9 mid-write) is skipped, and one line on stderr says how many."""
    with open(path, errors="replace") as f:
        lines = [line for line in f if line.strip()]
    records = [r for r in map(json_object, lines) if r is not None]
    skipped = len(lines) - len(records)
    if skipped:
        print(f"{path}: skipped {skipped} unreadable line(s), torn by an interrupted write", file=sys.stderr,
              flush=True)
    return records, skipped


def json_object(line):
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


def recall(records):
    """A resumed run's memory of its log.jsonl -> (the last loss record with the evaluations after it, the
    last summary or None: what a rerun of the finished run prints)."""
    last, stored = {}, None
    for r in records:
        if r.get("event") == "summary":
            stored = r
        elif "loss" in r:
            last = dict(r)
        else:
            last.update({k: v for k, v in r.items() if k not in ("step", "epoch", "train_s")})
    return last, stored


def repeat_summary(log, extra):
    """Logger.summary of a finished run resumed: one line saying so, then its stored summary (or, without one,
    the last logged loss and kNN) as the last line; log.jsonl and curves.png stay as they are."""
    rec = log.stored or {"event": "summary", "method": log.run.method, "steps": log.step,
                         "loss": log.last.get("loss"), "knn_top1": log.last.get("knn_top1"),
                         "epochs": round(log.step / log.spe, 4), **extra}
    if log.run.main:
        log.file.close()
        if log.tb:
            log.tb.close()
        print(f"nothing to train: {log.run.out} holds a finished run (step {log.step} of {log.total}); its "
              "summary:", flush=True)
        print(json.dumps(rec), flush=True)
    return rec


def drop_torn_tail(path):
    """Truncate the last line of a JSON-lines file when it is torn (no trailing newline, or not JSON), so a
    resumed run's records do not glue onto half a record. Returns the number of bytes dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        body = data.removesuffix(b"\n")
        start = body.rfind(b"\n") + 1  # where the last line begins
        last = body[start:]
        if (data.endswith(b"\n") or not last) and (not last.strip() or json_object(last) is not None):
            return 0
        f.truncate(start)
    return len(data) - start


def plot_curves(log_path, png_path):
    """curves.png: every logged metric (loss, lr, momentum, kNN, the method's own) against the step, one panel
    each. Needs matplotlib; without it the run simply has no picture. Returns the panel names drawn."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no display, no global state
    except ImportError:
        return []
    records = [r for r in read_jsonl(log_path)[0] if r.get("event") != "summary" and "step" in r]
    not_curves = ("step", "epoch", "event", "img_per_s", "data_time_frac", "peak_mem_mb", "train_s")
    series = {}
    for r in records:
        for k, v in r.items():
            if k not in not_curves and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((r["step"], v))
    if not series:
        return []
    cols, rows = min(3, len(series)), math.ceil(len(series) / 3)
    width, height = 4 * cols, 2.8 * rows  # inches
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, points) in zip(axes.flat, series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, ms=3)
        ax.ticklabel_format(axis="y", useOffset=False)  # the values themselves, never "+0.99" above them
        lo, hi = min(values), max(values)
        size = max(abs(lo), abs(hi))
        if hi - lo <= 1e-3 * size:  # nearly constant (an lr): matplotlib would stretch its float noise
            pad = 0.05 * size if size else 1.0
            ax.set_ylim(lo - pad, hi + pad)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    # fixed margins in inches (tight_layout measures every label: it cost as much as drawing the figure)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.6 / height,
                        wspace=0.35, hspace=0.6)
    with atomic_path(png_path, ".png") as tmp:  # like every other output
        fig.savefig(tmp, dpi=80)
    return list(series)


def to_image(x):
    """A normalised image tensor [3, H, W] -> uint8 array [H, W, 3] (undoes Normalize(MEAN, STD))."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return ((x.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def palette():
    """The PASCAL VOC colour map [256, 3] uint8 (class id -> colour; 255, ignore, is (224, 224, 192))."""
    ids, ch = np.arange(256)[:, None], np.arange(3)  # [256, 1] and [3]: r, g, b
    # bit 3j + ch of the id -> bit 7 - j of channel ch: its bits interleaved over r, g, b, high bits first
    return sum(((ids >> (3 * j + ch)) & 1) << (7 - j) for j in range(8)).astype(np.uint8)  # [256, 3]


def save_sheet(path, rows, heads, tile, title=""):
    """A PNG contact sheet: `rows` of panels (arrays [h, w, 3] in 0..255), each drawn at tile x tile px
    (nearest: masks stay sharp), the column `heads` above them and `title` on top, wrapped to the width."""
    width, line_px = tile * len(heads), 12  # the default font is 10 px high
    measure, lines = ImageDraw.Draw(Image.new("RGB", (1, 1))), []
    for word in title.split():
        if lines and measure.textlength(f"{lines[-1]} {word}") <= width - 4:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    top = line_px * (len(lines) + 1) + 4
    sheet = Image.new("RGB", (width, top + tile * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(lines):
        draw.text((2, 2 + i * line_px), text, fill="black")
    for c, head in enumerate(heads):
        draw.text((c * tile + 2, 2 + len(lines) * line_px), head, fill="black")
    for r, row in enumerate(rows):
        for c, pic in enumerate(row):
            pic = Image.fromarray(np.asarray(pic).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
            sheet.paste(pic, (c * tile, top + r * tile))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, ".png") as tmp:  # like every other output
        sheet.save(tmp)
