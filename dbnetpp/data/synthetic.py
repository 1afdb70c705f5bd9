"""Synthetic scene text: random words drawn with OpenCV's Hershey fonts on cluttered backgrounds.

Each image is a colour gradient with smooth blotches, rectangles, circles, and lines and
curves that look like pen strokes (hard negatives), then 3-10 character words of letters
and digits at random sizes (small text too), rotations, mild perspective, colours (mostly
contrasting, sometimes not), outlines, shadows and blur, then optional global blur and
sensor noise. Words never overlap.

Ground truth is ICDAR-like: one quadrilateral per word, corners clockwise from the word's
top-left, integer pixels, covering the word's tight ink box (plus a one-pixel margin)
transformed like the text. About one word in ten is ``###`` ("do not care"): the tiny,
heavily blurred and low-contrast ones.

Sample ``i`` depends only on ``(seed, i)`` (and the size), so any worker can make any sample.
"""

import math
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import cv2
import numpy as np

IGNORE_TEXT = "###"
ALPHABET_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ALPHABET_LOWER = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# (font, weight): the script fonts are harder to read, so rarer.
FONTS = (
    (cv2.FONT_HERSHEY_SIMPLEX, 4),
    (cv2.FONT_HERSHEY_DUPLEX, 3),
    (cv2.FONT_HERSHEY_COMPLEX, 2),
    (cv2.FONT_HERSHEY_TRIPLEX, 2),
    (cv2.FONT_HERSHEY_PLAIN, 2),
    (cv2.FONT_HERSHEY_COMPLEX_SMALL, 2),
    (cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, 1),
)
_FONT_P = np.array([w for _, w in FONTS], dtype=np.float64) / sum(w for _, w in FONTS)
_LUMA_BGR = np.array([0.114, 0.587, 0.299])

MIN_TEXT_HEIGHT = 8  # pixels, font cap height asked of cv2.putText
TINY_INK_HEIGHT = 9  # words whose glyph ink is shorter than this are "###"
MIN_CONTRAST = 28  # |luma(text) - luma(background)| below this -> '###'
HEAVY_BLUR_SIGMA = 2.0  # a word blurred at least this much is '###'
PLACEMENT_TRIES = 12
WORD_GAP = 3  # pixels kept free around each word's box

PathLike = Union[str, os.PathLike]


