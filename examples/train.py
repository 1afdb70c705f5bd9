"""Train DBNet++ on ICDAR 2015 (MMOCR's recipe) or the tiny preset on synthetic text.

One process (CPU or one GPU):

    python examples/train.py --preset tiny --work-dir runs/tiny          # synthetic text, CPU: H-mean > 0.8 in ~4 min
    python examples/train.py --data data/icdar2015 --work-dir runs/dbnetpp \\
        --load-from dbnetpp_r50dcnv2_fpnc_100k_iter_synthtext-20220502-352fec8a.pth

Several processes with torchrun (NCCL on GPUs, Gloo on the CPU):

    torchrun --nproc_per_node 8 examples/train.py --data data/icdar2015 --work-dir runs/dbnetpp --load-from ...
    torchrun --nproc_per_node 2 examples/train.py --preset tiny --epochs 1 --work-dir runs/tiny_ddp

``--batch-size`` is per process. The recipe's LR (0.007 for 16 images) is scaled
linearly with the total batch, lr = 0.007 * nproc * batch_size / 16 (8 GPUs x 16 images:
0.056); ``--no-scale-lr`` keeps the configured value. The scaled LR is printed and logged.

Resume exactly (model, optimiser, schedule, epoch, RNG states, AMP scaler, best H-mean):

    python examples/train.py --data data/icdar2015 --work-dir runs/dbnetpp --resume runs/dbnetpp/last.pth

Evaluate only:

    python examples/train.py --data data/icdar2015 --load-from runs/dbnetpp/best.pth --test-only

Everything a run writes goes to ``--work-dir``: ``config.json``, ``log.jsonl`` (one JSON
line per logging step and per evaluation), ``last.pth``, ``best.pth``, ``epoch_N.pth``,
``curves.png`` and ``samples/epoch_N.jpg`` (the first 4 held-out images after each evaluation:
matched detections green, false positives red, missed ground truth yellow, ``###`` grey).
"""

import argparse
import json
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
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, Subset

from dbnetpp import distributed as dist_utils
from dbnetpp.allocator import keep_freed_memory
from dbnetpp.checkpoint import get_rng_state, load_model_weights, read_checkpoint, save_checkpoint, set_rng_state
from dbnetpp.config import AMP_DTYPES, OPTIMIZERS, PRESETS, Config, get_config
from dbnetpp.data import ICDAR2015, SyntheticText, TestDataset, TrainDataset, collate_test, collate_train
from dbnetpp.engine import (
    NonFiniteLossError,
    PolyLR,
    build_optimizer,
    evaluate,
    inference_model,
    scaled_lr,
    train_one_epoch,
)
from dbnetpp.loss import DBLoss
from dbnetpp.meters import JsonlLogger, plot_log
from dbnetpp.metric import HmeanIoU
from dbnetpp.models.dbnet import MODEL_NAMES, build_model
from dbnetpp.postprocess import DBPostProcessor
from dbnetpp.visualize import save_evaluation_grid

