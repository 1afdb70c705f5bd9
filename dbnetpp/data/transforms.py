"""Training augmentations of MMOCR's DBNet++ ICDAR 2015 recipe, and its test resize.

Images are BGR uint8 arrays (H, W, 3). Polygons are lists of float32 (K, 2) arrays of
(x, y) points in pixels, in *continuous* coordinates: pixel (row i, column j) covers
[j, j + 1) x [i, i + 1). That is imgaug's convention (its image warps shift by half a
pixel, its keypoint warps do not), so points stay on the image content through flips,
rotations and resizes.

Train pipeline (MMOCR v1.0.1, REFERENCE §8), in order:

1. colour jitter as torchvision's ``ColorJitter(brightness=32/255, saturation=0.5)`` on a
   PIL image (:func:`adjust_brightness`, :func:`adjust_saturation`, random order);
2. imgaug ``Sequential([Fliplr(0.5), Affine(rotate=(-10, 10)), Resize((0.5, 3.0))])``
   (:func:`hflip`, :func:`rotate`, :func:`rescale`), then imgaug's polygon clean-up
   (:func:`clip_polygons`) and ``FixInvalidPolygon`` (:func:`fix_invalid_polygons`);
3. ``RandomCrop(min_side_ratio=0.1)`` (:func:`sample_crop_box`, :func:`crop`);
4. ``Resize((640, 640), keep_ratio=True)`` (:func:`resize_keep_ratio`) and
   ``Pad((640, 640))`` (:func:`pad_to_square`).

:func:`train_transform` runs it with every random draw taken from a
``numpy.random.Generator``. The polygons always go through the steps above. By default
(``fused=True``) the image is rendered with ONE ``cv2.warpAffine`` from the source straight
to the output (flip, rotation, random scale, crop and final resize composed into one
matrix; the crop box is sampled from the warped polygons, which need no image), and the
colour jitter touches only the pixels that warp reads (or its output, when smaller). The
sampling positions are those of the step-by-step chain; only the interpolation differs
(one bilinear pass instead of bilinear, bicubic and bilinear passes): about 0.2-1 grey
level of mean absolute difference over the image content, measured by
``tests/test_transforms.py``. ``fused=False`` renders step by step, as MMOCR does.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon

Polygons = List[np.ndarray]

BRIGHTNESS = 32 / 255  # ColorJitter(brightness=32/255): factor ~ U[1 - b, 1 + b]
SATURATION = 0.5  # ColorJitter(saturation=0.5): factor ~ U[0.5, 1.5]
FLIP_PROB = 0.5
MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.5, 3.0)
MIN_SIDE_RATIO = 0.1
MIN_POLY_POINTS = 4
TRAIN_SIZE = 640
TEST_SCALE = (4068, 1024)

# PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, here on BGR float32 pixels
# plus a constant 1 channel of cv2.transform. All partial sums are integers < 2**24,
# so float32 is exact.
_LUMA_KERNEL = np.array([[7471.0, 38470.0, 19595.0, 32768.0]], dtype=np.float32)


class TrainParams(NamedTuple):
    """The per-sample random parameters of steps 1-2 (the crop is drawn later)."""

    brightness: float  # brightness factor
    saturation: float  # saturation factor
    saturation_first: bool  # torchvision's random op order: saturation before brightness
    flip: bool  # horizontal flip
    angle_deg: float  # rotation, degrees, positive = clockwise on screen (y down)
    scale: float  # one resize factor for both sides


class TrainSample(NamedTuple):
    """Output of :func:`train_transform`."""

    image: np.ndarray  # uint8 BGR (size, size, 3), zero padded bottom/right
    polygons: Polygons  # float32 (K, 2) each, pixels of the padded image
    ignore: np.ndarray  # bool (n,)


# ----------------------------------------------------------------------------- checks


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a BGR uint8 image of shape (H, W, 3), got {desc}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")


def _as_polygons(polygons: Sequence[np.ndarray]) -> Polygons:
    out = []
    for i, poly in enumerate(polygons):
        arr = np.asarray(poly, dtype=np.float32)
        if arr.ndim == 1 and arr.size % 2 == 0:
            arr = arr.reshape(-1, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"polygon {i}: expected a (K, 2) array of (x, y) points, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"polygon {i}: coordinates must be finite")
        out.append(arr)
    return out


def _as_ignore(ignore: Optional[Sequence[bool]], count: int) -> np.ndarray:
    if ignore is None:
        return np.zeros(count, dtype=bool)
    arr = np.asarray(ignore, dtype=bool).reshape(-1)
    if arr.shape[0] != count:
        raise ValueError(f"ignore has {arr.shape[0]} flags for {count} polygons")
    return arr


# ----------------------------------------------------------------------------- colour


def _pil_blend(base: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``Image.blend(base, image, factor)`` on uint8 values.

    PIL evaluates ``base + factor * (image - base)`` in float32 and truncates, clipping
    to [0, 255]; the same float32 operations here give identical bytes.
    """
    base = np.asarray(base, dtype=np.float32)
    out = np.asarray(image, dtype=np.float32) - base
    out *= np.float32(factor)
    out += base
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision ``adjust_brightness`` on a PIL image: blend with black by ``factor``.

    BGR uint8 (H, W, 3) -> same; byte-identical to PIL's ``ImageEnhance.Brightness``.
    """
    _check_image(image)
    table = _pil_blend(np.zeros(256, np.float32), np.arange(256), factor)
    return cv2.LUT(image, table)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision ``adjust_saturation`` on a PIL image: blend with its luma by ``factor``.

    BGR uint8 (H, W, 3) -> same; byte-identical to PIL's ``ImageEnhance.Color``
    (``L + factor * (v - L)`` in float32, truncated and clipped; every operation below is
    one correctly rounded float32 operation, as in PIL's C loop).
    """
    _check_image(image)
    x = image.astype(np.float32)
    luma = cv2.transform(x, _LUMA_KERNEL)
    luma *= np.float32(1.0 / 65536.0)  # exact (power of two)
    np.floor(luma, out=luma)  # the >> 16 of PIL's fixed-point luma
    luma3 = cv2.merge([luma, luma, luma])
    x = cv2.subtract(x, luma3)  # exact: small integers
    x *= np.float32(factor)
    x = cv2.add(x, luma3)
    np.clip(x, 0.0, 255.0, out=x)
    return x.astype(np.uint8)  # truncation toward zero, as PIL's (UINT8) cast


