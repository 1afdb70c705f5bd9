"""Train DBNet++ on ICDAR 2015 (MMOCR's recipe) or the tiny preset on synthetic text.

One process (CPU or one GPU):

    python examples/train.py --preset tiny --work-dir runs/tiny          # synthetic text, CPU: H-mean 0.9 within 5 min
    python examples/train.py --preset dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015 --data data/icdar2015 \\
        --work-dir runs/dbnetpp       # MMOCR's recipe: ImageNet backbone, then its SynthText-pretrained model

Several processes with torchrun (NCCL on GPUs, Gloo on the CPU):

    torchrun --nproc_per_node 8 examples/train.py --data data/icdar2015 --work-dir runs/dbnetpp --load-from ...
    torchrun --nproc_per_node 2 examples/train.py --preset tiny --epochs 1 --work-dir runs/tiny_ddp

``--preset`` takes every MMOCR DBNet / DBNet++ config name (``dbnetpp.config.RECIPES``).
``--batch-size`` is per process. The MMOCR recipes keep their LR whatever the number of
processes (as MMOCR does without ``--auto-scale-lr``); ``--auto-scale-lr`` scales it linearly
with the total batch, lr = lr * nproc * batch_size / base batch (16). The tiny presets scale by
default; ``--no-scale-lr`` keeps the configured value. The LR used is printed and logged.

Resume exactly (model, optimiser, step, epoch and batch, RNG states, AMP scaler, best H-mean):

    python examples/train.py --data data/icdar2015 --work-dir runs/dbnetpp --resume runs/dbnetpp/last.pth

On a cluster, one command line for the first start and every restart (``--resume auto``:
the newest checkpoint in ``--work-dir`` if there is one, else a fresh start):

    torchrun --nnodes 2 --nproc_per_node 8 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint $HEAD:29400 --rdzv-id $JOB examples/train.py --data data/icdar2015 \
        --work-dir runs/dbnetpp --resume auto --save-interval-iters 500 --keep-last 3

SIGTERM (preemption) stops every rank after its current iteration; rank 0 writes a
mid-epoch ``last.pth`` and all exit with status 143, which torchrun (or the scheduler)
answers with a restart that continues at the next batch. A rank that dies or hangs ends
every other rank after ``--dist-timeout`` seconds with a message naming it and the step.

Evaluate only:

    python examples/train.py --data data/icdar2015 --load-from runs/dbnetpp/best.pth --test-only

Everything a run writes goes to ``--work-dir``: ``config.json``, ``log.jsonl`` (one JSON
line per logging step, evaluation and resume), ``last.pth``, ``best.pth``, ``epoch_N.pth``,
``iter_N.pth``, ``curves.png`` and ``samples/epoch_N.jpg`` (the first 4 held-out images after each
evaluation: matched detections green, false positives red, missed ground truth yellow, ``###``
grey). Bad input ends with one ``error: ...`` line and status 1 (``DBNETPP_DEBUG=1`` shows the
traceback).
"""

import argparse
import dataclasses
import json
import math
import os

# On a shared CPU, spinning OpenMP threads stall each other (a 5x slower step was measured
# on a busy 2-core machine); sleeping threads cost next to nothing when the CPU is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset

