"""``dbnetpp`` command line: detect text, evaluate on ICDAR 2015, export to ONNX.

    dbnetpp detect photos/ img.jpg --weights dbnetpp.pth --out results/
    dbnetpp detect photo.jpg --weights dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015 --out results/
    dbnetpp eval --data data/icdar2015 --weights dbnetpp.pth
    dbnetpp eval --data data/icdar2015 --predictions results/
    dbnetpp export-onnx --weights dbnetpp.pth --out dbnetpp.onnx --check
    dbnetpp models                       # published weights usable as --weights NAME

``detect`` writes, per image, ``vis_<stem>.jpg`` (polygons and scores drawn) and
``res_<stem>.txt`` (Robust Reading: one ``x1,y1,...,xK,yK`` line per text, integer pixels,
clockwise) or ``res_<stem>.json`` (float points and scores). ``eval --predictions`` scores
such files against the ground truth. ``eval --save-predictions DIR`` writes ``res_<stem>.txt``
files with exact points and the score as a ninth value (``--save-format rrc``: plain integer
Robust Reading lines), which ``eval --predictions DIR`` scores to the same P / R / H-mean.
``eval --batch-size N`` batches only images of the same padded size, so results do not depend
on it. Bad input (missing or unreadable files, weights of another model, an empty folder) ends
with one ``error: ...`` line on stderr and exit status 1;
set ``DBNETPP_DEBUG=1`` to get the traceback instead.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "collect_images",
    "format_polygon",
    "get_args_parser",
    "main",
    "parse_result_file",
    "write_result_file",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXIT_ERROR = 1


def collect_images(inputs: Sequence[str]) -> List[Path]:
    """Image files named directly or found (not recursively) in folders, folders in natural order.

    Raises FileNotFoundError for a path that does not exist, ValueError for a folder without
    images (extensions ``IMAGE_EXTENSIONS``).
    """
    from dbnetpp.data.icdar2015 import natural_key

    images: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            found.sort(key=lambda p: natural_key(p.name))
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    return images


def _clockwise(points: np.ndarray) -> np.ndarray:
    """Points ordered clockwise on screen (y down), as the Robust Reading checker wants."""
    x, y = points[:, 0], points[:, 1]
    signed_area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    return points if signed_area >= 0 else points[::-1]


def format_polygon(polygon: np.ndarray) -> str:
    """One result line ``x1,y1,...,xK,yK``: integer pixels, clockwise on screen. Quadrilaterals
    start at the corner nearest the top-left (``dbnetpp.submission.to_clockwise_quad``)."""
    from dbnetpp.submission import to_clockwise_quad

    points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    points = to_clockwise_quad(points) if len(points) == 4 else np.round(_clockwise(points)).astype(np.int64)
    return ",".join(str(int(v)) for v in points.reshape(-1))


def write_result_file(
    path: Path,
    detections: Sequence[Tuple[np.ndarray, float]],
    fmt: str = "txt",
    image: Optional[str] = None,
    with_scores: bool = False,
) -> None:
    """Write one image's detections as ``res_<stem>.txt`` (Robust Reading) or ``.json``.

    ``with_scores`` (txt only): exact float points and the score as the last value
    (``dbnetpp.submission.format_scored_line``), which ``eval --predictions`` scores exactly as
    the run that wrote them; without it, plain integer Robust Reading lines.
    """
    for poly, score in detections:
        if not (np.isfinite(score) and np.isfinite(np.asarray(poly, dtype=np.float64)).all()):
            raise ValueError(f"{path}: refusing to write a non-finite polygon or score ({score})")
    if fmt == "txt" and with_scores:
        from dbnetpp.submission import format_scored_line

        text = "".join(format_scored_line(poly, score) + "\n" for poly, score in detections)
    elif fmt == "txt":
        text = "".join(format_polygon(poly) + "\n" for poly, _ in detections)
    else:
        record = {
            "image": image,
            "detections": [
                {"polygon": np.asarray(poly, dtype=np.float64).round(2).tolist(), "score": round(float(score), 6)}
                for poly, score in detections
            ],
        }
        text = json.dumps(record, allow_nan=False) + "\n"  # strict JSON: a NaN is an error, not a token
    path.write_text(text, encoding="utf-8")


def parse_result_file(path: Path) -> Tuple[List[np.ndarray], List[float]]:
    """Polygons (K, 2) and scores from a ``res_*.txt`` or ``res_*.json`` file.

    txt: one polygon per line, comma-separated numbers; an odd count means the last number is
    the score (Robust Reading with confidences), otherwise the score is 1. Raises ValueError
    naming the file and line for anything else.
    """
    from dbnetpp.data.base import read_text

    polygons: List[np.ndarray] = []
    scores: List[float] = []
    text = read_text(path)  # not UTF-8: ValueError naming the file and line
    if path.suffix == ".json":
        try:
            record = json.loads(text)
            for i, det in enumerate(record["detections"]):
                with np.errstate(over="ignore"):
                    polygon = np.asarray(det["polygon"], dtype=np.float32).reshape(-1, 2)
                score = float(det.get("score", 1.0))
                _check_detection(polygon, score, f"detections[{i}]")
                polygons.append(polygon)
                scores.append(score)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as err:
            raise ValueError(f"{path}: not a dbnetpp result file ({type(err).__name__}: {err})") from None
        return polygons, scores
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            values = [float(v) for v in line.split(",")]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected comma-separated numbers, got {line[:80]!r}") from None
        score = values.pop() if len(values) % 2 else 1.0
        if len(values) < 6:
            raise ValueError(f"{path}:{lineno}: a polygon needs at least 3 (x, y) points, got {line[:80]!r}")
        with np.errstate(over="ignore"):
            polygon = np.asarray(values, dtype=np.float32).reshape(-1, 2)
        _check_detection(polygon, score, f"{path}:{lineno}")
        polygons.append(polygon)
        scores.append(score)
    return polygons, scores


def _check_detection(polygon: np.ndarray, score: float, what: str) -> None:
    """ValueError unless ``polygon`` has >= 3 finite (float32) points and ``score`` is finite."""
    if len(polygon) < 3:
        raise ValueError(f"{what}: a polygon needs at least 3 (x, y) points")
    if not np.isfinite(polygon).all():
        raise ValueError(f"{what}: coordinates must be finite numbers (float32)")
    if not np.isfinite(score):
        raise ValueError(f"{what}: the score must be a finite number, got {score}")


def _published_name(weights: str) -> Optional[str]:
    """``weights`` when it names published weights (``dbnetpp models``) rather than a file."""
    from dbnetpp.hub import get_weights, is_published

    if Path(weights).exists() or not is_published(weights) or get_weights(weights).kind != "detector":
        return None
    return weights


def _weights_file(args: argparse.Namespace) -> Tuple[str, Optional[str]]:
    """(checkpoint path, model name) for ``--weights``: a file as given, a published name or an
    URL downloaded into torch hub's cache (once)."""
    from dbnetpp.hub import download_weights, get_weights

    hint = "give --weights the path of a local checkpoint instead"
    name = _published_name(args.weights)
    if name is not None:
        entry = get_weights(name)
        return str(download_weights(name, hint=hint)), args.model or entry.arch
    if Path(args.weights).exists():
        return args.weights, args.model
    if args.weights.startswith(("http://", "https://", "file://")):
        return str(download_weights(args.weights, hint=hint)), args.model
    raise FileNotFoundError(
        f"--weights {args.weights}: no such checkpoint file, and not a published model name "
        "(`dbnetpp models` lists them)"
    )