def color_jitter(image: np.ndarray, params: TrainParams) -> np.ndarray:
    """Step 1: brightness and saturation in ``params``' order (torchvision ColorJitter)."""
    if params.saturation_first:
        return adjust_brightness(adjust_saturation(image, params.saturation), params.brightness)
    return adjust_saturation(adjust_brightness(image, params.brightness), params.saturation)


# ----------------------------------------------------------------------------- polygon helpers


def _apply_affine(polygons: Polygons, matrix: np.ndarray) -> Polygons:
    """Map every polygon through a (2, 3) or (3, 3) affine matrix of continuous coordinates."""
    if not polygons:
        return []
    points = np.concatenate(polygons).astype(np.float64)
    mapped = (points @ matrix[:2, :2].T + matrix[:2, 2]).astype(np.float32)
    return np.split(mapped, np.cumsum([len(p) for p in polygons])[:-1])


def _pixel_matrix(matrix: np.ndarray) -> np.ndarray:
    """A continuous-coordinate affine map -> the (2, 3) map of pixel indices cv2 warps with.

    Pixel index p sits at continuous p + 0.5: M_pix(p) = M(p + 0.5) - 0.5.
    """
    linear = matrix[:2, :2]
    shift = matrix[:2, 2] + linear @ np.array([0.5, 0.5]) - 0.5
    return np.hstack([linear, shift[:, None]])