from dbnetpp import distributed as dist_utils
from dbnetpp.allocator import keep_freed_memory
from dbnetpp.checkpoint import (
    CheckpointError,
    get_rng_state,
    load_model_weights,
    read_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from dbnetpp.cli import error_line
from dbnetpp.compile import compile_model
from dbnetpp.config import AMP_DTYPES, OPTIMIZERS, PRESETS, Config, get_config
from dbnetpp.data import SyntheticText, TestDataset, TrainDataset, collate_test, collate_train, open_dataset
from dbnetpp.ema import WeightEMA
from dbnetpp.engine import (
    NonFiniteLossError,
    build_optimizer,
    evaluate,
    inference_model,
    make_grad_scaler,
    scaled_lr,
    train_one_epoch,
)
from dbnetpp.loss import DBLoss
from dbnetpp.meters import JsonlLogger, plot_log
from dbnetpp.metric import HmeanIoU
from dbnetpp.models.dbnet import MODEL_NAMES, build_model
from dbnetpp.postprocess import DBPostProcessor
from dbnetpp.preemption import PREEMPTED_EXIT_STATUS, Preempted, PreemptionHandler
from dbnetpp.pretrained import initialize
from dbnetpp.resume import check_training_checkpoint, find_resume_checkpoint, resume_position
from dbnetpp.sampler import ResumableSampler
from dbnetpp.schedules import lr_at_step, schedule_length
from dbnetpp.visualize import save_evaluation_grid

SAMPLE_IMAGES = 4  # held-out images drawn in work_dir/samples/epoch_N.jpg after each evaluation


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DBNet++ training", add_help=add_help)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="MMOCR config name or CPU preset "
                        "(default: mmocr = dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015)")
    p.add_argument("--data", default=None, help="ICDAR 2015 root; without it: synthetic text")
    p.add_argument("--work-dir", default="work_dirs/dbnetpp", help="where logs, checkpoints and plots go")
    p.add_argument("--model", default=None, choices=MODEL_NAMES, help="detector (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="schedule length (the poly LR uses it)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="iteration-based run: this many optimiser steps (the schedule counts iterations)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--lr", type=float, default=None, help="LR for the preset's base batch, before scaling")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--no-scale-lr", action="store_true", help="do not scale the LR by total batch / base batch")
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale the LR by total batch / base batch (MMOCR's flag; the recipes do not by default)")
    p.add_argument("--clip-grad", type=float, default=None, help="max gradient L2 norm")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="evaluate and save an EMA of the weights with this decay (0: off; --preset tiny uses 0.995)")
    p.add_argument("--amp", choices=AMP_DTYPES, default=None, help="autocast dtype (fp16 uses a GradScaler)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format: faster on CUDA and on the CPU (default: the preset's)")
    p.add_argument("--train-size", type=int, default=None, help="square training crop side, pixels")
    p.add_argument("--test-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"))
    p.add_argument("--synthetic-images", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"),
                   help="synthetic set sizes when there is no --data")
    p.add_argument("--eval-interval", type=int, default=None,
                   help="epochs (iterations with --max-iters) between evaluations; 0: never")
    p.add_argument("--save-interval", type=int, default=None, help="epochs between epoch_N.pth checkpoints")
    p.add_argument("--save-interval-iters", type=int, default=None,
                   help="also write iter_N.pth every N optimiser steps (N counts steps of the whole run)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="keep only the newest K epoch_N.pth and K iter_N.pth (last.pth and best.pth stay)")
    p.add_argument("--log-interval", type=int, default=None, help="iterations between log lines")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: cores / processes on this node)")
    p.add_argument("--seed", type=int, default=None, help="base seed; each rank adds its rank")
    p.add_argument("--no-keep-memory", action="store_true",
                   help="CPU: leave glibc malloc's defaults (see dbnetpp.allocator)")
    p.add_argument("--load-from", default=None,
                   help="initial weights only (dbnetpp, MMOCR or torchvision checkpoint); sets model.load_from")
    p.add_argument("--no-pretrained", action="store_true",
                   help="skip the initialisation (model.backbone_init, model.load_from) of a fresh start")
    p.add_argument("--resume", default=None,
                   help="a dbnetpp checkpoint to continue exactly, or 'auto': the newest in --work-dir, else fresh")
    p.add_argument("--dist-timeout", type=float, default=dist_utils.DEFAULT_TIMEOUT_S,
                   help="seconds a collective (or a training step) may wait for the other ranks")
    p.add_argument("--test-only", action="store_true", help="evaluate and exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training model and the loss, each as one graph (default backend: "
                        "inductor; on the CPU with eager's convolution and BatchNorm kernels, see README)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot mean anything (ValueError)."""
    if args.resume and args.load_from:
        raise ValueError("--resume restores the model: drop --load-from (or --resume to start from its weights)")
    if args.test_only and args.resume:
        raise ValueError("--test-only evaluates --load-from weights; it does not take --resume")
    if args.max_iters is not None and args.epochs is not None:
        raise ValueError("--max-iters makes the run iteration-based: drop --epochs")
    if args.no_scale_lr and args.auto_scale_lr:
        raise ValueError("--no-scale-lr and --auto-scale-lr contradict each other: give one")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0, got {args.dist_timeout}")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = _config_from_args(args)
    if args.ema_decay == 0:  # off, whatever the preset says
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=None))
    return cfg


