"""Every CUDA path of dbnetpp, briefly, in one command; one JSON line per check on stdout.

    python benchmarks/gpu_check.py                  # about 4-6 minutes on one H200, bounded by --budget-s
    python benchmarks/gpu_check.py --out gpu.jsonl  # the same lines also written to a file

Without a GPU it prints one line (``{"check": "cuda", "available": false, ...}``) and exits 0.

Each check runs in its own subprocess with a time limit (a hang, a crash or an out-of-memory in one
check cannot take the others down), so every line is printed even when something fails. A line
always has ``check``, ``ok`` (true, false, or null for "skipped"/"measured only") and ``seconds``;
failures carry ``error``. The checks, in order:

- ``env``: GPU name, count, memory, compute capability, torch / CUDA / cuDNN versions, bf16 support.
- ``dcn``: one modulated deformable conv (DCNv2) layer, each implementation ("torchvision", "fast"),
  forward and backward (input, offset, mask, weight, bias) on CUDA against torchvision's op on the
  CPU in float64. Tolerance: max |CUDA - CPU| <= 1e-4 x max |CPU| per tensor (float32 vs float64).
- ``model_tiny`` / ``model_r50``: ``dbnetpp_resnet18_dcnv2_tiny`` and ``dbnetpp_resnet50_dcnv2``
  (train mode, batch 2 at 256x256, same weights): the three output maps and every parameter
  gradient on CUDA against the CPU, float32 with TF32 off. Tolerance: outputs 1e-3 and gradients
  1e-2, relative to the largest CPU magnitude of each tensor (gradients sum over many pixels);
  the eval probability map and ``prepare_for_inference`` (BN folded) within 1e-3 absolute.
- ``amp_bf16`` / ``amp_fp16``: ``engine.train_one_epoch`` of the tiny DBNet++ on synthetic text
  (real DB targets) under autocast, fp16 with the GradScaler; the losses finite, the scale value,
  the eval probability map under autocast against float32 (max and mean |diff|; ok when the mean
  is <= 0.02).
- ``channels_last``: the same epoch in NHWC for both models' forward against NCHW (1e-3 relative).
- ``nccl``: a 1-process NCCL group, all_reduce and SyncBatchNorm forward/backward on CUDA.
- ``ddp_2gpu``: with >= 2 GPUs, ``torchrun --nproc_per_node 2 examples/train.py --preset tiny
  --epochs 1 --sync-bn`` (NCCL, SyncBatchNorm, DistributedSampler); else skipped.
- ``train_script``: ``examples/train.py --preset tiny --epochs 1 --device cuda --amp bf16
  --channels-last`` end to end on one GPU.
- ``speed_train``: training images/s of DBNet++ R50-DCNv2 at 640x640 (SGD, DBLoss on random
  targets, batch 16, halved on out-of-memory) in fp32 (PyTorch's TF32 defaults) and bf16.
- ``speed_infer``: the forward of the prepared R50-DCNv2 model (``prepare_for_inference``) on
  1x3x1024x1824, fp32 and bf16 autocast: median milliseconds.
- ``sync_free``: one eager and one compiled (``torch.compile(fullgraph=True)``) training step of
  DBNet++ R50-DCNv2 (forward, DBLoss, backward, SGD step; bf16 autocast, batch 2 at 640x640) under
  ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync raises (CUDA only).
- ``compile_train``: training images/s of the compiled R50-DCNv2 step (bf16, batch 16 at 640x640,
  ``fullgraph=True``) against eager, with the compile seconds.
- ``compile``: ``torch.compile`` of the tiny model's eval forward (if torch has it): compile seconds,
  the output against eager (1e-3 absolute), the speed-up.
- ``summary``: ``ok`` false when any check failed (``failed`` names them).

``--device cpu --quick`` runs the same code on the CPU with tiny sizes (the test suite does, to keep
this script runnable without a GPU); its "compiled" steps use dynamo's ``backend="eager"``
(whole-graph capture without inductor's minutes of C++ builds on a small CPU).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# check name -> time limit in seconds, in running order; a check never gets more than what is
# left of --budget-s (default 450 s), so the whole run stays under 8 minutes
CHECKS = {
    "env": 60,
    "dcn": 60,
    "model_tiny": 60,
    "model_r50": 90,
    "amp_bf16": 60,
    "amp_fp16": 60,
    "channels_last": 60,
    "nccl": 60,
    "ddp_2gpu": 150,
    "train_script": 120,
    "speed_train": 150,
    "speed_infer": 90,
    "sync_free": 150,
    "compile_train": 300,
    "compile": 120,  # last: compiling may take long, and the budget cuts it short
}


def emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record, default=float), flush=True)


def rel_err(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (b the reference), both moved to the CPU in float64."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-12)
    return float((a - b).abs().max()) / scale if b.numel() else 0.0


def abs_err(a: Any, b: Any) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any, warmup: int, max_runs: int, max_s: float) -> List[float]:
    """Seconds of each timed call of ``fn`` after ``warmup`` calls; at most ``max_runs`` calls and
    about ``max_s`` seconds (at least one timed call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (not times or time.perf_counter() - start < max_s):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def set_tf32(enabled: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


# ----------------------------------------------------------------------------- the checks
# Each yields records (without "seconds"); ``ok`` None means measured / skipped.


def check_env(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    rec: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(
            name=props.name,
            gpus=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            bf16=torch.cuda.is_bf16_supported(),
            tf32_matmul_default=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn_default=torch.backends.cudnn.allow_tf32,
            nccl=torch.distributed.is_nccl_available(),
        )
    yield {"ok": True, **rec}


def check_dcn(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    from dbnetpp.ops.deform_conv import modulated_deform_conv2d

    set_tf32(False)
    gen = torch.Generator().manual_seed(0)
    n, c, o, h, w = (1, 4, 5, 7, 9) if quick else (2, 64, 64, 40, 56)
    for stride in (1, 2):
        ho, wo = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
        base = {
            "x": torch.randn(n, c, h, w, generator=gen, dtype=torch.float64),
            "offset": 3 * torch.randn(n, 18, ho, wo, generator=gen, dtype=torch.float64),
            "mask": torch.rand(n, 9, ho, wo, generator=gen, dtype=torch.float64),
            "weight": torch.randn(o, c, 3, 3, generator=gen, dtype=torch.float64) / (3 * c**0.5),
            "bias": torch.randn(o, generator=gen, dtype=torch.float64),
        }
        grad_out = torch.randn(n, o, ho, wo, generator=gen, dtype=torch.float64)

        def run(tensors: Dict[str, Any], impl: str, dev: Any, dtype: Any):
            inputs = {k: v.detach().to(dev, dtype).clone().requires_grad_() for k, v in tensors.items()}
            out = modulated_deform_conv2d(
                inputs["x"], inputs["offset"], inputs["mask"], inputs["weight"], inputs["bias"],
                stride=stride, padding=1, impl=impl,
            )  # fmt: skip
            out.backward(grad_out.to(dev, dtype))
            return out, {k: v.grad for k, v in inputs.items()}

        ref_out, ref_grads = run(base, "torchvision", torch.device("cpu"), torch.float64)
        for impl in ("torchvision", "fast"):
            try:
                out, grads = run(base, impl, device, torch.float32)
                sync(device)
            except Exception as e:  # noqa: BLE001 - reported, the other impl still runs
                yield {"impl": impl, "stride": stride, "ok": False, "error": f"{type(e).__name__}: {e}"}
                continue
            errors = {"out": rel_err(out, ref_out), **{f"grad_{k}": rel_err(grads[k], ref_grads[k]) for k in grads}}
            yield {"impl": impl, "stride": stride, "shape": [n, c, h, w], "tolerance": 1e-4,
                   "rel_err": errors, "ok": max(errors.values()) <= 1e-4}  # fmt: skip


def _model_parity(name: str, device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    from dbnetpp.inference import prepare_for_inference
    from dbnetpp.models.dbnet import build_model

    set_tf32(False)
    torch.manual_seed(0)
    size = 64 if quick else 256
    cpu_model = build_model(name).train()
    # DCN offsets start at zero: give them some so the deformable sampling is exercised
    with torch.no_grad():
        for mod_name, p in cpu_model.named_parameters():
            if "conv_offset" in mod_name:
                p.normal_(0, 0.01 if "weight" in mod_name else 0.5)
    gpu_model = copy.deepcopy(cpu_model).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen)
    weights = {k: torch.randn(2, size, size, generator=gen) for k in ("prob_logits", "thr_map", "binary_map")}

    def step(model, dev):
        out = model(x.to(dev))
        loss = sum((out[k].float() * weights[k].to(dev)).mean() for k in weights)
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    ref_out, ref_grads = step(cpu_model, torch.device("cpu"))
    out, grads = step(gpu_model, device)
    sync(device)
    out_err = {k: rel_err(out[k], ref_out[k]) for k in ref_out}
    grad_err = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max(grad_err, key=grad_err.get)
    missing = sorted(set(ref_grads) - set(grads))
    ok = max(out_err.values()) <= 1e-3 and grad_err[worst] <= 1e-2 and not missing
    yield {"part": "train_forward_backward", "input": [2, 3, size, size], "tolerance": {"out": 1e-3, "grad": 1e-2},
           "rel_err_out": out_err, "rel_err_grad_max": grad_err[worst], "worst_grad": worst,
           "params_compared": len(grad_err), "missing_grads": missing, "ok": ok}  # fmt: skip

    cpu_model.eval()
    gpu_model.eval()
    with torch.no_grad():
        ref = cpu_model(x)
        prob = gpu_model(x.to(device))
        prepared = prepare_for_inference(gpu_model)(x.to(device))
        sync(device)
    errors = {"eval": abs_err(prob, ref), "prepared": abs_err(prepared, ref)}
    yield {"part": "eval_and_prepared", "tolerance_abs": 1e-3, "abs_err": errors, "ok": max(errors.values()) <= 1e-3}


def check_model_tiny(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    yield from _model_parity("dbnetpp_resnet18_dcnv2_tiny", device, quick)


def check_model_r50(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    yield from _model_parity("dbnetpp_resnet50_dcnv2", device, quick)


def _synthetic_batches(size: int, batch: int, count: int) -> List[Dict[str, Any]]:
    from dbnetpp.data import SyntheticText, TrainDataset, collate_train

    source = SyntheticText(batch * count, size=size, seed=0, words_per_image=(40, 90))
    dataset = TrainDataset(source, size=size, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    return [collate_train(items[i : i + batch]) for i in range(0, len(items), batch)]


def _amp_epoch(device: Any, quick: bool, amp: Optional[str], channels_last: bool = False) -> Dict[str, Any]:
    import torch

    from dbnetpp.engine import autocast_context, train_one_epoch
    from dbnetpp.loss import DBLoss
    from dbnetpp.models.dbnet import build_model

    torch.manual_seed(0)
    size, batch, count = (64, 2, 2) if quick else (256, 8, 6)
    batches = _synthetic_batches(size, batch, count)
    model = build_model("dbnetpp_resnet18_dcnv2_tiny").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start = time.perf_counter()
    summary = train_one_epoch(model, DBLoss(), optimizer, batches, device, 0, scaler=scaler, amp=amp,
                              channels_last=channels_last, log_interval=1000, progress=False)  # fmt: skip
    sync(device)
    epoch_s = time.perf_counter() - start
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model.eval()
    x = batches[0]["image"].to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x).float()
        with autocast_context(device, amp):
            low = model(x).float()
    diff = (low - ref).abs()
    return {
        "loss": summary["loss"],
        "params_finite": finite,
        "scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
        "steps": len(batches),
        "epoch_s": epoch_s,
        "prob_vs_fp32_max": float(diff.max()),
        "prob_vs_fp32_mean": float(diff.mean()),
    }


def check_amp_bf16(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    rec = _amp_epoch(device, quick, "bf16")
    yield {**rec, "ok": rec["params_finite"] and rec["loss"] == rec["loss"] and rec["prob_vs_fp32_mean"] <= 0.02}


def check_amp_fp16(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    if device.type != "cuda":
        yield {"ok": None, "skipped": "fp16 autocast with a GradScaler is a CUDA path"}
        return
    rec = _amp_epoch(device, quick, "fp16")
    yield {**rec, "ok": rec["params_finite"] and rec["loss"] == rec["loss"] and rec["prob_vs_fp32_mean"] <= 0.02}


def check_channels_last(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    from dbnetpp.models.dbnet import build_model

    rec = _amp_epoch(device, quick, None, channels_last=True)
    yield {"part": "train_epoch_tiny", **rec, "ok": rec["params_finite"] and rec["loss"] == rec["loss"]}
    set_tf32(False)
    size = 64 if quick else 256
    for name in ("dbnetpp_resnet18_dcnv2_tiny", "dbnetpp_resnet50_dcnv2"):
        torch.manual_seed(0)
        model = build_model(name).to(device).eval()
        x = torch.randn(1, 3, size, size, device=device)
        with torch.no_grad():
            ref = model(x)
            model_cl = model.to(memory_format=torch.channels_last)
            out = model_cl(x.contiguous(memory_format=torch.channels_last))
        err = rel_err(out, ref)
        yield {"part": f"forward_{name}", "rel_err": err, "tolerance": 1e-3, "ok": err <= 1e-3}


def check_compile(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    from dbnetpp.models.dbnet import build_model

    if not hasattr(torch, "compile"):
        yield {"ok": None, "skipped": "torch.compile not available"}
        return
    torch.manual_seed(0)
    size = 64 if quick else 512
    model = build_model("dbnetpp_resnet18_dcnv2_tiny").to(device).eval()
    x = torch.randn(2, 3, size, size, device=device)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model)
        start = time.perf_counter()
        out = compiled(x)
        sync(device)
        compile_s = time.perf_counter() - start
        eager = timed(lambda: model(x), device, 1, 20, 5.0)
        fast = timed(lambda: compiled(x), device, 1, 20, 5.0)
    err = abs_err(out, ref)
    yield {"model": "dbnetpp_resnet18_dcnv2_tiny", "input": [2, 3, size, size], "compile_s": compile_s,
           "abs_err": err, "tolerance_abs": 1e-3, "eager_ms": 1e3 * statistics.median(eager),
           "compiled_ms": 1e3 * statistics.median(fast), "ok": err <= 1e-3}  # fmt: skip


def check_nccl(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch
    import torch.distributed as dist
    from torch import nn

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            t = torch.arange(4.0, device=device)
            dist.all_reduce(t)
            reduced_ok = t.tolist() == [0.0, 1.0, 2.0, 3.0]
            if device.type != "cuda":  # torch's SyncBatchNorm refuses CPU tensors in a process group
                yield {"backend": backend, "all_reduce": reduced_ok, "ok": reduced_ok}
                return
            torch.manual_seed(0)
            net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).to(device)
            sync_net = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
            x = torch.randn(4, 3, 16, 16, device=device)
            a, b = net(x), sync_net(x)
            a.square().mean().backward()
            b.square().mean().backward()
            err = max(abs_err(a, b), abs_err(net[0].weight.grad, sync_net[0].weight.grad))
            is_sync = isinstance(sync_net[1], nn.SyncBatchNorm)
        finally:
            dist.destroy_process_group()
    yield {"backend": backend, "all_reduce": reduced_ok, "sync_bn_converted": is_sync, "sync_bn_abs_err": err,
           "ok": reduced_ok and is_sync and err <= 1e-4}  # fmt: skip


def _run_train_script(args: List[str], timeout: float, torchrun_procs: int = 0) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        if torchrun_procs:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
        else:
            cmd = [sys.executable]
        cmd += [str(ROOT / "examples" / "train.py"), *args, "--work-dir", str(work), "--no-progress"]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        seconds = time.perf_counter() - start
        rec: Dict[str, Any] = {"cmd": " ".join(cmd[1:]), "returncode": proc.returncode, "run_s": seconds}
        log = work / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        evals = [r for r in records if r.get("type") == "eval"]
        trains = [r for r in records if r.get("type") == "train"]
        if evals:
            rec["hmean"] = evals[-1]["hmean"]
        if trains:
            rec["images_per_s"] = trains[-1].get("images_per_s")
            rec["loss"] = trains[-1].get("loss")
            rec["max_mem_mb"] = trains[-1].get("max_mem_mb")
        rec["samples_jpg"] = sorted(p.name for p in (work / "samples").glob("*.jpg")) if work.is_dir() else []
        rec["ok"] = proc.returncode == 0 and bool(evals) and (work / "last.pth").is_file()
        if proc.returncode != 0:
            rec["error"] = proc.stderr[-2000:]
        return rec


def check_ddp_2gpu(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        yield {"ok": None, "skipped": f"needs >= 2 GPUs, found {gpus}"}
        return
    images = ["--synthetic-images", "32", "8"]
    yield _run_train_script(["--preset", "tiny", "--epochs", "1", *images, "--sync-bn", "--device", "cuda"],
                            timeout=140, torchrun_procs=2)  # fmt: skip


def check_train_script(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    images = ["--synthetic-images", "8", "4", "--train-size", "128"] if quick else ["--synthetic-images", "64", "16"]
    extra = ["--amp", "bf16", "--channels-last"] if device.type == "cuda" else ["--threads", "1", "--workers", "0"]
    yield _run_train_script(["--preset", "tiny", "--epochs", "1", *images, "--device", device.type, *extra],
                            timeout=110)  # fmt: skip


def check_speed_train(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    name = "dbnetpp_resnet18_dcnv2_tiny" if quick else "dbnetpp_resnet50_dcnv2"
    size, batch = (64, 2) if quick else (640, 16)
    torch.backends.cudnn.benchmark = True
    for amp in (None, "bf16"):
        b = batch
        while True:
            try:
                step, _ = _training_step(name, device, b, size, amp, backend=None)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = timed(step, device, warmup=3, max_runs=15, max_s=15.0)
                break
            except torch.cuda.OutOfMemoryError:
                step = None  # free the model, optimizer and batch before retrying
                torch.cuda.empty_cache()
                if b == 1:
                    raise
                b //= 2
        median = statistics.median(times)
        rec = {"model": name, "precision": amp or "fp32", "input": [b, 3, size, size], "steps": len(times),
               "step_ms": 1e3 * median, "images_per_s": b / median, "ok": None}  # fmt: skip
        if device.type == "cuda":
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rec["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        yield rec
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def random_db_targets(batch: int, size: int, gen: Any, device: Any = "cpu") -> Dict[str, Any]:
    """DB targets (shrink / threshold maps and masks, (batch, size, size)) drawn from the CPU
    generator ``gen``, on ``device``: a training step's inputs for timing, not for learning."""
    import torch

    return {
        "shrink_map": (torch.rand(batch, size, size, generator=gen) > 0.8).float().to(device),
        "shrink_mask": torch.ones(batch, size, size, device=device),
        "thr_map": (0.3 + 0.4 * torch.rand(batch, size, size, generator=gen)).to(device),
        "thr_mask": (torch.rand(batch, size, size, generator=gen) > 0.5).float().to(device),
    }


def _training_step(name: str, device: Any, batch: int, size: int, amp: Optional[str], backend: Optional[str]):
    """(step, model): one SGD training step of ``name`` on random images and DB targets; the
    model and the loss compiled whole with ``backend`` (None: eager)."""
    import torch

    from dbnetpp.engine import autocast_context
    from dbnetpp.loss import DBLoss
    from dbnetpp.models.dbnet import build_model

    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    targets = random_db_targets(batch, size, gen, device)
    net, criterion = model, DBLoss()
    if backend is not None:
        net = torch.compile(model, fullgraph=True, backend=backend)
        criterion = torch.compile(criterion, fullgraph=True, backend=backend)

    def step():
        with autocast_context(device, amp):
            loss = criterion(net(x), targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step, model


def check_sync_free(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    name = "dbnetpp_resnet18_dcnv2_tiny" if quick else "dbnetpp_resnet50_dcnv2"
    size, batch = (64, 2) if quick else (640, 2)
    backend = "eager" if quick else "inductor"
    for mode in ("eager", "compiled"):
        step, model = _training_step(name, device, batch, size, "bf16", None if mode == "eager" else backend)
        step()  # warm-up (and compile) outside the checked step: cuDNN / compiler setup may sync
        sync(device)
        if device.type != "cuda":
            step()
            yield {"model": name, "mode": mode, "ok": None, "skipped": "sync debug mode needs CUDA (step ran)"}
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync(device)
        yield {"model": name, "mode": mode, "input": [batch, 3, size, size], "precision": "bf16", "ok": True}


def check_compile_train(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    name = "dbnetpp_resnet18_dcnv2_tiny" if quick else "dbnetpp_resnet50_dcnv2"
    size, batch = (64, 2) if quick else (640, 16)
    backend = "eager" if quick else "inductor"
    torch.backends.cudnn.benchmark = True
    rec: Dict[str, Any] = {"model": name, "precision": "bf16", "input": [batch, 3, size, size], "backend": backend}
    for mode in ("eager", "compiled"):
        step, model = _training_step(name, device, batch, size, "bf16", None if mode == "eager" else backend)
        start = time.perf_counter()
        step()
        sync(device)
        first_s = time.perf_counter() - start
        times = timed(step, device, warmup=2, max_runs=15, max_s=15.0)
        rec[f"{mode}_images_per_s"] = batch / statistics.median(times)
        rec[f"{mode}_first_step_s"] = first_s
        del step, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec["speedup"] = rec["compiled_images_per_s"] / rec["eager_images_per_s"]
    rec["ok"] = None
    yield rec


def check_speed_infer(device: Any, quick: bool) -> Iterable[Dict[str, Any]]:
    import torch

    from dbnetpp.engine import autocast_context
    from dbnetpp.inference import prepare_for_inference
    from dbnetpp.models.dbnet import build_model

    name = "dbnetpp_resnet18_dcnv2_tiny" if quick else "dbnetpp_resnet50_dcnv2"
    h, w = (64, 96) if quick else (1024, 1824)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = prepare_for_inference(build_model(name).to(device))
    x = torch.randn(1, 3, h, w, device=device)
    for amp in (None, "bf16"):
        with torch.no_grad(), autocast_context(device, amp):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = timed(lambda: model(x), device, warmup=3, max_runs=20, max_s=15.0)
        rec = {"model": name, "prepared": True, "precision": amp or "fp32", "input": [1, 3, h, w],
               "runs": len(times), "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
               "ok": None}  # fmt: skip
        if device.type == "cuda":
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        yield rec


FUNCTIONS: Dict[str, Callable[[Any, bool], Iterable[Dict[str, Any]]]] = {
    name: globals()[f"check_{name}"] for name in CHECKS
}


# ----------------------------------------------------------------------------- driver


def run_one(name: str, device_name: str, quick: bool) -> int:
    """Run one check in this process, printing its records; exit status 0 even when it fails."""
    import torch

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start = time.perf_counter()
    try:
        for rec in FUNCTIONS[name](device, quick):
            emit({"check": name, **rec, "seconds": round(time.perf_counter() - start, 3)})
    except Exception as e:  # noqa: BLE001 - one line per failure, the driver goes on
        emit({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
              "traceback": traceback.format_exc()[-3000:],
              "seconds": round(time.perf_counter() - start, 3)})  # fmt: skip
    return 0


def _parse(line: str, name: str) -> Dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict) and "check" in record:
        return record
    return {"check": name, "ok": None, "unparsed": line[:500]}


def drive(names: List[str], device_name: str, quick: bool, budget_s: float, out: Optional[Path]) -> int:
    """Run each check in a subprocess within its time limit and the overall budget; forward its lines."""
    sink = out.open("w") if out is not None else None
    start = time.perf_counter()
    summary: Dict[str, Any] = {}

    def forward(record: Dict[str, Any]) -> None:
        emit(record)
        if sink is not None:
            sink.write(json.dumps(record, default=float) + "\n")
            sink.flush()
        summary.setdefault(record["check"], []).append(record.get("ok"))

    for name in names:
        left = budget_s - (time.perf_counter() - start)
        if left < 15:
            forward({"check": name, "ok": None, "skipped": f"time budget of {budget_s:.0f} s spent", "seconds": 0})
            continue
        limit = min(CHECKS[name], left - 5)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--device", device_name]
        if quick:
            cmd.append("--quick")
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            for line in lines:
                forward(_parse(line, name))
            if not lines:
                forward({"check": name, "ok": False, "error": f"no output, exit status {proc.returncode}: "
                         + proc.stderr[-2000:], "seconds": round(time.perf_counter() - t, 3)})  # fmt: skip
        except subprocess.TimeoutExpired as e:
            partial = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            for line in (ln for ln in partial.splitlines() if ln.startswith("{")):
                forward(_parse(line, name))
            forward({"check": name, "ok": False, "error": f"timed out after {limit:.0f} s",
                     "seconds": round(time.perf_counter() - t, 3)})  # fmt: skip
    failed = sorted(k for k, v in summary.items() if False in v)
    forward({"check": "summary", "ok": not failed, "failed": failed, "checks": len(summary),
             "seconds": round(time.perf_counter() - start, 3)})  # fmt: skip
    if sink is not None:
        sink.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cuda:K; cpu only for testing this script")
    p.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="a subset, in order")
    p.add_argument("--budget-s", type=float, default=450.0, help="overall time limit in seconds (default 450)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for testing the script on a CPU)")
    p.add_argument("--one", choices=list(CHECKS), default=None, help=argparse.SUPPRESS)  # internal: one check
    args = p.parse_args(argv)

    if args.one is not None:
        return run_one(args.one, args.device, args.quick)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        record = {"check": "cuda", "available": False, "ok": None, "torch": torch.__version__,
                  "message": "no CUDA GPU visible to torch: nothing to check (exit 0)"}  # fmt: skip
        emit(record)
        if args.out is not None:
            args.out.write_text(json.dumps(record) + "\n")
        return 0
    return drive(args.checks, args.device, args.quick, args.budget_s, args.out)


if __name__ == "__main__":
    sys.exit(main())