def _bbox_polygon(points: np.ndarray) -> np.ndarray:
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)


def _make_valid(poly: Polygon):
    """MMOCR's poly_make_valid: buffer(0) if invalid, convex hull if not a Polygon."""
    fixed = poly if poly.is_valid else poly.buffer(0)
    if not isinstance(fixed, Polygon):
        fixed = fixed.convex_hull
    return fixed


def _first_polygon(geometry) -> Optional[Polygon]:
    """The first polygonal piece of a shapely result (Polygon, Multi*, collection), or None."""
    if isinstance(geometry, Polygon):
        return None if geometry.is_empty else geometry
    for part in getattr(geometry, "geoms", ()):
        if isinstance(part, Polygon) and not part.is_empty:
            return part
    return None


def _shapely_polygons(polygons: Polygons) -> np.ndarray:
    """Object array of shapely Polygons, None where a polygon cannot be built (< 3 points)."""
    out = np.full(len(polygons), None, dtype=object)
    if not polygons:
        return out
    try:
        coords = np.concatenate(polygons).astype(np.float64)
        index = np.repeat(np.arange(len(polygons)), [len(p) for p in polygons])
        out[:] = shapely.polygons(shapely.linearrings(coords, indices=index))
    except (ValueError, shapely.errors.GEOSException):
        for i, poly in enumerate(polygons):
            try:
                out[i] = Polygon(poly)
            except (ValueError, shapely.errors.GEOSException):
                pass
    return out


def _exterior_rings(geometries: np.ndarray) -> Polygons:
    """Exterior ring coordinates (closing point included) of shapely Polygons, float32."""
    if len(geometries) == 0:
        return []
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(geometries), return_index=True)
    counts = np.bincount(index, minlength=len(geometries))
    return np.split(coords.astype(np.float32), np.cumsum(counts)[:-1])


def _is_valid(geometries: np.ndarray) -> np.ndarray:
    """Bool per entry of an object array of Polygons / None: built and valid."""
    valid = np.array([g is not None for g in geometries], dtype=bool)
    valid[valid] = shapely.is_valid(geometries[valid])
    return valid


def _warp_bilinear(image: np.ndarray, matrix: np.ndarray, dsize: Tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine`` bilinear with a zero border, through 4 channels.

    OpenCV's 4-channel bilinear remap is vectorised and its 3-channel one is not; the
    values are identical, the BGRA detour about twice as fast for rotations.
    """
    bgra = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    out = cv2.warpAffine(bgra, matrix, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(0, 0, 0, 0))
    return cv2.cvtColor(out, cv2.COLOR_BGRA2BGR)


# ----------------------------------------------------------------------------- geometry (imgaug)


def hflip(image: np.ndarray, polygons: Sequence[np.ndarray]) -> Tuple[np.ndarray, Polygons]:
    """Mirror left-right: x -> W - x (imgaug ``Fliplr``)."""
    _check_image(image)
    width = image.shape[1]
    flip = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0]])
    return cv2.flip(image, 1), _apply_affine(_as_polygons(polygons), flip)


def rotation_matrix(angle_deg: float, height: int, width: int) -> np.ndarray:
    """imgaug ``Affine(rotate=angle_deg)`` as a (2, 3) map of continuous coordinates.

    Rotation about the image centre (W/2, H/2); with y pointing down a positive angle
    turns the content clockwise on screen (skimage's ``AffineTransform(rotation=...)``).
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    cx, cy = width / 2.0, height / 2.0
    return np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]])


def rotate(image: np.ndarray, polygons: Sequence[np.ndarray], angle_deg: float) -> Tuple[np.ndarray, Polygons]:
    """Rotate about the centre, same size, bilinear, zero border (imgaug ``Affine`` defaults)."""
    _check_image(image)
    height, width = image.shape[:2]
    matrix = rotation_matrix(angle_deg, height, width)
    out = _warp_bilinear(image, _pixel_matrix(matrix), (width, height))
    return out, _apply_affine(_as_polygons(polygons), matrix)