def _size_hw(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be an int or (height, width), each >= 32 pixels, got {size!r}")
    return int(size[0]), int(size[1])


class SyntheticText:
    """Deterministic synthetic scene-text images, indexable like :class:`ICDAR2015`.

    ``dataset[i]`` is ``{"image": BGR uint8 (H, W, 3), "polygons": list of float32 (4, 2)
    (x, y pixels, integer valued), "ignore": bool ndarray (n,), "texts": list[str],
    "path": str, "ori_size": (H, W)}``, generated on first access.

    Args:
        num_images: dataset length.
        size: image size, an int (square) or (height, width), pixels.
        seed: base seed; sample i is made from ``numpy.random.default_rng([seed, i])``.
        words_per_image: (min, max) words attempted on a 640 x 640 image; scaled by area.
        cache: keep generated samples in memory (about 1.2 MB per 640 x 640 image); their
            arrays are then read-only (shared by every access).
    """

    def __init__(
        self,
        num_images: int,
        size: Union[int, Tuple[int, int]] = 640,
        seed: int = 0,
        *,
        words_per_image: Tuple[int, int] = (5, 14),
        cache: bool = False,
    ) -> None:
        if int(num_images) < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if not 0 <= words_per_image[0] <= words_per_image[1]:
            raise ValueError(f"words_per_image must be (min, max) with 0 <= min <= max, got {words_per_image}")
        self.num_images = int(num_images)
        self.size = _size_hw(size)
        self.seed = int(seed)
        self.words_per_image = (int(words_per_image[0]), int(words_per_image[1]))
        self.cache = cache
        self._cache: Dict[int, Dict[str, Any]] = {}
        self._noise: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_images={self.num_images}, size={self.size}, seed={self.seed})"

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        index = int(index) % self.num_images
        sample = self._cache.get(index)
        if sample is None:
            sample = self.generate(index)
            if self.cache:
                for array in (sample["image"], sample["ignore"], *sample["polygons"]):
                    array.flags.writeable = False  # shared by every caller: copy before editing
                self._cache[index] = sample
        if self.cache:
            sample = dict(sample, polygons=list(sample["polygons"]), texts=list(sample["texts"]))
        return sample

    # ------------------------------------------------------------------ generation

    def generate(self, index: int, with_text_mask: bool = False) -> Dict[str, Any]:
        """Make sample ``index`` (no caching).

        With ``with_text_mask`` the sample also has ``"text_mask"``: uint8 (H, W) coverage of
        the drawn words (glyphs and outlines, 255 = ink) before the global blur and noise.
        """
        rng = np.random.default_rng([self.seed, int(index)])
        height, width = self.size
        image = _background(rng, height, width)
        occupied = np.zeros((height, width), dtype=np.uint8)
        text_mask = np.zeros((height, width), dtype=np.uint8)
        area_scale = height * width / 640.0**2
        lo, hi = self.words_per_image
        count = int(round(rng.integers(lo, hi + 1) * area_scale))
        count = max(count, 1) if hi > 0 else 0
        polygons: List[np.ndarray] = []
        texts: List[str] = []
        ignore: List[bool] = []
        max_text_height = max(MIN_TEXT_HEIGHT + 4, min(height, width) / 6.0)
        for _ in range(count):
            word = _place_word(rng, image, occupied, text_mask, max_text_height)
            if word is not None:
                quad, text, ignored = word
                polygons.append(quad)
                texts.append(IGNORE_TEXT if ignored else text)
                ignore.append(ignored)
        image = self._finish(rng, image)
        sample = {
            "image": image,
            "polygons": polygons,
            "ignore": np.array(ignore, dtype=bool),
            "texts": texts,
            "path": f"synthetic-{self.seed}/img_{index + 1}.png",
            "ori_size": (height, width),
        }
        if with_text_mask:
            sample["text_mask"] = text_mask
        return sample

    def _noise_bank(self) -> np.ndarray:
        """int8 Gaussian noise (sigma 16) a little larger than the image, made once per dataset."""
        if self._noise is None:
            height, width = self.size
            bank_rng = np.random.default_rng([self.seed, 0x5EED, 0x7015E])  # 3 words: never a sample's
            noise = bank_rng.standard_normal((height + 32, width + 32, 3), dtype=np.float32) * 16.0
            self._noise = np.clip(noise, -127, 127).astype(np.int8)
        return self._noise

    def _finish(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """Optional global blur, then sensor noise (a random window of the noise bank)."""
        if rng.random() < 0.3:
            image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.3, 0.9)))
        if rng.random() < 0.75:
            height, width = self.size
            oy, ox = rng.integers(0, 33, size=2)
            window = self._noise_bank()[oy:oy + height, ox:ox + width].reshape(height, width * 3)
            sigma = float(rng.uniform(1.0, 7.0))
            # single-channel views: a scalar then applies to every channel
            noise = cv2.multiply(window, 1.0, scale=sigma / 16.0, dtype=cv2.CV_16S)
            image = cv2.add(image.reshape(height, width * 3), noise, dtype=cv2.CV_8U).reshape(height, width, 3)
        return image

    # ------------------------------------------------------------------ ICDAR export

    def write_icdar(
        self, root: PathLike, split: str = "train", image_format: str = "png", jpeg_quality: int = 95
    ) -> Path:
        """Write the set in the official ICDAR 2015 layout, readable by :class:`ICDAR2015`.

        ``train``: ``ch4_training_images/img_N.<ext>`` and
        ``ch4_training_localization_transcription_gt/gt_img_N.txt`` (UTF-8 with BOM);
        ``test``: ``ch4_test_images/`` and ``Challenge4_Test_Task1_GT/`` (no BOM). Lines are
        ``x1,y1,...,x4,y4,text`` with CRLF, N = index + 1. PNG round-trips exactly; JPEG
        (``image_format="jpg"``) is smaller and lossy.

        Returns:
            ``root`` as a Path.
        """
        folders = {
            "train": ("ch4_training_images", "ch4_training_localization_transcription_gt", "utf-8-sig"),
            "test": ("ch4_test_images", "Challenge4_Test_Task1_GT", "utf-8"),
        }
        if split not in folders:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        ext = image_format.lower().lstrip(".")
        if ext not in ("png", "jpg", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext != "png" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
        root = Path(root)
        image_dir, gt_dir, encoding = folders[split]
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        (root / gt_dir).mkdir(parents=True, exist_ok=True)
        for i in range(len(self)):
            sample = self[i]
            name = f"img_{i + 1}"
            ok, data = cv2.imencode(f".{ext}", sample["image"], params)
            if not ok:
                raise ValueError(f"could not encode {name}.{ext}")
            data.tofile(str(root / image_dir / f"{name}.{ext}"))
            lines = []
            for poly, text in zip(sample["polygons"], sample["texts"]):
                coords = ",".join(str(int(round(float(v)))) for v in poly.reshape(-1))
                lines.append(f"{coords},{text}")
            with open(root / gt_dir / f"gt_{name}.txt", "w", encoding=encoding, newline="") as f:
                f.write("".join(line + "\r\n" for line in lines))
        return root


# ---------------------------------------------------------------------- background


def _random_color(rng: np.random.Generator, low: int = 0, high: int = 256) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))