def _config_from_args(args: argparse.Namespace) -> Config:
    return get_config(
        args.preset,
        model={
            "name": args.model,
            "sync_bn": args.sync_bn or None,
            "channels_last": args.channels_last,
            "load_from": args.load_from,
        },
        data={
            "root": args.data,
            "workers": args.workers,
            "train_size": args.train_size,
            "test_scale": args.test_scale,
            "synthetic_train_images": args.synthetic_images[0] if args.synthetic_images else None,
            "synthetic_test_images": args.synthetic_images[1] if args.synthetic_images else None,
        },
        train={
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "scale_lr": False if args.no_scale_lr else (True if args.auto_scale_lr else None),
            "clip_grad": args.clip_grad,
            "amp": args.amp,
            "eval_interval": args.eval_interval,
            "save_interval": args.save_interval,
            "max_iters": args.max_iters,
            "save_interval_iters": args.save_interval_iters,
            "keep_last": args.keep_last,
            "keep_memory": False if args.no_keep_memory else None,
            "ema_decay": args.ema_decay or None,
            "log_interval": args.log_interval,
            "seed": args.seed,
        },
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id, base_seed drawn from the
    # (per-rank seeded) main-process RNG: distinct per rank, per worker and per epoch.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _identity(x: Any) -> Any:
    return x


def materialize(source: Any, info: dist_utils.DistInfo) -> List[Dict[str, Any]]:
    """All samples of ``source`` in a list, made once: split over the ranks, and within a
    rank over worker processes (one per core this rank owns), then gathered."""
    shard = Subset(source, range(info.rank, len(source), info.world_size))
    workers = max(1, (os.cpu_count() or 1) // info.local_world_size) if len(shard) > 16 else 0
    loader = DataLoader(shard, batch_size=None, num_workers=workers, collate_fn=_identity)
    parts = dist_utils.all_gather_object(list(loader))
    samples: List[Dict[str, Any]] = [None] * len(source)  # type: ignore[list-item]
    for rank, part in enumerate(parts):
        samples[rank :: info.world_size] = part
    return samples


def build_sources(cfg: Config, info: dist_utils.DistInfo, train: bool = True) -> Tuple[Any, Any]:
    """(train, test) sources: the ``data.kind`` dataset under ``root``, or synthetic text (held-out seed).

    The train source is None when ``train`` is False; SynthText, which has no test split, gets an
    empty one (its recipes never evaluate).
    """
    d = cfg.data
    if d.root is not None:
        train_source = open_dataset(d.root, "train", d.kind, fix_polygons=d.fix_polygons) if train else None
        no_test = d.kind == "synthtext" and cfg.train.eval_interval == 0
        return train_source, [] if no_test else open_dataset(d.root, "test", d.kind, fix_polygons=d.fix_polygons)
    kwargs = dict(size=d.synthetic_size, words_per_image=tuple(d.synthetic_words))
    # Drawing an image costs ~60 ms: make each set once, not once per epoch.
    test_set = materialize(SyntheticText(d.synthetic_test_images, seed=d.synthetic_test_seed, **kwargs), info)
    if not train:
        return None, test_set
    train_set = materialize(SyntheticText(d.synthetic_train_images, seed=d.synthetic_train_seed, **kwargs), info)
    return train_set, test_set


def set_threads(info: dist_utils.DistInfo, threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif info.local_world_size > 1:
        # Processes sharing a CPU split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))


def initialize_model(
    model: nn.Module, cfg: Config, info: dist_utils.DistInfo, progress: bool, pretrained: bool, load_from: Optional[str]
) -> None:
    """MMOCR's start: cfg.model.backbone_init, then cfg.model.load_from (``load_from``, the user's
    --load-from, replaces the recipe's; ``pretrained=False`` skips the recipe's files). Rank 0
    goes first (it downloads), the others follow from the cache."""
    messages = []
    if info.is_main:
        messages = initialize(model, cfg, pretrained=pretrained, progress=progress, load_from=load_from)
    dist_utils.barrier()
    if not info.is_main:
        initialize(model, cfg, pretrained=pretrained, progress=False, load_from=load_from)
    for message in messages:
        print(message)


def resolve_resume(args: argparse.Namespace, info: dist_utils.DistInfo) -> Optional[str]:
    """The checkpoint to continue from: ``--resume`` as given, or for 'auto' rank 0's pick (or None)."""
    if args.resume != "auto":
        return args.resume
    found, refused = None, None
    if info.is_main:
        try:
            found = find_resume_checkpoint(args.work_dir)
        except CheckpointError as e:  # the newest checkpoint is unreadable: never start over it
            refused = str(e)
    found, refused = dist_utils.broadcast_object((None if found is None else str(found), refused))
    if refused:
        raise CheckpointError(refused)
    if info.is_main:
        print(f"resume auto: continuing from {found}" if found else f"resume auto: no checkpoint in {args.work_dir}, "
              "starting fresh")
    return found


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or only evaluate) as ``args`` say; returns the last evaluation (may be empty)."""
    start_time = time.perf_counter()
    check_args(args)
    cfg = config_from_args(args)  # bad values fail before any process group exists
    info = dist_utils.init_distributed(args.device, timeout_s=args.dist_timeout)
    try:
        return _run(args, cfg, info, start_time)
    finally:
        dist_utils.cleanup()


def _run(args: argparse.Namespace, cfg: Config, info: dist_utils.DistInfo, start_time: float) -> Dict[str, Any]:
    device = info.device
    set_threads(info, args.threads)
    seed_everything(cfg.train.seed + info.rank)
    progress = info.is_main and not args.no_progress
    if device.type == "cpu" and cfg.train.keep_memory:
        keep_freed_memory()  # activations are reused instead of page-faulted in every step
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (use --amp bf16 on the CPU)")
    if cfg.model.sync_bn and device.type != "cuda" and info.world_size > 1:
        raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU")
    if cfg.data.root is not None and not Path(cfg.data.root).is_dir():
        raise FileNotFoundError(f"--data: no such directory: {cfg.data.root}")

    work_dir = Path(args.work_dir)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(work_dir / "log.jsonl" if info.is_main else None)

    # resume: read (and check) the checkpoint before anything slow happens
    resume_from = resolve_resume(args, info)
    checkpoint = read_checkpoint(resume_from) if resume_from else None
    if checkpoint is not None:
        check_training_checkpoint(checkpoint, resume_from, model_name=cfg.model.name)

    # LR: linear scaling by the total batch; every step's value comes from the schedule
    total_batch = cfg.train.batch_size * info.world_size
    lr_scale = total_batch / cfg.train.base_batch_size if cfg.train.scale_lr else 1.0
    lr = scaled_lr(cfg.train.lr, total_batch, cfg.train.base_batch_size) if cfg.train.scale_lr else cfg.train.lr
    run_facts = {
        "world_size": info.world_size,
        "device": str(device),
        "total_batch_size": total_batch,
        "lr_scaled": lr,
        "threads": torch.get_num_threads(),
    }
    config = {**cfg.to_dict(), "run": run_facts}
    if info.is_main:
        print(json.dumps(config, indent=2))
        print(f"lr {lr:g} = {cfg.train.lr:g} x total batch {total_batch} / {cfg.train.base_batch_size}"
              if cfg.train.scale_lr else f"lr {lr:g} (not scaled, total batch {total_batch})")
        (work_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        logger.log({"type": "config", **run_facts})

    # data
    train_source, test_source = build_sources(cfg, info, train=not args.test_only)
    distributed = info.world_size > 1
    loader_kwargs = dict(num_workers=cfg.data.workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker)
    test_set = TestDataset(test_source, scale=tuple(cfg.data.test_scale))
    test_sampler = DistributedSampler(test_set, shuffle=False) if distributed else SequentialSampler(test_set)
    test_loader = DataLoader(
        test_set, batch_size=cfg.train.batch_size, sampler=test_sampler, collate_fn=collate_test, **loader_kwargs
    )
    if train_source is not None:
        train_set = TrainDataset(train_source, size=cfg.data.train_size, seed=cfg.train.seed,
                                 min_side_ratio=cfg.data.crop_min_side_ratio)
        # DistributedSampler's order, in one process too, and able to start an epoch part-way
        train_sampler = ResumableSampler(len(train_set), info.world_size, info.rank, shuffle=True, seed=cfg.train.seed)
        # The loader draws its workers' base seed from its own generator, re-seeded every epoch:
        # a run resumed mid-epoch gets the same seeds and leaves the global RNG as it was saved.
        # No persistent workers: each epoch's iterator starts from that seed.
        loader_rng = torch.Generator()
        train_loader = DataLoader(
            train_set, batch_size=cfg.train.batch_size, sampler=train_sampler, collate_fn=collate_train,
            generator=loader_rng, **loader_kwargs,
        )  # fmt: skip
        iters_per_epoch = math.ceil(train_sampler.num_samples / cfg.train.batch_size)

    # model
    model = build_model(cfg.model.name)
    if checkpoint is not None:
        load_model_weights(model, checkpoint, averaged=False)  # the trained weights; the EMA follows
    else:
        initialize_model(model, cfg, info, progress, pretrained=not args.no_pretrained, load_from=args.load_from)
    model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.sync_bn and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if args.compile:  # the module inside DDP is compiled (DDP's own forward is not traceable whole)
        model = compile_model(model, backend=args.compile)
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # the evaluated (and, in checkpoints, inference) weights: an EMA of the trained ones, if asked
    ema = WeightEMA(model_without_ddp, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if ema is not None and checkpoint is not None and checkpoint.get("ema"):
        ema.load_state_dict(checkpoint["ema"])
    optimizer = build_optimizer(model_without_ddp, cfg.train.optimizer, lr, cfg.train.momentum, cfg.train.weight_decay)
    scaler = make_grad_scaler(device, enabled=cfg.train.amp == "fp16")
    criterion = DBLoss()
    if args.compile:  # compiled once; checkpoints keep saving model_without_ddp (no "_orig_mod." keys)
        criterion = compile_model(criterion, backend=args.compile)
    postprocessor = DBPostProcessor(text_repr_type=cfg.model.text_repr_type, epsilon_ratio=cfg.model.epsilon_ratio)

    start_epoch, start_iter, global_step, best_hmean = 0, 0, 0, -1.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])  # an old "lr_scheduler" entry is not needed
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_iter, global_step = resume_position(
            checkpoint, iters_per_epoch, info.rank, info.world_size
        )
        best_hmean = float(checkpoint.get("best_hmean", -1.0))
        rng = checkpoint.get("rng") or []
        if len(rng) == info.world_size:
            set_rng_state(rng[info.rank])
        else:
            warnings.warn(f"checkpoint has RNG states for {len(rng)} processes, this run has {info.world_size}")
        if info.is_main:
            print(f"resumed from {resume_from}: epoch {start_epoch}, iteration {start_iter}, step {global_step}, "
                  f"best H-mean {best_hmean:.4f}")
    if args.resume and info.is_main:
        logger.log({"type": "resume", "from": resume_from, "epoch": start_epoch, "iter": start_iter,
                    "step": global_step})

    def run_evaluation(epoch: int) -> Dict[str, Any]:
        result = evaluate(
            inference_model(model_without_ddp if ema is None else ema.module),
            test_loader,
            device,
            postprocessor,
            HmeanIoU,
            amp=cfg.train.amp,
            channels_last=cfg.model.channels_last,
            progress=progress,
            keep_predictions=range(min(SAMPLE_IMAGES, len(test_set))),
        )
        predictions = result.pop("predictions")
        if info.is_main:  # the same held-out images every time, drawn as the metric scores them
            save_evaluation_grid(work_dir / "samples" / f"epoch_{epoch + 1}.jpg", test_source, predictions,
                                 result["score_thr"])
        record = {"type": "eval", "epoch": epoch, **result, "elapsed_s": time.perf_counter() - start_time}
        logger.log(record)
        if info.is_main:
            print(f"eval epoch {epoch}: P {result['precision']:.4f} R {result['recall']:.4f} "
                  f"H {result['hmean']:.4f} ({result['num_images']} images, {result['eval_s']:.1f} s)")
        return result

    if args.test_only:
        return run_evaluation(start_epoch - 1)

    def save(epoch: int, iter_in_epoch: int, step: int, names: List[str], finished: bool) -> Optional[Path]:
        """Checkpoint after ``iter_in_epoch`` batches of ``epoch`` and ``step`` optimiser steps, to
        last.pth plus ``names``; ``finished``: the epoch is over (evaluated, saved), else a resume
        continues it at batch ``iter_in_epoch``. A collective: every rank calls it."""
        full = finished
        per_rank = {"rng": get_rng_state(), "sampler": train_sampler.state(0)}
        per_rank["sampler"]["position"] = min(iter_in_epoch * cfg.train.batch_size, train_sampler.num_samples)
        gathered = dist_utils.all_gather_object(per_rank)  # every rank's, for an exact resume
        if not info.is_main:
            return None
        state = {
            "model": model_without_ddp.state_dict(),
            "model_name": cfg.model.name,
            "config": config,
            "epoch": epoch if full else epoch - 1,  # last finished epoch
            "iter_in_epoch": 0 if full else iter_in_epoch,  # batches of the next epoch already done
            "global_step": step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": [g["rng"] for g in gathered],
            "sampler": [g["sampler"] for g in gathered],
            "best_hmean": best_hmean,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(state, [work_dir / "last.pth", *(work_dir / n for n in names)])
        if cfg.train.keep_last is not None:
            rotate_checkpoints(work_dir, cfg.train.keep_last)
        return work_dir / "last.pth"

    iteration_based = cfg.train.max_iters is not None
    total_steps = schedule_length(cfg, iters_per_epoch)
    eval_every = cfg.train.eval_interval

    def lr_at(step: int) -> float:
        return lr_at_step(cfg, step, iters_per_epoch) * lr_scale

    def after_step(iter_in_epoch: int, step: int) -> None:
        nonlocal result, best_hmean
        if ema is not None:
            ema.update(model_without_ddp)
        every = cfg.train.save_interval_iters
        if every is not None and step % every == 0 and step < total_steps:
            save(epoch, iter_in_epoch, step, [f"iter_{step}.pth"], finished=False)
        if iteration_based and eval_every > 0 and (step % eval_every == 0 or step == total_steps):
            result = run_evaluation(epoch)
            if result["hmean"] > best_hmean:
                best_hmean = result["hmean"]
                save(epoch, iter_in_epoch, step, ["best.pth"], finished=False)

    preemption = PreemptionHandler(rank=info.rank).install()
    watchdog = dist_utils.StepWatchdog(info.rank, args.dist_timeout, enabled=distributed)
    result: Dict[str, Any] = {}
    epoch = start_epoch
    try:
        while global_step < total_steps and (iteration_based or epoch < cfg.train.epochs):
            train_sampler.set_epoch(epoch, start=min(start_iter * cfg.train.batch_size, train_sampler.num_samples))
            train_set.set_epoch(epoch)
            loader_rng.manual_seed(cfg.train.seed * 1_000_003 + epoch * 7919 + info.rank)
            summary = train_one_epoch(
                model,
                criterion,
                optimizer,
                train_loader,
                device,
                epoch,
                scaler=scaler,
                amp=cfg.train.amp,
                clip_grad=cfg.train.clip_grad,
                channels_last=cfg.model.channels_last,
                log_interval=cfg.train.log_interval,
                logger=logger,
                start_time=start_time,
                progress=progress,
                lr_at=lr_at,
                start_iter=start_iter,
                global_step=global_step,
                iters_per_epoch=iters_per_epoch,
                max_steps=total_steps,
                stop_requested=lambda: preemption.requested,
                after_step=after_step,
                watchdog=watchdog,
            )
            global_step, start_iter = summary["global_step"], 0
            if info.is_main and summary["iterations"]:
                print(f"epoch {epoch}: loss {summary['loss']:.4f}, {summary['images_per_s']:.1f} images/s, "
                      f"{time.perf_counter() - start_time:.0f} s")
            if summary["stopped"]:
                # a half-done epoch, or a whole one not yet evaluated and saved: resume redoes the rest
                where = f"epoch {epoch}, iteration {summary['iter_in_epoch']} (step {global_step})"
                path = save(epoch, summary["iter_in_epoch"], global_step, [], finished=False)
                raise Preempted(str(path) if path else None, where)
            if not summary["epoch_done"]:  # iteration-based run ended part-way through an epoch
                save(epoch, summary["iter_in_epoch"], global_step, [], finished=False)
                break

            done = epoch + 1
            is_best = False
            if not iteration_based and eval_every > 0 and (done % eval_every == 0 or done == cfg.train.epochs):
                result = run_evaluation(epoch)
                is_best = result["hmean"] > best_hmean
                best_hmean = max(best_hmean, result["hmean"])
            names = ["best.pth"] if is_best else []
            if not iteration_based and done % cfg.train.save_interval == 0:
                names.append(f"epoch_{done}.pth")
            save(epoch, iters_per_epoch, global_step, names, finished=True)
            if info.is_main:
                plot_log(work_dir / "log.jsonl", work_dir / "curves.png")
            epoch += 1
    except (NonFiniteLossError, Preempted):
        raise
    except RuntimeError as e:
        if not distributed:
            raise
        # a peer died or hangs (Gloo raises at once or after the timeout): name it and the step
        raise RankFailure(dist_utils.report_failure(info.rank, watchdog.where, error_line(e))) from e
    finally:
        watchdog.disarm()
        preemption.restore()

    if info.is_main:
        plot_log(work_dir / "log.jsonl", work_dir / "curves.png")
        print(f"done in {time.perf_counter() - start_time:.0f} s; best H-mean {best_hmean:.4f}; outputs in {work_dir}")
    return result


class RankFailure(RuntimeError):
    """Another rank died or hangs; the message names it and the step."""


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: parse, train; returns the exit status.

    0 when done; 143 after a SIGTERM (checkpoint written: torchrun's restart continues with
    ``--resume auto``); 1 with one ``error: ...`` line on bad input, a non-finite loss or a
    lost rank (``DBNETPP_DEBUG=1``: the traceback instead).
    """
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except Preempted as e:
        print(f"preempted: {e}; exiting with status {PREEMPTED_EXIT_STATUS} to be restarted", file=sys.stderr)
        return PREEMPTED_EXIT_STATUS
    except NonFiniteLossError as e:
        print(f"error: {e}; the last good checkpoint is {Path(args.work_dir) / 'last.pth'}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:  # CheckpointError is a ValueError
        if os.environ.get("DBNETPP_DEBUG"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