def rescaled_size(height: int, width: int, factor: float) -> Tuple[int, int]:
    """imgaug ``Resize(factor)``: (round(H * factor), round(W * factor)), at least 1."""
    return max(int(np.round(height * factor)), 1), max(int(np.round(width * factor)), 1)


def rescale(image: np.ndarray, polygons: Sequence[np.ndarray], factor: float) -> Tuple[np.ndarray, Polygons]:
    """Resize both sides by one ``factor``, bicubic; points scale by new_w / W, new_h / H."""
    _check_image(image)
    height, width = image.shape[:2]
    new_h, new_w = rescaled_size(height, width, factor)
    out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    scale = np.array([[new_w / width, 0.0, 0.0], [0.0, new_h / height, 0.0]])
    return out, _apply_affine(_as_polygons(polygons), scale)


def clip_polygons(polygons: Sequence[np.ndarray], height: int, width: int) -> Tuple[Polygons, List[int]]:
    """MMOCR's ImgAugWrapper polygon clean-up after the imgaug warps.

    Drops polygons with < 3 points, invalid ones and those outside [0, W] x [0, H];
    clips the others to the image with shapely and keeps the first piece (its ring with
    the closing point repeated, rotated so it starts at the vertex nearest an original
    vertex, as imgaug does); drops results with <= 2 points.

    Returns:
        (polygons, indices of the input polygons they came from).
    """
    polygons = _as_polygons(polygons)
    candidates = np.array([i for i, p in enumerate(polygons) if len(p) >= 3], dtype=np.int64)
    geoms = _shapely_polygons([polygons[i] for i in candidates])
    valid = _is_valid(geoms)
    candidates = candidates[valid]
    frame = shapely.box(0.0, 0.0, float(width), float(height))
    pieces = np.full(len(candidates), None, dtype=object)
    pieces[:] = [_first_polygon(g) for g in shapely.intersection(geoms[valid], frame)]
    has_area = np.array([p is not None for p in pieces], dtype=bool)
    has_area[has_area] = shapely.area(pieces[has_area]) > 0  # not outside, not only touching
    out, keep = [], []
    for i, ring in zip(candidates[has_area].tolist(), _exterior_rings(pieces[has_area])):
        poly = polygons[i]
        dist = np.hypot(poly[:, None, 0] - ring[None, :, 0], poly[:, None, 1] - ring[None, :, 1])
        first = int(np.argmin(dist)) % len(ring)
        ring = np.concatenate([ring[first:], ring[:first]])
        if len(ring) <= 2:
            continue
        out.append(ring)
        keep.append(i)
    return out, keep


def fix_invalid_polygons(
    polygons: Sequence[np.ndarray], min_poly_points: int = MIN_POLY_POINTS
) -> Tuple[Polygons, List[int]]:
    """MMOCR ``FixInvalidPolygon(mode='fix', min_poly_points=4)``.

    < 3 points: removed. Invalid or < ``min_poly_points`` points: replaced by the exterior
    ring of its shapely fix (buffer(0), convex hull of a multi-part result; closing point
    repeated); an empty fix is removed; an unfixable one (a line or a point) becomes its
    bounding box.

    Returns:
        (polygons, indices of the input polygons they came from).
    """
    polygons = _as_polygons(polygons)
    geoms = _shapely_polygons(polygons)
    valid = _is_valid(geoms)
    out, keep = [], []
    for i, poly in enumerate(polygons):
        if len(poly) < 3:
            continue
        if valid[i] and len(poly) >= min_poly_points:
            out.append(poly)
            keep.append(i)
            continue
        try:
            shp = geoms[i] if geoms[i] is not None else Polygon(poly)
            fixed = np.asarray(_make_valid(shp).exterior.coords, dtype=np.float32).reshape(-1, 2)
        except (AttributeError, ValueError, shapely.errors.GEOSException):
            fixed = _bbox_polygon(poly)
        if len(fixed) < 3:
            continue
        out.append(fixed)
        keep.append(i)
    return out, keep


