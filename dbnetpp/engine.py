"""One training epoch, one evaluation pass and the optimiser.

``train_one_epoch`` and ``evaluate`` follow torchvision's ``references/detection``:
losses come back as a named dict summed once by the criterion, the reduced values are
only for logging and for the non-finite check (done on the all-reduced loss, so every
rank stops at the same iteration), autocast and the GradScaler are always present but
disabled unless AMP is asked for, so the step has no branches. The learning rate is a
function of the optimiser step (``lr_at``, from ``dbnetpp.schedules``), set before every
step, so a run can stop and resume at any step.
"""

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dbnetpp.schedules import learning_rates, lr_at_step  # noqa: F401  (public: dbnetpp.engine.learning_rates)

from . import distributed as dist_utils
from .meters import JsonlLogger, SmoothedValue

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; names the epoch and iteration (both 0-based)."""

    def __init__(self, epoch: int, iteration: int, losses: Mapping[str, float]) -> None:
        self.epoch = epoch
        self.iteration = iteration
        self.losses = dict(losses)
        parts = ", ".join(f"{k}={v}" for k, v in self.losses.items())
        super().__init__(f"non-finite loss at epoch {epoch}, iteration {iteration} ({parts}); training stopped")


# --- optimiser and schedule ---------------------------------------------------------


def scaled_lr(base_lr: float, total_batch_size: int, base_batch_size: int = 16) -> float:
    """Linear scaling rule: ``base_lr * total_batch_size / base_batch_size``."""
    if total_batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got total={total_batch_size}, base={base_batch_size}")
    return base_lr * total_batch_size / base_batch_size


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """SGD (MMOCR: momentum 0.9, decay 1e-4 on every parameter, BN and biases included),
    Adam or AdamW over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


# --- training -----------------------------------------------------------------------