SAMPLE_IMAGES = 4  # held-out images drawn in work_dir/samples/epoch_N.jpg after each evaluation


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DBNet++ training", add_help=add_help)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named config (default: MMOCR recipe)")
    p.add_argument("--data", default=None, help="ICDAR 2015 root; without it: synthetic text")
    p.add_argument("--work-dir", default="work_dirs/dbnetpp", help="where logs, checkpoints and plots go")
    p.add_argument("--model", default=None, choices=MODEL_NAMES, help="detector (default dbnetpp_resnet50_dcnv2)")
    p.add_argument("--epochs", type=int, default=None, help="schedule length (the poly LR uses it)")
    p.add_argument("--batch-size", type=int, default=None, help="images per process")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    p.add_argument("--lr", type=float, default=None, help="LR for the preset's base batch, before scaling")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--no-scale-lr", action="store_true", help="do not scale the LR by total batch / base batch")
    p.add_argument("--clip-grad", type=float, default=None, help="max gradient L2 norm")
    p.add_argument("--amp", choices=AMP_DTYPES, default=None, help="autocast dtype (fp16 uses a GradScaler)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (CUDA)")
    p.add_argument("--train-size", type=int, default=None, help="square training crop side, pixels")
    p.add_argument("--test-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"))
    p.add_argument("--synthetic-images", type=int, nargs=2, default=None, metavar=("TRAIN", "TEST"),
                   help="synthetic set sizes when there is no --data")
    p.add_argument("--eval-interval", type=int, default=None, help="epochs between evaluations")
    p.add_argument("--save-interval", type=int, default=None, help="epochs between epoch_N.pth checkpoints")
    p.add_argument("--log-interval", type=int, default=None, help="iterations between log lines")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: cores / processes on this node)")
    p.add_argument("--seed", type=int, default=None, help="base seed; each rank adds its rank")
    p.add_argument("--no-keep-memory", action="store_true",
                   help="CPU: leave glibc malloc's defaults (see dbnetpp.allocator)")
    p.add_argument("--load-from", default=None, help="weights only: dbnetpp, MMOCR or torchvision checkpoint")
    p.add_argument("--resume", default=None, help="a dbnetpp checkpoint to continue exactly")
    p.add_argument("--test-only", action="store_true", help="evaluate and exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return get_config(
        args.preset,
        model={"name": args.model, "sync_bn": args.sync_bn or None, "channels_last": args.channels_last or None},
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
            "scale_lr": False if args.no_scale_lr else None,
            "clip_grad": args.clip_grad,
            "amp": args.amp,
            "eval_interval": args.eval_interval,
            "save_interval": args.save_interval,
            "keep_memory": False if args.no_keep_memory else None,
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
    """(train, test) sources: ICDAR 2015 under ``root``, or synthetic text (held-out seed).

    The train source is None when ``train`` is False.
    """
    d = cfg.data
    if d.root is not None:
        return (ICDAR2015(d.root, "train") if train else None), ICDAR2015(d.root, "test")
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


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or only evaluate) as ``args`` say; returns the last evaluation (may be empty)."""
    start_time = time.perf_counter()
    info = dist_utils.init_distributed(args.device)
    try:
        return _run(args, info, start_time)
    finally:
        dist_utils.cleanup()


def _run(args: argparse.Namespace, info: dist_utils.DistInfo, start_time: float) -> Dict[str, Any]:
    cfg = config_from_args(args)
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

    work_dir = Path(args.work_dir)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(work_dir / "log.jsonl" if info.is_main else None)

    # LR: linear scaling by the total batch
    total_batch = cfg.train.batch_size * info.world_size
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
        train_set = TrainDataset(train_source, size=cfg.data.train_size, seed=cfg.train.seed)
        if distributed:
            train_sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.train.seed)
        else:
            train_sampler = RandomSampler(train_set)
        # No persistent workers: a new iterator per epoch draws its seeds from the restored RNG
        # in a resumed run exactly as in an uninterrupted one (persistent ones draw them once).
        train_loader = DataLoader(
            train_set, batch_size=cfg.train.batch_size, sampler=train_sampler, collate_fn=collate_train, **loader_kwargs
        )

    # model
    model = build_model(cfg.model.name)
    if args.load_from and args.resume:
        warnings.warn("--resume restores the model: --load-from is ignored")
    elif args.load_from:
        fmt = load_model_weights(model, args.load_from)
        if info.is_main:
            print(f"loaded weights ({fmt}) from {args.load_from}")
    checkpoint = read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        load_model_weights(model, checkpoint)
    model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.sync_bn and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    optimizer = build_optimizer(model_without_ddp, cfg.train.optimizer, lr, cfg.train.momentum, cfg.train.weight_decay)
    lr_scheduler = PolyLR(optimizer, cfg.train.epochs, power=cfg.train.lr_power, eta_min=cfg.train.lr_min)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    criterion = DBLoss()
    postprocessor = DBPostProcessor(text_repr_type="quad", epsilon_ratio=0.002)

    start_epoch, best_hmean = 0, -1.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if lr_scheduler.total_epochs != cfg.train.epochs:
            warnings.warn(f"schedule length {lr_scheduler.total_epochs} in the checkpoint, {cfg.train.epochs} now")
            lr_scheduler.total_epochs = cfg.train.epochs
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = int(checkpoint["epoch"]) + 1
        best_hmean = float(checkpoint.get("best_hmean", -1.0))
        rng = checkpoint.get("rng") or []
        if len(rng) == info.world_size:
            set_rng_state(rng[info.rank])
        else:
            warnings.warn(f"checkpoint has RNG states for {len(rng)} processes, this run has {info.world_size}")
        if info.is_main:
            print(f"resumed from {args.resume}: epoch {start_epoch}, best H-mean {best_hmean:.4f}")

    def run_evaluation(epoch: int) -> Dict[str, Any]:
        result = evaluate(
            inference_model(model_without_ddp),
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

    result: Dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        if isinstance(train_sampler, DistributedSampler):
            train_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
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
        )
        lr_scheduler.step()
        if info.is_main:
            print(f"epoch {epoch}: loss {summary['loss']:.4f}, {summary['images_per_s']:.1f} images/s, "
                  f"{time.perf_counter() - start_time:.0f} s")

        done = epoch + 1
        is_best = False
        if done % cfg.train.eval_interval == 0 or done == cfg.train.epochs:
            result = run_evaluation(epoch)
            is_best = result["hmean"] > best_hmean
            best_hmean = max(best_hmean, result["hmean"])

        rng = dist_utils.all_gather_object(get_rng_state())  # every rank's, for an exact resume
        if info.is_main:
            state = {
                "model": model_without_ddp.state_dict(),
                "model_name": cfg.model.name,
                "config": config,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
                "best_hmean": best_hmean,
            }
            paths = [work_dir / "last.pth"]
            if is_best:
                paths.append(work_dir / "best.pth")
            if done % cfg.train.save_interval == 0:
                paths.append(work_dir / f"epoch_{done}.pth")
            save_checkpoint(state, paths)
            plot_log(work_dir / "log.jsonl", work_dir / "curves.png")

    if info.is_main:
        print(f"done in {time.perf_counter() - start_time:.0f} s; best H-mean {best_hmean:.4f}; outputs in {work_dir}")
    return result


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: parse, train; exit status 1 (and a message) on a non-finite loss."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except NonFiniteLossError as e:
        print(f"error: {e}; the last good checkpoint is {Path(args.work_dir) / 'last.pth'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