# ----------------------------------------------------------------------------- random crop


def _runs(valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """[begin, end) of every run of 1s."""
    diff = np.diff(np.concatenate([[0], valid, [0]]))
    return np.flatnonzero(diff > 0), np.flatnonzero(diff < 0)


def _sample_start_end(
    valid: np.ndarray, min_len: int, max_start: int, min_end: int, rng: np.random.Generator
) -> Tuple[int, int]:
    """MMOCR RandomCrop._sample_valid_start_end with the generator's draws."""
    start_valid = valid.copy()
    start_valid[min(len(start_valid) - min_len, max_start):] = 0
    start_valid[0] = 1
    begins, ends = _runs(start_valid)
    run = rng.integers(len(begins))
    start = int(rng.integers(begins[run], ends[run]))

    end_valid = valid.copy()
    end_valid[: max(start + min_len, min_end)] = 0
    end_valid[-1] = 1
    begins, ends = _runs(end_valid)
    run = rng.integers(len(begins))
    end = int(rng.integers(begins[run], ends[run]))
    return start, end


def sample_crop_box(
    polygons: Sequence[np.ndarray],
    height: int,
    width: int,
    rng: np.random.Generator,
    min_side_ratio: float = MIN_SIDE_RATIO,
) -> Tuple[int, int, int, int]:
    """MMOCR ``RandomCrop(min_side_ratio)`` crop box (x1, y1, x2, y2), integer pixels.

    Crop edges are sampled among the coordinates no polygon spans (every polygon's
    clipped [floor(min), ceil(max)) is excluded, ignored ones too) and one polygon, drawn
    uniformly, stays fully inside. Each side is at least int(min_side_ratio * side) long.
    """
    polygons = _as_polygons(polygons)
    if not polygons:
        raise ValueError("sample_crop_box needs at least one polygon")
    kept = int(rng.integers(len(polygons)))
    x_valid = np.ones(width + 1, dtype=np.int32)
    y_valid = np.ones(height + 1, dtype=np.int32)
    bounds = np.array(
        [[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polygons], dtype=np.float32
    )
    bounds[:, 0::2] = np.clip(bounds[:, 0::2], 0, width)
    bounds[:, 1::2] = np.clip(bounds[:, 1::2], 0, height)
    lo = np.floor(bounds[:, :2]).astype(np.int64)
    hi = np.ceil(bounds[:, 2:]).astype(np.int64)
    for valid, axis in ((x_valid, 0), (y_valid, 1)):
        cover = np.zeros(len(valid) + 1, dtype=np.int64)
        np.add.at(cover, lo[:, axis], 1)
        np.add.at(cover, hi[:, axis], -1)
        valid[np.cumsum(cover)[:-1] > 0] = 0
    min_w = int(width * min_side_ratio)
    min_h = int(height * min_side_ratio)
    x1, x2 = _sample_start_end(x_valid, min_w, int(lo[kept, 0]), int(hi[kept, 0]), rng)
    y1, y2 = _sample_start_end(y_valid, min_h, int(lo[kept, 1]), int(hi[kept, 1]), rng)
    return x1, y1, x2, y2


def crop_polygons(polygons: Sequence[np.ndarray], box: Tuple[int, int, int, int]) -> Tuple[Polygons, List[int]]:
    """Shift polygons into the crop ``box`` and keep only those fully inside it.

    Containment is shapely's ``box.contains(polygon)`` (MMOCR ``is_poly_inside_rect``):
    touching the border is inside; partially contained polygons are dropped, not clipped.
    """
    polygons = _as_polygons(polygons)
    x1, y1, x2, y2 = box
    shifted = [p - np.array([x1, y1], dtype=np.float32) for p in polygons]
    geoms = _shapely_polygons(shifted)
    built = np.array([g is not None for g in geoms], dtype=bool)
    inside = np.zeros(len(shifted), dtype=bool)
    frame = shapely.box(0.0, 0.0, float(x2 - x1), float(y2 - y1))
    try:
        inside[built] = shapely.contains(frame, geoms[built])
    except shapely.errors.GEOSException:  # some polygon GEOS cannot handle: one by one
        for i in np.flatnonzero(built):
            try:
                inside[i] = frame.contains(geoms[i])
            except shapely.errors.GEOSException:
                pass
    keep = np.flatnonzero(inside).tolist()
    return [shifted[i] for i in keep], keep


def crop(
    image: np.ndarray, polygons: Sequence[np.ndarray], box: Tuple[int, int, int, int]
) -> Tuple[np.ndarray, Polygons, List[int]]:
    """Cut ``box`` (x1, y1, x2, y2) out of the image; polygons as :func:`crop_polygons`."""
    _check_image(image)
    x1, y1, x2, y2 = box
    height, width = image.shape[:2]
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"crop box {box} is not inside the {width}x{height} image")
    polys, keep = crop_polygons(polygons, box)
    return image[y1:y2, x1:x2], polys, keep


# ----------------------------------------------------------------------------- resize and pad


def keep_ratio_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv ``rescale_size``: s = min(long/max(h, w), short/min(h, w)); (int(h*s+.5), int(w*s+.5))."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_polygons(polygons: Sequence[np.ndarray], scale_xy: Tuple[float, float], height: int, width: int) -> Polygons:
    """MMOCR ``Resize`` polygons: scale, then clip to the new (height, width) frame.

    As MMOCR's ``crop_polygon``: the shapely intersection of the (made valid) polygon
    with the frame, as its ring reversed with the closing point repeated; a polygon whose
    intersection is empty or not a single polygon becomes all zeros (same point count).
    """
    polygons = _as_polygons(polygons)
    scale = np.asarray(scale_xy, dtype=np.float64)
    scaled = [(p.astype(np.float64) * scale).astype(np.float32) for p in polygons]
    geoms = _shapely_polygons(scaled)
    for i in np.flatnonzero(~_is_valid(geoms)):
        if geoms[i] is not None:
            geoms[i] = _make_valid(geoms[i])
    built = np.array([isinstance(g, Polygon) and not g.is_empty for g in geoms], dtype=bool)
    frame = shapely.box(0.0, 0.0, float(width), float(height))
    pieces = np.full(len(scaled), None, dtype=object)
    pieces[built] = shapely.intersection(geoms[built], frame)
    usable = np.array([isinstance(g, Polygon) for g in pieces], dtype=bool)
    usable[usable] = shapely.area(pieces[usable]) > 0
    out = [np.zeros_like(p) for p in polygons]
    for i, ring in zip(np.flatnonzero(usable), _exterior_rings(pieces[usable])):
        out[i] = np.ascontiguousarray(ring[::-1])
    return out


def resize_keep_ratio(
    image: np.ndarray, polygons: Sequence[np.ndarray], size: int = TRAIN_SIZE
) -> Tuple[np.ndarray, Polygons]:
    """``Resize(scale=(size, size), keep_ratio=True)``: long side -> size, bilinear."""
    _check_image(image)
    height, width = image.shape[:2]
    new_h, new_w = keep_ratio_size(height, width, (size, size))
    out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return out, resize_polygons(polygons, (new_w / width, new_h / height), new_h, new_w)


def pad_to_square(image: np.ndarray, size: int = TRAIN_SIZE) -> np.ndarray:
    """Zero-pad bottom/right to (size, size, 3)."""
    _check_image(image)
    height, width = image.shape[:2]
    if height > size or width > size:
        raise ValueError(f"image {width}x{height} is larger than the pad size {size}")
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:height, :width] = image
    return out