def _detector_from_args(args: argparse.Namespace) -> Any:
    from dbnetpp.detector import Detector

    options: Dict[str, Any] = dict(model=args.model, device=args.device, test_scale=args.test_scale)
    if getattr(args, "precision", "fp32") != "fp32":  # dbnetpp.quantize: int8 / bf16 on the CPU
        options.update(precision=args.precision, calibration=args.calibration)
    elif getattr(args, "calibration", None) is not None:
        raise ValueError("--calibration is for --precision int8")
    if getattr(args, "text_repr", None) is not None:
        options["text_repr_type"] = args.text_repr
    name = _published_name(args.weights)
    if name is not None:  # the recipe's test scale and post-processing, unless given
        from dbnetpp.hub import download_weights

        download_weights(name, hint="give --weights the path of a local checkpoint instead")
        options = {k: v for k, v in options.items() if v is not None}
        return Detector.from_pretrained(name, **options)
    weights, _ = _weights_file(args)
    return Detector(weights, **options)


def _progress(iterable: Any, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", file=sys.stderr, disable=total < 2, dynamic_ncols=True)


def _write_image(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(path.suffix, image)
    if not ok:
        raise OSError(f"cannot encode image {path}")
    data.tofile(str(path))


def unique_images(images: Sequence[Path]) -> List[Path]:
    """``images`` without repeats of the same file; ValueError naming the files when two
    different files would write the same ``res_<stem>`` / ``vis_<stem>`` outputs."""
    unique: List[Path] = []
    seen = set()
    by_stem: Dict[str, List[Path]] = {}
    for path in images:
        key = path.resolve()
        if key in seen:  # the same file named twice: one result
            continue
        seen.add(key)
        unique.append(path)
        by_stem.setdefault(path.stem, []).append(path)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        named = "; ".join(" and ".join(str(p) for p in paths[:3]) for paths in clashes[:3])
        raise ValueError(
            f"{sum(len(c) for c in clashes)} input images share a file name stem, so their res_<stem> / "
            f"vis_<stem> outputs would overwrite each other: {named}; rename them or run detect once per folder"
        )
    return unique


def writable_folder(path: Path, flag: str) -> Path:
    """Create ``path`` and check that a file can be written in it, before any work is done
    (OSError naming the flag and the folder otherwise)."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dbnetpp_write_check_"):
            pass
    except OSError as err:
        raise OSError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return path


def cmd_detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dbnetpp.data.icdar2015 import read_image
    from dbnetpp.visualize import draw_detections

    images = unique_images(collect_images(args.inputs))
    out = writable_folder(Path(args.out), "--out")
    detector = _detector_from_args(args)
    failed: List[str] = []
    num_texts = 0
    for path in _progress(images, len(images), "detect"):
        try:
            image = read_image(path)
        except (OSError, ValueError) as err:  # the rest go on; listed at the end, exit 1
            tqdm.write(f"error: {error_line(err)}", file=sys.stderr)
            failed.append(str(path))
            continue
        detections = detector.detect(image)
        num_texts += len(detections)
        write_result_file(out / f"res_{path.stem}.{args.format}", detections, args.format, image=str(path))
        if not args.no_vis:
            vis = draw_detections(image, [p for p, _ in detections], [s for _, s in detections])
            ext = ".png" if path.suffix.lower() == ".png" else ".jpg"
            _write_image(out / f"vis_{path.stem}{ext}", vis)
    done = len(images) - len(failed)
    print(f"{num_texts} text regions in {done} image(s); results in {out}")
    if failed:
        print(_skipped_line(failed, len(images)), file=sys.stderr)
        return EXIT_ERROR
    return 0


def _skipped_line(failed: Sequence[str], total: int) -> str:
    listed = ", ".join(failed[:10]) + (f", ... ({len(failed) - 10} more)" if len(failed) > 10 else "")
    return f"error: {len(failed)} of {total} image(s) could not be read and were skipped: {listed}"


def _eval_dataset(root: str, split: str, require_images: bool = True) -> Any:
    from dbnetpp.data.icdar2015 import ICDAR2015

    if not Path(root).is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    dataset = ICDAR2015(root, split, require_images=require_images)
    if len(dataset) == 0:
        raise ValueError(f"no {split} images in {root}")
    return dataset


def cmd_eval(args: argparse.Namespace) -> int:
    from dbnetpp.metric import HmeanIoU

    if (args.weights is None) == (args.predictions is None):
        raise ValueError("give either --weights (run a model) or --predictions (score res_*.txt files)")
    dataset = _eval_dataset(args.data, args.split, require_images=args.predictions is None or bool(args.vis))
    # output folders are checked before the work: a computed result is never lost to them
    if args.vis:
        writable_folder(Path(args.vis), "--vis")
    if args.save_predictions:
        writable_folder(Path(args.save_predictions), "--save-predictions")
    metric = HmeanIoU()
    skipped: List[str] = []  # images that could not be read: not scored, listed, exit status 1
    record: Dict[str, Any] = {"data": str(args.data), "split": args.split}
    drawn: List[Any] = []  # (index, polygons, scores) of every image, for --vis
    if args.predictions is not None:
        pred_dir = Path(args.predictions)
        if not pred_dir.is_dir():
            raise FileNotFoundError(f"predictions folder not found: {pred_dir}")
        missing = 0
        for i in _progress(range(len(dataset)), len(dataset), f"eval {args.split}"):
            sample = dataset.load_annotations(i)  # no image decoding
            stem = Path(sample["path"]).stem
            candidates = [pred_dir / f"res_{stem}.txt", pred_dir / f"res_{stem}.json"]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:  # as the Robust Reading site: a missing file is an image without detections
                missing += 1
                polygons, scores = [], []
            else:
                polygons, scores = parse_result_file(found)
            _update(metric, polygons, scores, sample, found)
            if args.vis:
                drawn.append((i, polygons, scores))
        if missing == len(dataset):
            raise FileNotFoundError(f"no res_<image>.txt / .json files for the {args.split} images in {pred_dir}")
        if missing:
            print(
                f"warning: {missing} image(s) without a result file in {pred_dir} (counted as no detections)",
                file=sys.stderr,
            )
        record["predictions"] = str(pred_dir)
    else:
        from tqdm import tqdm

        detector = _detector_from_args(args)
        save_dir = Path(args.save_predictions) if args.save_predictions else None
        batch: List[Dict[str, Any]] = []

        def flush() -> None:
            results = detector.detect_batch([s["image"] for s in batch])
            for sample, detections in zip(batch, results):
                polygons, scores = [p for p, _ in detections], [s for _, s in detections]
                _update(metric, polygons, scores, sample, None)
                if args.vis:
                    drawn.append((sample["index"], polygons, scores))
                if save_dir is not None:
                    write_result_file(
                        save_dir / f"res_{Path(sample['path']).stem}.txt",
                        detections,
                        with_scores=args.save_format == "scored",
                    )
            batch.clear()

        for i in _progress(range(len(dataset)), len(dataset), f"eval {args.split}"):
            try:
                sample = dataset[i]
            except (OSError, ValueError) as err:  # the rest are scored; listed at the end, exit 1
                tqdm.write(f"error: {error_line(err)}", file=sys.stderr)
                skipped.append(str(dataset.image_paths[i]) if hasattr(dataset, "image_paths") else f"image {i}")
                continue
            batch.append({**sample, "index": i})
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
        record.update(weights=str(args.weights), model=detector.model_name, test_scale=list(detector.test_scale))
    result = metric.compute()
    record.update(
        precision=result["precision"],
        recall=result["recall"],
        hmean=result["hmean"],
        score_thr=round(float(result["score_thr"]), 6),
        num_images=int(metric.num_images),
    )
    if skipped:
        record["skipped_images"] = skipped
    if args.vis:
        record["vis"] = str(args.vis)
    scored = f"{metric.num_images} images" if not skipped else f"{metric.num_images} of {len(dataset)} images scored"
    print(
        f"{args.split}: precision {result['precision']:.4f}  recall {result['recall']:.4f}  "
        f"hmean {result['hmean']:.4f}  (score threshold {record['score_thr']:.1f}, {scored})"
    )
    print(json.dumps(record, allow_nan=False), flush=True)  # the result is out before any drawing
    if args.vis:
        skipped += [p for p in _draw_eval(args.vis, dataset, drawn, result["score_thr"]) if p not in skipped]
    if skipped:
        print(_skipped_line(skipped, len(dataset)), file=sys.stderr)
        return EXIT_ERROR
    return 0


def _update(metric: Any, polygons: Any, scores: Any, sample: Dict[str, Any], source: Optional[Path]) -> None:
    """``metric.update`` for one image; a ValueError names the result file (or the image)."""
    try:
        metric.update(polygons, scores, sample["polygons"], sample["ignore"])
    except ValueError as err:
        raise ValueError(f"{source or sample['path']}: {err}") from None


def _draw_eval(out_dir: str, dataset: Any, drawn: List[Any], score_thr: float) -> List[str]:
    """vis_<image>.jpg per image in ``out_dir``: detections at the best score threshold, coloured as
    the metric scored them (dbnetpp.visualize.draw_evaluation). Returns the images that could not
    be read (not drawn)."""
    from tqdm import tqdm

    from dbnetpp.visualize import draw_evaluation, save_image

    unreadable: List[str] = []
    for i, polygons, scores in _progress(drawn, len(drawn), "vis"):
        try:
            sample = dataset[i]
        except (OSError, ValueError) as err:
            tqdm.write(f"error: {error_line(err)}", file=sys.stderr)
            unreadable.append(str(dataset.image_paths[i]))
            continue
        picture, _ = draw_evaluation(
            sample["image"], polygons, scores, sample["polygons"], sample["ignore"], score_thr, show_scores=True
        )
        save_image(Path(out_dir) / f"vis_{Path(sample['path']).stem}.jpg", picture)
    return unreadable


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from dbnetpp.detector import load_model
    from dbnetpp.export import check_onnx, count_ops, export_onnx

    model = load_model(*_weights_file(args))
    path = export_onnx(model, args.out, args.height, args.width, opset=args.opset, dynamic=not args.static)
    ops = count_ops(path)
    size_mb = os.path.getsize(path) / 2**20
    shape = "(1, 3, {}, {})".format(args.height, args.width) if args.static else "(N, 3, 32*h, 32*w)"
    print(
        f"wrote {path} ({size_mb:.1f} MiB, opset {args.opset}, input images {shape}, "
        f"{sum(ops.values())} nodes, {ops.get('DeformConv', 0)} DeformConv)"
    )
    if args.check:
        images = torch.randn(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
        diff = check_onnx(path, model, images)
        print(f"onnxruntime check on (1, 3, {args.height}, {args.width}): max |onnx - torch| = {diff:.3g}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from dbnetpp.quantize import quantize_detector, require_onnxruntime

    require_onnxruntime()
    detector = _detector_from_args(argparse.Namespace(**{**vars(args), "calibration": None}))  # float32
    path = quantize_detector(detector, args.out, args.calibration, reduce_range=args.reduce_range)
    size_mb = os.path.getsize(path) / 2**20
    source = args.calibration or "built-in synthetic text"
    print(
        f"wrote {path} ({size_mb:.1f} MiB, int8 {detector.model_name}, test scale {detector.test_scale}, "
        f"calibrated on {source}); use it with --weights {path} --precision int8"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dbnetpp.hub import cache_dir, format_table

    print(format_table())
    print(f"\nweights are downloaded on first use into {cache_dir()}")
    print("use one: dbnetpp detect photo.jpg --weights NAME --out results/")
    return 0


def _test_scale(text: str) -> Tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        long_side, short_side = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LONG,SHORT (e.g. 4068,1024), got {text!r}") from None
    if min(long_side, short_side) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return long_side, short_side


def _add_model_args(parser: argparse.ArgumentParser, weights_required: bool = True) -> None:
    parser.add_argument(
        "--weights",
        required=weights_required,
        help="checkpoint: dbnetpp (from training) or MMOCR .pth, or a published model name (dbnetpp models)",
    )
    parser.add_argument(
        "--model", default=None, help="model name (default: the checkpoint's own, else dbnetpp_resnet50_dcnv2)"
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument(
        "--test-scale",
        type=_test_scale,
        default=None,
        metavar="LONG,SHORT",
        help="keep-ratio test resize limits (default: the checkpoint's, else 4068,1024)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="CPU inference precision (default fp32); int8 needs the onnx extra, bf16 a CPU with native bf16; "
        "--weights may be a file written by dbnetpp quantize (then int8)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="int8 from a float32 checkpoint: images to calibrate on (default built-in synthetic text); "
        "dbnetpp quantize saves a calibrated model once",
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbnetpp", description="DBNet++ scene-text detection: detect, evaluate, export.", add_help=add_help
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("detect", help="detect text in images; write drawings and res_<image>.txt files")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--format", choices=("txt", "json"), default="txt", help="result file format (default txt)")
    p.add_argument(
        "--text-repr",
        choices=("quad", "poly"),
        default=None,
        help="rotated boxes or polygons (default: the published recipe's, else quad)",
    )
    p.add_argument("--no-vis", action="store_true", help="do not write the vis_<image> drawings")
    _add_run_args(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("eval", help="precision / recall / H-mean on an ICDAR 2015 split")
    p.add_argument("--data", required=True, help="ICDAR 2015 root folder")
    p.add_argument("--split", default="test", help="split to score (default test)")
    _add_model_args(p, weights_required=False)
    p.add_argument("--predictions", default=None, help="score existing res_<image>.txt/.json files in this folder")
    p.add_argument("--save-predictions", default=None, metavar="DIR", help="also write res_<image>.txt files here")
    p.add_argument(
        "--save-format",
        choices=("scored", "rrc"),
        default="scored",
        help="scored: exact points and score per line, --predictions reproduces the H-mean (default); "
        "rrc: plain integer x1,y1,...,y4 lines for the Robust Reading server",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per forward pass (default 1); only images of the same padded size share one, "
        "so results do not depend on it",
    )
    p.add_argument("--vis", default=None, metavar="DIR",
                   help="draw every image into DIR/vis_<image>.jpg: matched green, false positive red, "
                   "missed yellow, ### grey")
    _add_run_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="calibrate an int8 model for the CPU once; write it to an ONNX file")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="int8 ONNX file to write (used by --weights FILE --precision int8)")
    p.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="folder of images to calibrate on (a handful is enough; default built-in synthetic text)",
    )
    p.add_argument(
        "--test-scale",
        type=_test_scale,
        default=None,
        metavar="LONG,SHORT",
        help="keep-ratio test resize limits recorded in the file (default: the checkpoint's, else 4068,1024)",
    )
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="7-bit weights, for CPUs without VNNI (default: on when this CPU has no VNNI)",
    )
    p.set_defaults(func=cmd_quantize, device="cpu")

    p = sub.add_parser("models", help="list the published models (name, H-mean, P, R, test scale, cached)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("export-onnx", help="export the network (images -> probability map) to ONNX")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--height", type=int, default=640, help="example input height, multiple of 32 (default 640)")
    p.add_argument("--width", type=int, default=640, help="example input width, multiple of 32 (default 640)")
    p.add_argument("--opset", type=int, default=19, help="ONNX opset, >= 19 for DCN models (default 19)")
    p.add_argument("--static", action="store_true", help="fixed (1, 3, height, width) input instead of dynamic N/H/W")
    p.add_argument("--check", action="store_true", help="run the file in onnxruntime and compare with PyTorch")
    p.set_defaults(func=cmd_export_onnx)
    return parser


_WORKER_HEADER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback")


def error_line(err: BaseException) -> str:
    """An exception as the one line after ``error: `` (whitespace folded, at most 800 characters:
    room for the offline message's file, URL, cache folder and opt-out). An error re-raised from a
    DataLoader worker ("Caught ValueError in DataLoader worker process 0. Original Traceback ...")
    gives the worker's own message, so the line is the same with any number of workers."""
    text = str(err)
    if _WORKER_HEADER.match(text):
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(err).__name__
        text = last[len(name) + 2 :] if last.startswith(f"{name}: ") else last
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= 800 else text[:797] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dbnetpp`` console script; returns the exit status."""
    args = get_args_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        if os.environ.get("DBNETPP_DEBUG"):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