def autocast_context(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in {"bf16", "fp16"}, or a null context."""
    if amp is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def make_grad_scaler(device: torch.device, enabled: bool) -> Any:
    """A GradScaler for ``device`` (``enabled``: fp16 training). ``torch.amp.GradScaler`` from
    torch 2.3; on torch 2.1 / 2.2 ``torch.cuda.amp.GradScaler``, which scales on CUDA only."""
    scaler_class = getattr(torch.amp, "GradScaler", None)
    if scaler_class is not None:
        return scaler_class(device.type, enabled=enabled)
    if enabled and device.type != "cuda":
        raise ValueError(f"fp16 gradient scaling on {device.type} needs torch >= 2.3 (this is {torch.__version__})")
    return torch.cuda.amp.GradScaler(enabled=enabled)


def _to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool = False) -> Dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _images_key(batch: Mapping[str, Any]) -> str:
    for key in ("images", "image"):
        if key in batch:
            return key
    raise KeyError(f"batch has no 'images' entry; keys: {sorted(batch)}")


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[[Any, Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable[Mapping[str, Any]],
    device: torch.device,
    epoch: int,
    *,
    scaler: Optional["torch.amp.GradScaler"] = None,
    amp: Optional[str] = None,
    clip_grad: Optional[float] = None,
    channels_last: bool = False,
    log_interval: int = 5,
    logger: Optional[JsonlLogger] = None,
    start_time: Optional[float] = None,
    progress: bool = True,
    lr_at: Optional[Callable[[int], float]] = None,
    start_iter: int = 0,
    global_step: Optional[int] = None,
    iters_per_epoch: Optional[int] = None,
    max_steps: Optional[int] = None,
    stop_requested: Optional[Callable[[], bool]] = None,
    after_step: Optional[Callable[[int, int], None]] = None,
    watchdog: Optional[Any] = None,
) -> Dict[str, Any]:
    """Train ``model`` over ``data_loader`` (the rest of epoch ``epoch``); returns means and where it stopped.

    Each batch is a dict with ``images`` (or ``image``) (N, 3, S, S) and the target maps
    (N, S, S). The loader yields the epoch from its batch ``start_iter`` on (of
    ``iters_per_epoch``, default ``start_iter + len(data_loader)``); ``global_step``
    optimiser steps were done before (default: ``epoch * iters_per_epoch + start_iter``).
    Before each step every param group's lr is set to
    ``lr_at(step)`` (0-based step; None: left as it is). After each step:
    ``after_step(iterations done in the epoch, steps done)`` (iteration checkpoints; runs on
    every rank), then the loop ends when ``max_steps`` steps are done or when
    ``stop_requested()`` is true on any rank. ``watchdog`` (a ``StepWatchdog``) is armed
    for each step. Every ``log_interval`` iterations rank 0 appends one ``"type": "train"``
    record to ``logger`` (loss parts averaged over the window, lr, images/s over all ranks,
    data vs compute seconds per iteration, elapsed seconds). Raises ``NonFiniteLossError``
    before the optimiser step when the loss is NaN or infinite.

    Returns the epoch-mean losses (absent when no batch was left), ``images_per_s``,
    ``data_time``, ``compute_time``, ``iterations`` (batches run now), ``iter_in_epoch``,
    ``global_step``, ``epoch_done`` and ``stopped`` (a stop was requested).
    """
    model.train()
    if scaler is None:
        scaler = make_grad_scaler(device, enabled=False)
    start_time = time.perf_counter() if start_time is None else start_time
    world_size = dist_utils.get_world_size()
    main = dist_utils.is_main_process()
    remaining = len(data_loader)  # type: ignore[arg-type]
    iters = iters_per_epoch if iters_per_epoch is not None else start_iter + remaining
    if global_step is None:
        global_step = epoch * iters + start_iter
    if max_steps is not None:
        remaining = max(0, min(remaining, max_steps - global_step))

    epoch_losses: Dict[str, SmoothedValue] = {}
    window: Dict[str, List[float]] = {}
    window_images, window_data, window_compute = 0, 0.0, 0.0
    window_start = time.perf_counter()
    total_data, total_compute, total_images = 0.0, 0.0, 0
    done, stopped = 0, False

    bar = tqdm(total=remaining, initial=0, desc=f"epoch {epoch}", disable=not (main and progress), leave=False)
    t_end = time.perf_counter()
    batches = iter(data_loader)
    while done < remaining:
        batch = next(batches)
        it = start_iter + done  # 0-based iteration within the epoch
        if watchdog is not None:
            watchdog.arm(f"epoch {epoch}, iteration {it} (step {global_step})")
        t_data = time.perf_counter()
        batch = _to_device(batch, device, channels_last)
        images = batch.pop(_images_key(batch))
        with autocast_context(device, amp):
            outputs = model(images)
            losses = criterion(outputs, batch)

        reduced = dist_utils.reduce_dict({k: v.detach() for k, v in losses.items()})
        values = {k: float(v) for k, v in reduced.items()}  # one sync per step, as torchvision does
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(epoch, it, values)

        if lr_at is not None:
            lr_now = lr_at(global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_step = time.perf_counter()
        done += 1
        global_step += 1
        bar.update(1)

        n_images = images.shape[0] * world_size
        data_s, compute_s = t_data - t_end, t_step - t_data
        t_end = t_step
        for k, v in values.items():
            epoch_losses.setdefault(k, SmoothedValue()).update(v)
            window.setdefault(k, []).append(v)
        window_images += n_images
        window_data += data_s
        window_compute += compute_s
        total_images += n_images
        total_data += data_s
        total_compute += compute_s
        if main and progress:
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)

        if (it + 1) % log_interval == 0 or it + 1 == iters or done == remaining:
            n = len(window["loss"])
            wall = time.perf_counter() - window_start
            record = {
                "type": "train",
                "epoch": epoch,
                "iter": it + 1,
                "iters": iters,
                "step": global_step,
                **{k: sum(v) / n for k, v in window.items()},
                "lr": lr,
                "images_per_s": window_images / wall if wall > 0 else None,
                "data_time": window_data / n,
                "compute_time": window_compute / n,
                "elapsed_s": time.perf_counter() - start_time,
            }
            if device.type == "cuda":
                record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if main and logger is not None:
                logger.log(record)
            window = {}
            window_images, window_data, window_compute = 0, 0.0, 0.0
            window_start = time.perf_counter()

        if after_step is not None:
            after_step(it + 1, global_step)
        if stop_requested is not None and dist_utils.any_rank(stop_requested()):
            stopped = True
        if watchdog is not None:
            watchdog.disarm()
        if stopped:
            break
    bar.close()

    summary: Dict[str, Any] = {k: m.global_avg for k, m in epoch_losses.items()}
    summary.update(
        images_per_s=total_images / max(total_data + total_compute, 1e-9),
        data_time=total_data / max(done, 1),
        compute_time=total_compute / max(done, 1),
        iterations=done,
        iter_in_epoch=start_iter + done,
        global_step=global_step,
        epoch_done=start_iter + done >= iters,
        stopped=stopped,
    )
    return summary


# --- evaluation ---------------------------------------------------------------------


def inference_model(model: nn.Module) -> nn.Module:
    """The model to evaluate with: an eval-only copy with BN folded and no threshold branch
    (``dbnetpp.inference.prepare_for_inference``); the training model is left as it is."""
    from .inference import prepare_for_inference

    return prepare_for_inference(getattr(model, "module", model))  # unwrap DDP: no collectives in eval


def _padding_flags(data_loader: DataLoader, count: int) -> List[bool]:
    """Which of this rank's first ``count`` samples are DistributedSampler padding.

    With ``shuffle=False`` the sampler lays the dataset out as ``range(n)`` followed by
    repeats of its start, and rank r takes positions r, r + W, r + 2W, ...; a position
    >= n is a duplicate that another rank already evaluates.
    """
    sampler = getattr(data_loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return [False] * count
    if sampler.shuffle:
        raise ValueError("evaluation needs DistributedSampler(shuffle=False) to skip padded duplicates")
    n = len(sampler.dataset)  # type: ignore[arg-type]
    return [sampler.rank + k * sampler.num_replicas >= n for k in range(count)]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data_loader: DataLoader,
    device: torch.device,
    postprocessor: Callable[..., Any],
    metric_factory: Callable[[], Any],
    *,
    amp: Optional[str] = None,
    channels_last: bool = False,
    progress: bool = True,
    keep_predictions: Sequence[int] = (),
) -> Dict[str, Any]:
    """Detect text on every test image and score it with the ICDAR 2015 H-mean.

    ``model`` is in eval mode (see ``inference_model``) and maps (N, 3, H, W) to
    probability maps (N, H, W). Each rank evaluates its shard of ``data_loader``
    (batches from ``collate_test``), runs ``postprocessor(prob_map, scale=(sx, sy))`` and
    updates its own ``metric_factory()``; the metric states are gathered and merged, so
    every rank returns the same ``precision``, ``recall``, ``hmean``, ``score_thr``,
    ``num_images`` and ``eval_s``. Duplicates added by DistributedSampler are skipped.
    With ``keep_predictions`` (dataset indices) the result also holds ``predictions``:
    ``{index: (polygons, scores)}`` for those images, gathered from every rank.
    """
    start = time.perf_counter()
    metric = metric_factory()
    total = len(data_loader.dataset)  # type: ignore[arg-type]
    main = dist_utils.is_main_process()
    seen = 0
    flags = _padding_flags(data_loader, len(data_loader.sampler))  # type: ignore[arg-type]
    wanted = set(int(i) for i in keep_predictions)
    order = list(iter(data_loader.sampler)) if wanted else []  # type: ignore[arg-type]
    kept: Dict[int, Any] = {}
    for batch in tqdm(data_loader, desc="eval", disable=not (main and progress), leave=False):
        images = batch[_images_key(batch)].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            prob = model(images)
        prob = prob.float().cpu().numpy()
        for i in range(prob.shape[0]):
            skip = flags[seen]
            seen += 1
            if skip:
                continue
            polygons, scores = postprocessor(prob[i], scale=tuple(batch["scale"][i]))
            metric.update(polygons, scores, batch["polygons"][i], batch["ignore"][i])
            if wanted and int(order[seen - 1]) in wanted:
                kept[int(order[seen - 1])] = (polygons, scores)

    states = dist_utils.all_gather_object(metric.state())
    merged = metric_factory()
    for state in states:
        merged.merge(state)
    if merged.num_images != total:
        raise RuntimeError(f"evaluated {merged.num_images} images, the test set has {total}")
    result = dict(merged.compute())
    result["num_images"] = merged.num_images
    if wanted:
        result["predictions"] = {k: v for part in dist_utils.all_gather_object(kept) for k, v in part.items()}
    result["eval_s"] = time.perf_counter() - start
    return result