def resize_for_test(image: np.ndarray, scale: Tuple[int, int] = TEST_SCALE) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Test-time ``Resize(scale=(4068, 1024), keep_ratio=True)``, bilinear.

    s = min(4068 / long side, 1024 / short side); new size (int(w*s+0.5), int(h*s+0.5)).

    Returns:
        (resized BGR image, (sx, sy)) with sx = new_w / w, sy = new_h / h.
    """
    _check_image(image)
    height, width = image.shape[:2]
    new_h, new_w = keep_ratio_size(height, width, scale)
    new_h, new_w = max(1, new_h), max(1, new_w)  # a 1 x 3000 strip keeps one pixel, not zero (cv2 fails)
    out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return out, (new_w / width, new_h / height)


# ----------------------------------------------------------------------------- the pipeline


def sample_train_params(
    rng: np.random.Generator,
    brightness: float = BRIGHTNESS,
    saturation: float = SATURATION,
    max_rotation_deg: float = MAX_ROTATION_DEG,
    scale_range: Tuple[float, float] = SCALE_RANGE,
) -> TrainParams:
    """Draw the colour and imgaug parameters (the crop is drawn from the warped polygons)."""
    saturation_first = bool(rng.random() < 0.5)
    b = float(rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness))
    s = float(rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation))
    flip = bool(rng.random() < FLIP_PROB)
    angle = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = float(rng.uniform(*scale_range))
    return TrainParams(b, s, saturation_first, flip, angle, scale)


def _imgaug_matrix(params: TrainParams, height: int, width: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Flip, rotation and rescale composed: (3, 3) continuous map and the rescaled (H, W)."""
    flip = np.eye(3)
    if params.flip:
        flip[0] = [-1.0, 0.0, width]
    rot = np.eye(3)
    rot[:2] = rotation_matrix(params.angle_deg, height, width)
    new_h, new_w = rescaled_size(height, width, params.scale)
    resize = np.diag([new_w / width, new_h / height, 1.0])
    return resize @ rot @ flip, (new_h, new_w)