def _bezier(rng: np.random.Generator, height: int, width: int, reach: float) -> np.ndarray:
    """A random cubic Bezier curve as (N, 1, 2) int32 points (4 bits of sub-pixel shift)."""
    start = rng.uniform([0, 0], [width, height])
    controls = start + rng.uniform(-reach, reach, size=(3, 2))
    pts = np.vstack([start, controls])
    t = np.linspace(0.0, 1.0, 24)[:, None]
    curve = ((1 - t) ** 3) * pts[0] + 3 * ((1 - t) ** 2) * t * pts[1] + 3 * (1 - t) * t**2 * pts[2] + t**3 * pts[3]
    return np.round(curve * 16).astype(np.int32).reshape(-1, 1, 2)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient + smooth blotches, then rectangles, circles, lines and stroke-like curves."""
    gh, gw = max(2, height // 16), max(2, width // 16)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float32)
    t = xs / gw * math.cos(angle) + ys / gh * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    small = c0 + t[..., None] * (c1 - c0)
    small += rng.normal(0.0, rng.uniform(3, 30), size=(gh, gw, 3))
    small = np.clip(small, 0, 255).astype(np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)

    side = min(height, width)
    overlay = image.copy()
    for _ in range(int(rng.integers(0, 7))):  # rectangles, some only outlined
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1 = int(x0 + rng.integers(side // 16, side // 2))
        y1 = int(y0 + rng.integers(side // 16, side // 2))
        thickness = -1 if rng.random() < 0.7 else int(rng.integers(1, 6))
        cv2.rectangle(overlay, (int(x0), int(y0)), (x1, y1), _random_color(rng), thickness)
    for _ in range(int(rng.integers(0, 5))):  # circles and ellipses
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(4, side // 5)), int(rng.integers(4, side // 5)))
        thickness = -1 if rng.random() < 0.6 else int(rng.integers(1, 5))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(overlay, centre, axes, angle, 0, 360, _random_color(rng), thickness, cv2.LINE_AA)
    opacity = float(rng.uniform(0.4, 1.0)) if rng.random() < 0.5 else 1.0  # semi-transparent shapes
    image = cv2.addWeighted(overlay, opacity, image, 1.0 - opacity, 0.0)

    for _ in range(int(rng.integers(1, 10))):  # straight lines: object edges, poles, wires
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p0, p1, _random_color(rng), int(rng.integers(1, 5)), cv2.LINE_AA)
    for _ in range(int(rng.integers(2, 12))):  # curves with stroke widths like text
        curve = _bezier(rng, height, width, reach=side * rng.uniform(0.03, 0.25))
        cv2.polylines(image, [curve], False, _random_color(rng), int(rng.integers(1, 6)), cv2.LINE_AA, shift=4)
    if rng.random() < 0.3:  # a row of bars (barcode, railings): text-like texture without text
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        bar_h = int(rng.integers(8, max(9, side // 8)))
        color = _random_color(rng)
        x = x0
        for _ in range(int(rng.integers(5, 25))):
            bar_w = int(rng.integers(1, 5))
            cv2.rectangle(image, (x, y0), (x + bar_w - 1, y0 + bar_h), color, -1)
            x += bar_w + int(rng.integers(1, 7))
    return image


# ---------------------------------------------------------------------- words


def _random_word(rng: np.random.Generator) -> str:
    length = int(rng.integers(3, 11))
    style = rng.random()
    if style < 0.35:  # Capitalised
        return rng.choice(list(ALPHABET_UPPER)) + "".join(rng.choice(list(ALPHABET_LOWER), size=length - 1))
    if style < 0.65:
        chars = ALPHABET_UPPER
    elif style < 0.82:
        chars = ALPHABET_LOWER
    elif style < 0.92:
        chars = DIGITS
    else:
        chars = ALPHABET_UPPER + DIGITS
    return "".join(rng.choice(list(chars), size=length))


def _render_mask(text: str, font: int, scale: float, thickness: int, pad: int) -> np.ndarray:
    """Anti-aliased text coverage (uint8, 255 = ink) on a canvas with ``pad`` free pixels around."""
    (tw, th), baseline = cv2.getTextSize(text, font, scale, thickness)
    canvas = np.zeros((th + baseline + 2 * pad, tw + 2 * pad), dtype=np.uint8)
    cv2.putText(canvas, text, (pad, pad + th), font, scale, 255, thickness, cv2.LINE_AA)
    return canvas


def _luma(color: np.ndarray) -> float:
    return float(np.dot(np.asarray(color, dtype=np.float64), _LUMA_BGR))


def _text_color(rng: np.random.Generator, background_luma: float, contrast: float) -> np.ndarray:
    """A BGR colour whose luma differs from ``background_luma`` by about ``contrast``."""
    if background_luma + contrast > 255:
        target = background_luma - contrast
    elif background_luma - contrast < 0:
        target = background_luma + contrast
    else:
        target = background_luma + contrast * (1 if rng.random() < 0.5 else -1)
    tint = rng.uniform(-1.0, 1.0, size=3) * rng.uniform(0, 60)
    tint -= _luma(tint)  # keep the luma
    return np.clip(target + tint, 0, 255)


class _Word(NamedTuple):
    text: str
    mask: np.ndarray  # glyph coverage on the word canvas, uint8
    outline: Optional[np.ndarray]  # coverage of an outline around the glyphs, or None
    shadow: bool
    ink_height: int  # glyph ink height, pixels
    homography: np.ndarray  # canvas (continuous) -> image (continuous) minus the centre


def _place_word(
    rng: np.random.Generator,
    image: np.ndarray,
    occupied: np.ndarray,
    text_mask: np.ndarray,
    max_text_height: float,
) -> Optional[Tuple[np.ndarray, str, bool]]:
    """Draw one word where it overlaps no other; returns (quad, text, ignored) or None."""
    height, width = image.shape[:2]
    text = _random_word(rng)
    font = FONTS[int(rng.choice(len(FONTS), p=_FONT_P))][0]
    if rng.random() < 0.15:
        font |= cv2.FONT_ITALIC
    text_h = math.exp(rng.uniform(math.log(MIN_TEXT_HEIGHT), math.log(max_text_height)))
    thickness = max(1, int(round(text_h * rng.uniform(0.05, 0.14))))
    (unit_w, unit_h), _ = cv2.getTextSize(text, font, 1.0, thickness)
    scale = text_h / max(unit_h, 1)
    if unit_w * scale > 0.9 * width:  # too long for the image: shrink
        scale *= 0.9 * width / (unit_w * scale)
    effect = rng.random()
    outline_px = max(1, int(round(text_h / 20))) if effect < 0.12 else 0
    mask = _render_mask(text, font, scale, thickness, pad=thickness + 2 + outline_px)
    outline = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=outline_px) if outline_px else None
    footprint = mask if outline is None else outline
    rows = np.flatnonzero(footprint.any(axis=1))
    cols = np.flatnonzero(footprint.any(axis=0))
    glyph_rows = np.flatnonzero(mask.any(axis=1))
    if glyph_rows.size == 0:
        return None
    ch, cw = mask.shape
    # Tight box of the drawn footprint in continuous canvas coordinates, one pixel of margin.
    box = np.array([[cols[0], rows[0]], [cols[-1] + 1, rows[0]], [cols[-1] + 1, rows[-1] + 1], [cols[0], rows[-1] + 1]],
                   dtype=np.float64)
    box += np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)

    # Rotation (mostly mild) and perspective (corner jitter), about the canvas centre.
    u = rng.random()
    angle = rng.normal(0, 3) if u < 0.55 else (rng.uniform(-25, 25) if u < 0.9 else rng.uniform(-50, 50))
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    corners = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], dtype=np.float64)
    centred = (corners - [cw / 2, ch / 2]) @ rot.T
    centred += rng.normal(0, 0.06 * ch, size=(4, 2)) * (rng.random() < 0.6)
    homography = cv2.getPerspectiveTransform(corners.astype(np.float32), centred.astype(np.float32))
    quad0 = cv2.perspectiveTransform(box[None], homography)[0]  # GT corners about the origin
    canvas0 = cv2.perspectiveTransform(corners[None], homography)[0]
    lo, hi = quad0.min(axis=0), quad0.max(axis=0)
    if hi[0] - lo[0] > width - 4 or hi[1] - lo[1] > height - 4:
        return None

    word = _Word(text, mask, outline, 0.12 <= effect < 0.22, int(glyph_rows[-1] - glyph_rows[0] + 1), homography)
    for _ in range(PLACEMENT_TRIES):
        cx = rng.uniform(2 - lo[0], width - 2 - hi[0])
        cy = rng.uniform(2 - lo[1], height - 2 - hi[1])
        quad = quad0 + [cx, cy]
        if _is_free(occupied, quad):
            return _draw_word(rng, image, occupied, text_mask, word, (cx, cy), quad, canvas0 + [cx, cy])
    return None


def _quad_mask(quad: np.ndarray, x0: int, y0: int, shape: Tuple[int, int], grow: int) -> np.ndarray:
    local = np.zeros(shape, dtype=np.uint8)
    pts = np.round((quad - [x0 - 0.5, y0 - 0.5]) * 16).astype(np.int32)  # continuous -> pixel index, 4-bit shift
    cv2.fillConvexPoly(local, pts, 1, cv2.LINE_8, shift=4)
    if grow > 0:
        local = cv2.dilate(local, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
    return local


def _bounds(quad: np.ndarray, margin: int, height: int, width: int) -> Tuple[int, int, int, int]:
    x0 = max(int(math.floor(quad[:, 0].min())) - margin, 0)
    y0 = max(int(math.floor(quad[:, 1].min())) - margin, 0)
    x1 = min(int(math.ceil(quad[:, 0].max())) + margin + 1, width)
    y1 = min(int(math.ceil(quad[:, 1].max())) + margin + 1, height)
    return x0, y0, x1, y1


def _is_free(occupied: np.ndarray, quad: np.ndarray) -> bool:
    x0, y0, x1, y1 = _bounds(quad, WORD_GAP, *occupied.shape)
    region = occupied[y0:y1, x0:x1]
    if not region.any():
        return True
    return not np.any(region & _quad_mask(quad, x0, y0, region.shape, WORD_GAP))


def _draw_word(
    rng: np.random.Generator,
    image: np.ndarray,
    occupied: np.ndarray,
    text_mask: np.ndarray,
    word: _Word,
    centre: Tuple[float, float],
    quad: np.ndarray,
    canvas_quad: np.ndarray,
) -> Tuple[np.ndarray, str, bool]:
    height, width = image.shape[:2]
    x0, y0, x1, y1 = _bounds(canvas_quad, 2, height, width)
    # canvas pixel index -> continuous -> image continuous -> pixel index relative to (x0, y0)
    to_region = np.array([[1, 0, centre[0] - x0 - 0.5], [0, 1, centre[1] - y0 - 0.5], [0, 0, 1]], dtype=np.float64)
    from_index = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)
    warp = to_region @ word.homography @ from_index
    size = (x1 - x0, y1 - y0)
    u = rng.random()
    sigma = 0.0 if u < 0.55 else (rng.uniform(0.4, 1.3) if u < 0.96 else rng.uniform(HEAVY_BLUR_SIGMA, 3.5))

    def to_image(coverage: np.ndarray) -> np.ndarray:
        out = cv2.warpPerspective(coverage, warp, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return cv2.GaussianBlur(out, (0, 0), sigma) if sigma > 0 else out

    alpha = to_image(word.mask)
    region = image[y0:y1, x0:x1]
    background = np.array(cv2.mean(region, mask=alpha)[:3])  # under the ink (alpha > 0)
    u = rng.random()
    contrast = rng.uniform(70, 200) if u < 0.88 else (rng.uniform(40, 70) if u < 0.96 else rng.uniform(12, 40))
    color = _text_color(rng, _luma(background), contrast)

    out = region
    ink = text_mask[y0:y1, x0:x1]
    if word.outline is not None:  # outline in a contrasting colour
        edge = to_image(word.outline)
        out = _blend(out, edge, _text_color(rng, _luma(color), 120))
        np.maximum(ink, edge, out=ink)
    elif word.shadow:  # drop shadow (not part of the text)
        shift = np.float32([[1, 0, rng.integers(1, 4)], [0, 1, rng.integers(1, 4)]])
        out = _blend(out, cv2.warpAffine(alpha, shift, size), np.full(3, 20.0), opacity=0.6)
    image[y0:y1, x0:x1] = _blend(out, alpha, color)
    np.maximum(ink, alpha, out=ink)

    gx0, gy0, gx1, gy1 = _bounds(quad, WORD_GAP, height, width)
    occupied[gy0:gy1, gx0:gx1] |= _quad_mask(quad, gx0, gy0, (gy1 - gy0, gx1 - gx0), WORD_GAP)

    contrast = abs(_luma(color) - _luma(background))  # after clipping to [0, 255]
    ignored = word.ink_height < TINY_INK_HEIGHT or sigma >= HEAVY_BLUR_SIGMA or contrast < MIN_CONTRAST
    gt = np.clip(np.round(quad), [0, 0], [width, height]).astype(np.float32)
    return gt, word.text, bool(ignored)


def _blend(base: np.ndarray, alpha: np.ndarray, color: np.ndarray, opacity: float = 1.0) -> np.ndarray:
    """Paint ``color`` over uint8 ``base`` with per-pixel coverage ``alpha`` (uint8, 255 = opaque)."""
    weight = alpha.astype(np.float32) * np.float32(opacity / 255.0)
    paint = np.empty_like(base)
    paint[:] = np.round(np.asarray(color, dtype=np.float64)).astype(np.uint8)
    return cv2.blendLinear(paint, base, weight, 1.0 - weight)
