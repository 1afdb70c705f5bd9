"""ICDAR 2015 style H-mean of IoU-matched text polygons (MMOCR v1.0.1's
``HmeanIOUMetric``).

Per image:

1. predictions scoring below the lowest score threshold are dropped; so is a
   prediction whose area lies more than ``ignore_precision_thr`` inside some
   ignored (``###``) ground-truth polygon:
   ``area(gt & pred) / (area(pred) + 1e-5) > ignore_precision_thr``;
2. an IoU matrix is computed between the cared-for ground truth and the kept
   predictions (invalid polygons are first repaired with ``buffer(0)``, and a
   repair that yields several pieces is replaced by their convex hull).

Over the dataset, for each score threshold t the predictions with
``score >= t`` are matched to ground truth with IoU strictly above
``match_iou_thr``: greedily, pair by pair in row-major (gt, pred) order
('vanilla'), or by a maximum bipartite matching ('max_matching').
The reported result is the threshold with the best H-mean (the first one on
ties).

Per-image results are reduced to hit / prediction / ground-truth counts per
threshold right away, so the state is a few integers: :meth:`HmeanIoU.state`
and :meth:`HmeanIoU.merge` carry it across processes.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import shapely
from shapely.geometry import Polygon

# MMOCR's np.arange(0.3, 0.9, 0.1): 7 float64 thresholds 0.3, 0.4, 0.5, 0.6000000000000001,
# 0.7000000000000002, 0.8000000000000003, 0.9000000000000001. Scores are float32 and compared
# against these float64 values, so a score of 0.7 (0.69999999) is below the fifth threshold.
DEFAULT_SCORE_THRS = tuple(np.arange(0.3, 0.9, 0.1).tolist())


def to_shapely(polygon: Any, what: str = "polygon") -> Polygon:
    """A shapely Polygon from (K, 2) or (2K,) coordinates, rounded to float32 like MMOCR.

    Raises ValueError naming ``what`` for fewer than 3 points or a coordinate that is not
    finite (after the float32 rounding: 1e39 is inf)."""
    try:
        with np.errstate(over="ignore"):
            points = np.asarray(polygon, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: not an array of numbers ({err})") from None
    if points.size % 2 != 0 or points.size < 6:
        raise ValueError(f"{what}: need at least 3 (x, y) points, got an array of shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{what}: coordinates must be finite, got {points.reshape(-1).tolist()[:12]}")
    return Polygon(points.reshape(-1, 2))


def make_valid(polygon: Polygon) -> Polygon:
    """Repair a self-crossing / self-touching polygon: ``buffer(0)``; when that
    splits it into several pieces, their convex hull (MMOCR's ``poly_make_valid``).
    The result may be empty."""
    fixed = polygon if polygon.is_valid else polygon.buffer(0)
    if not isinstance(fixed, Polygon):
        fixed = fixed.convex_hull
    return fixed


def _pairwise(gts: Sequence, preds: Sequence, op) -> np.ndarray:
    """``op`` area (intersection or union) for every (gt, pred) pair whose
    bounding boxes touch or overlap; NaN elsewhere. (G, P) float64."""
    out = np.full((len(gts), len(preds)), np.nan)
    if len(gts) == 0 or len(preds) == 0:
        return out
    gb = shapely.bounds(np.asarray(gts, dtype=object))  # (G, 4) minx, miny, maxx, maxy
    pb = shapely.bounds(np.asarray(preds, dtype=object))
    with np.errstate(invalid="ignore"):  # empty geometries have NaN bounds
        near = ~(
            (gb[:, None, 0] > pb[None, :, 2])
            | (pb[None, :, 0] > gb[:, None, 2])
            | (gb[:, None, 1] > pb[None, :, 3])
            | (pb[None, :, 1] > gb[:, None, 3])
        )
    gi, pi = np.nonzero(near)
    if len(gi):
        a = np.asarray(gts, dtype=object)[gi]
        b = np.asarray(preds, dtype=object)[pi]
        out[gi, pi] = shapely.area(op(a, b))
    return out


def iou_matrix(gts: Sequence[Polygon], preds: Sequence[Polygon]) -> np.ndarray:
    """(G, P) IoU of already-valid shapely polygons; 0 where the union is empty.

    Computed with the same GEOS operations as MMOCR's ``poly_iou`` (so the same
    floats); pairs with disjoint bounding boxes are 0 without calling GEOS.
    """
    iou = np.zeros((len(gts), len(preds)))
    inter = _pairwise(gts, preds, shapely.intersection)
    near = ~np.isnan(inter)
    if near.any():
        union = _pairwise(gts, preds, shapely.union)
        ok = near & (union != 0)
        iou[ok] = inter[ok] / union[ok]
    return iou


def vanilla_match_pairs(matched: np.ndarray) -> List[Tuple[int, int]]:
    """Greedy matching of a boolean (G, P) matrix in row-major order: a pair
    is accepted when neither its gt nor its prediction is taken yet. Returns the
    accepted (gt, pred) index pairs."""
    used_gt, used_pred = set(), set()
    pairs = []
    for g, p in zip(*np.nonzero(matched)):
        if g in used_gt or p in used_pred:
            continue
        used_gt.add(g)
        used_pred.add(p)
        pairs.append((int(g), int(p)))
    return pairs


def vanilla_match_count(matched: np.ndarray) -> int:
    """Number of pairs of :func:`vanilla_match_pairs`."""
    return len(vanilla_match_pairs(matched))


def max_match_pairs(matched: np.ndarray) -> List[Tuple[int, int]]:
    """(gt, pred) pairs of a maximum bipartite matching of a boolean (G, P) matrix.

    Augmenting paths (Kuhn's algorithm, iterative): O(G * edges), plenty for the tens of
    polygons of an image; no scipy needed.
    """
    matched = np.asarray(matched, dtype=bool)
    if matched.ndim != 2:
        raise ValueError(f"matched must be a (G, P) boolean matrix, got shape {matched.shape}")
    neighbours = [np.flatnonzero(row).tolist() for row in matched]
    pred_owner = [-1] * matched.shape[1]  # gt matched to each prediction, -1: free
    gt_match = [-1] * matched.shape[0]  # prediction matched to each gt
    for root in range(matched.shape[0]):
        # depth-first search for an augmenting path: root -> p1 (owned by g1) -> p2 ... -> free p
        visited = [False] * matched.shape[1]
        stack = [(root, iter(neighbours[root]))]
        free = -1
        while stack and free < 0:
            _, candidates = stack[-1]
            for p in candidates:
                if not visited[p]:
                    visited[p] = True
                    if pred_owner[p] < 0:
                        free = p
                    else:
                        stack.append((pred_owner[p], iter(neighbours[pred_owner[p]])))
                    break
            else:
                stack.pop()
        # flip the path: each gt on it takes the prediction the next one held (the last, the free one)
        p = free
        for gt, _ in reversed(stack if free >= 0 else []):
            pred_owner[p], gt_match[gt], p = gt, p, gt_match[gt]
    return [(g, p) for g, p in enumerate(gt_match) if p >= 0]


def max_match_count(matched: np.ndarray) -> int:
    """Size of a maximum bipartite matching of a boolean (G, P) matrix."""
    return len(max_match_pairs(matched))


def compute_hmean(hits: int, gt_num: int, pred_num: int) -> Dict[str, float]:
    """Precision, recall and H-mean with ICDAR's edge cases: recall is 1 without
    ground truth; precision is 0 without predictions (1 if there is no ground
    truth either)."""
    if gt_num == 0:
        recall = 1.0
        precision = 0.0 if pred_num > 0 else 1.0
    else:
        recall = float(hits) / gt_num
        precision = 0.0 if pred_num == 0 else float(hits) / pred_num
    denom = recall + precision
    hmean = 0.0 if denom == 0 else 2.0 * precision * recall / denom
    return {"precision": precision, "recall": recall, "hmean": hmean}


class HmeanIoU:
    """Accumulates the ICDAR 2015 H-mean over images.

    Args:
        match_iou_thr: a prediction matches a ground-truth polygon when their
            IoU is strictly greater than this.
        ignore_precision_thr: a prediction lying more than this fraction inside
            an ignored ground-truth polygon is dropped.
        score_thrs: score thresholds searched for the best H-mean (float64).
        strategy: 'vanilla' (greedy, MMOCR's default) or 'max_matching'.

    Usage: ``update(...)`` once per image, then ``compute()``.
    """

    def __init__(
        self,
        match_iou_thr: float = 0.5,
        ignore_precision_thr: float = 0.5,
        score_thrs: Sequence[float] = DEFAULT_SCORE_THRS,
        strategy: str = "vanilla",
    ) -> None:
        if strategy not in ("vanilla", "max_matching"):
            raise ValueError(f"strategy must be 'vanilla' or 'max_matching', got {strategy!r}")
        thrs = np.asarray(score_thrs, dtype=np.float64).reshape(-1)
        if thrs.size == 0:
            raise ValueError("score_thrs must hold at least one threshold")
        self.match_iou_thr = match_iou_thr
        self.ignore_precision_thr = ignore_precision_thr
        self.score_thrs = thrs
        self.strategy = strategy
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(match_iou_thr={self.match_iou_thr}, "
            f"ignore_precision_thr={self.ignore_precision_thr}, "
            f"score_thrs={[round(t, 6) for t in self.score_thrs.tolist()]}, strategy={self.strategy!r})"
        )

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.hits = np.zeros(len(self.score_thrs), dtype=np.int64)
        self.pred_nums = np.zeros(len(self.score_thrs), dtype=np.int64)
        self.gt_num = 0
        self.num_images = 0

    def update(
        self,
        pred_polygons: Sequence[Any],
        pred_scores: Sequence[float],
        gt_polygons: Sequence[Any],
        gt_ignore: Sequence[bool],
    ) -> None:
        """Add one image.

        Args:
            pred_polygons: predicted polygons, each (K, 2) or (2K,) (x, y) in
                original-image pixels, K >= 3.
            pred_scores: one score per prediction.
            gt_polygons: ground-truth polygons, same format.
            gt_ignore: one bool per ground-truth polygon, True for ``###``.
        """
        scores, pred_ignore, cared, kept, iou = self._image(pred_polygons, pred_scores, gt_polygons, gt_ignore)
        kept_scores = scores[kept]

        # 3. per-threshold hit and prediction counts
        count = vanilla_match_count if self.strategy == "vanilla" else max_match_count
        for t, thr in enumerate(self.score_thrs):
            keep = ~(kept_scores < thr)
            self.hits[t] += count(iou[:, keep] > self.match_iou_thr)
            self.pred_nums[t] += int(keep.sum())
        self.gt_num += len(cared)
        self.num_images += 1

    def _image(
        self,
        pred_polygons: Sequence[Any],
        pred_scores: Sequence[float],
        gt_polygons: Sequence[Any],
        gt_ignore: Sequence[bool],
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1 and 2 for one image: (scores (P,) float32 values as float64, pred_ignore (P,) bool,
        cared gt indices (G',), kept pred indices (P',), IoU (G', P'))."""
        # float32 like MMOCR's scores, then compared in float64 whatever numpy's promotion rules
        # (numpy 1.x would compare a float32 array with a float64 scalar in float32)
        with np.errstate(over="ignore"):
            scores = np.asarray(_to_numpy(pred_scores), dtype=np.float32).reshape(-1).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise ValueError(f"HmeanIoU.update: pred_scores[{bad[0]}] is {scores[bad[0]]}: scores must be finite")
        ignore = np.asarray(_to_numpy(gt_ignore), dtype=bool).reshape(-1)
        if len(scores) != len(pred_polygons):
            raise ValueError(f"HmeanIoU.update: {len(pred_polygons)} predicted polygons but {len(scores)} scores")
        if len(ignore) != len(gt_polygons):
            raise ValueError(
                f"HmeanIoU.update: {len(gt_polygons)} ground-truth polygons but {len(ignore)} ignore flags"
            )
        preds = [to_shapely(_to_numpy(p), f"pred_polygons[{i}]") for i, p in enumerate(pred_polygons)]
        gts = [to_shapely(_to_numpy(g), f"gt_polygons[{i}]") for i, g in enumerate(gt_polygons)]
        valid_preds = [make_valid(p) for p in preds]
        valid_gts = [make_valid(g) for g in gts]

        # 1. drop low-score predictions and those inside ignored ground truth
        pred_ignore = scores < self.score_thrs.min()
        kept = np.flatnonzero(~pred_ignore)
        ignored_gt = np.flatnonzero(ignore)
        if len(kept) and len(ignored_gt):
            inter = _pairwise(
                [valid_gts[i] for i in ignored_gt], [valid_preds[i] for i in kept], shapely.intersection
            )
            inter = np.nan_to_num(inter, nan=0.0)
            # the raw (possibly invalid) polygon's area, as MMOCR does
            areas = np.array([preds[i].area for i in kept]) + 1e-5
            pred_ignore[kept] = ((inter / areas[None, :]) > self.ignore_precision_thr).any(axis=0)

        # 2. IoU between cared-for ground truth and kept predictions
        kept = np.flatnonzero(~pred_ignore)
        cared = np.flatnonzero(~ignore)
        iou = iou_matrix([valid_gts[i] for i in cared], [valid_preds[i] for i in kept])
        return scores, pred_ignore, cared, kept, iou

    def match(
        self,
        pred_polygons: Sequence[Any],
        pred_scores: Sequence[float],
        gt_polygons: Sequence[Any],
        gt_ignore: Sequence[bool],
        score_thr: Optional[float] = None,
    ) -> Dict[str, Any]:
        """How one image is scored at ``score_thr`` (default: the lowest threshold), exactly as
        :meth:`update` counts it; does not change the accumulated state.

        Returns ``{"pred": list of str, one per prediction: "matched", "false_positive",
        "ignored" (inside a ``###`` region) or "below_thr"; "gt": list of str, one per
        ground-truth polygon: "matched", "missed" or "ignored"; "pairs": list of (gt, pred)
        index pairs}``. The number of pairs is this image's hit count at ``score_thr``.
        """
        # a float64 threshold, as update() compares with the float64 self.score_thrs entries
        thr = self.score_thrs.min() if score_thr is None else np.float64(score_thr)
        scores, pred_ignore, cared, kept, iou = self._image(pred_polygons, pred_scores, gt_polygons, gt_ignore)
        pred_state = ["ignored" if ig else "false_positive" for ig in pred_ignore.tolist()]
        for i in np.flatnonzero((scores < thr) | (scores < self.score_thrs.min())):
            pred_state[i] = "below_thr"
        gt_state = ["ignored" if ig else "missed" for ig in np.asarray(_to_numpy(gt_ignore), dtype=bool).tolist()]
        keep = ~(scores[kept] < thr)
        columns = kept[keep]
        find = vanilla_match_pairs if self.strategy == "vanilla" else max_match_pairs
        pairs = []
        for g, p in find(iou[:, keep] > self.match_iou_thr):
            gi, pi = int(cared[g]), int(columns[p])
            gt_state[gi], pred_state[pi] = "matched", "matched"
            pairs.append((gi, pi))
        return {"pred": pred_state, "gt": gt_state, "pairs": pairs}

    def compute_all(self) -> List[Dict[str, float]]:
        """Precision / recall / H-mean at every score threshold."""
        out = []
        for t, thr in enumerate(self.score_thrs.tolist()):
            result = compute_hmean(int(self.hits[t]), int(self.gt_num), int(self.pred_nums[t]))
            result["score_thr"] = thr
            out.append(result)
        return out

    def compute(self) -> Dict[str, float]:
        """The best threshold's ``precision``, ``recall``, ``hmean`` and ``score_thr``."""
        best: Optional[Dict[str, float]] = None
        for result in self.compute_all():
            if best is None or result["hmean"] > best["hmean"]:
                best = result
        return best

    def state(self) -> Dict[str, Any]:
        """The accumulated counts as plain Python data (picklable, JSON-able)."""
        return {
            "score_thrs": self.score_thrs.tolist(),
            "hits": self.hits.tolist(),
            "pred_nums": self.pred_nums.tolist(),
            "gt_num": int(self.gt_num),
            "num_images": int(self.num_images),
        }

    def merge(self, state: Dict[str, Any]) -> None:
        """Add the counts of another ``state()`` (e.g. gathered from another rank)."""
        if not np.array_equal(np.asarray(state["score_thrs"], dtype=np.float64), self.score_thrs):
            raise ValueError(
                f"HmeanIoU.merge: score thresholds differ ({state['score_thrs']} vs {self.score_thrs.tolist()})"
            )
        self.hits += np.asarray(state["hits"], dtype=np.int64)
        self.pred_nums += np.asarray(state["pred_nums"], dtype=np.int64)
        self.gt_num += int(state["gt_num"])
        self.num_images += int(state["num_images"])


def _to_numpy(x: Any) -> Any:
    """Tensors (any device) to numpy; everything else unchanged."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x