def _select(ignore: np.ndarray, keep: List[int]) -> np.ndarray:
    return ignore[np.asarray(keep, dtype=np.int64)] if keep else np.zeros(0, dtype=bool)


def train_transform(
    image: np.ndarray,
    polygons: Sequence[np.ndarray],
    ignore: Optional[Sequence[bool]],
    rng: np.random.Generator,
    size: int = TRAIN_SIZE,
    fused: bool = True,
    min_side_ratio: float = MIN_SIDE_RATIO,
) -> Optional[TrainSample]:
    """The DBNet++ training pipeline for one sample (REFERENCE §8 steps 3-7).

    Args:
        image: BGR uint8 (H, W, 3).
        polygons: float (K, 2) arrays, pixels.
        ignore: bool per polygon ('###'), or None for all False.
        rng: source of every random draw.
        size: output side (640 in the recipe).
        fused: render the image with one warp (fast, default) or step by step (reference).
        min_side_ratio: ``RandomCrop``'s smallest crop side, as a fraction of the image side
            (MMOCR: 0.1). The crop is then resized to ``size``, so text ends up 1 / (crop fraction)
            times larger than in the rescaled image: a larger ratio keeps text nearer its size.

    Returns:
        :class:`TrainSample` with a (size, size, 3) image, or None when no polygon
        survives the warps (MMOCR then re-samples another image).
    """
    _check_image(image)
    polygons = _as_polygons(polygons)
    ignore = _as_ignore(ignore, len(polygons))
    height, width = image.shape[:2]
    params = sample_train_params(rng)

    # Polygons through flip, rotation and rescale, then imgaug/MMOCR clean-up.
    warp, (rs_h, rs_w) = _imgaug_matrix(params, height, width)
    polys, keep = clip_polygons(_apply_affine(polygons, warp), rs_h, rs_w)
    ignore = _select(ignore, keep)
    if not polys:
        return None
    polys, keep = fix_invalid_polygons(polys)
    ignore = _select(ignore, keep)
    if not polys:
        return None

    box = sample_crop_box(polys, rs_h, rs_w, rng, min_side_ratio)
    x1, y1, x2, y2 = box
    crop_h, crop_w = y2 - y1, x2 - x1
    out_h, out_w = keep_ratio_size(crop_h, crop_w, (size, size)) if min(crop_h, crop_w) > 0 else (0, 0)
    if min(out_h, out_w) < 1:
        return None  # a degenerate crop of a tiny or extreme image (MMOCR would fail an assert)
    polys, keep = crop_polygons(polys, box)
    ignore = _select(ignore, keep)
    polys = resize_polygons(polys, (out_w / crop_w, out_h / crop_h), out_h, out_w)

    if fused:
        out = _render_fused(image, params, warp, box, (out_h, out_w))
    else:
        out = _render_reference(image, params, box, size)
    return TrainSample(pad_to_square(out, size), polys, ignore)


def _render_reference(image: np.ndarray, params: TrainParams, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """Image path of the pipeline, one step at a time (as MMOCR runs it)."""
    out = color_jitter(image, params)
    if params.flip:
        out, _ = hflip(out, [])
    out, _ = rotate(out, [], params.angle_deg)
    out, _ = rescale(out, [], params.scale)
    out, _, _ = crop(out, [], box)
    out, _ = resize_keep_ratio(out, [], size)
    return out


def _render_fused(
    image: np.ndarray,
    params: TrainParams,
    warp: np.ndarray,
    box: Tuple[int, int, int, int],
    out_size: Tuple[int, int],
) -> np.ndarray:
    """Image path as one warp: source -> flip/rotate/rescale -> crop -> resize, bilinear.

    The colour jitter is per pixel, so it is applied to whichever is smaller: the source
    pixels the warp reads (the preimage of the output plus a margin; identical to
    jittering the whole image), or the warped output (jitter after interpolation instead
    of before: the two differ by rounding, ~0.03 grey levels on average).
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    out_h, out_w = out_size
    to_output = np.array([[out_w / (x2 - x1), 0.0, -x1 * out_w / (x2 - x1)],
                          [0.0, out_h / (y2 - y1), -y1 * out_h / (y2 - y1)],
                          [0.0, 0.0, 1.0]])
    pixel = np.vstack([_pixel_matrix(to_output @ warp), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(pixel)
    corners = np.array([[-0.5, -0.5, 1.0], [out_w - 0.5, -0.5, 1.0], [-0.5, out_h - 0.5, 1.0],
                        [out_w - 0.5, out_h - 0.5, 1.0]])
    src = corners @ inverse[:2].T
    margin = 2
    sx0 = int(np.clip(np.floor(src[:, 0].min()) - margin, 0, width))
    sy0 = int(np.clip(np.floor(src[:, 1].min()) - margin, 0, height))
    sx1 = int(np.clip(np.ceil(src[:, 0].max()) + margin + 1, 0, width))
    sy1 = int(np.clip(np.ceil(src[:, 1].max()) + margin + 1, 0, height))
    if sx1 <= sx0 or sy1 <= sy0:  # the output reads only the zero border
        return np.zeros((out_h, out_w, 3), dtype=np.uint8)
    region = image[sy0:sy1, sx0:sx1]
    jitter_source = region.shape[0] * region.shape[1] <= out_h * out_w
    if jitter_source:
        region = color_jitter(region, params)
    shift = np.array([[1.0, 0.0, sx0], [0.0, 1.0, sy0], [0.0, 0.0, 1.0]])
    out = _warp_bilinear(region, (pixel @ shift)[:2], (out_w, out_h))
    return out if jitter_source else color_jitter(out, params)
