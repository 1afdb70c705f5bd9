"""DB loss (Liao et al., "Real-time Scene Text Detection with Differentiable
Binarization", AAAI 2020), as trained by MMOCR v1.0.1's ``DBModuleLoss``.

    L = alpha * L_prob + beta * L_thr + L_db

- ``L_prob``: balanced binary cross-entropy on the probability logits with
  hard-negative mining (at most ``negative_ratio`` negatives per positive,
  chosen over the whole batch),
- ``L_thr``: L1 distance on the threshold map inside the threshold mask
  (MMOCR's ``MaskedSmoothL1Loss(beta=0)``, which torch evaluates as plain L1),
- ``L_db``: dice loss on the approximate binary map.

Every reduction runs over the whole batch, not per image.
"""

from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUT_KEYS = ("prob_logits", "thr_map", "binary_map")
TARGET_KEYS = ("shrink_map", "shrink_mask", "thr_map", "thr_mask")


def balanced_bce_with_logits_loss(
    logits: Tensor, gt: Tensor, mask: Tensor, negative_ratio: float = 3.0, eps: float = 1e-6
) -> Tensor:
    """Balanced BCE with online hard-negative mining, reduced over the batch.

    Args:
        logits: probability logits, any shape.
        gt: binary target in {0, 1}, same shape.
        mask: 1 where the pixel counts, 0 where it is ignored, same shape.
        negative_ratio: at most ``int(negative_ratio * positives)`` negatives
            (the ones with the largest loss) enter the loss.
        eps: added to the denominator.

    Returns:
        scalar tensor ``(sum of positive losses + sum of the top-k negative
        losses) / (positives + k + eps)``; 0 when there is no positive pixel.

    The counts stay on the device (no host sync, no data-dependent shape: ``torch.compile``
    traces it whole); the top-k sum is ``top_k_sum``.
    """
    positive = gt * mask
    negative = (1 - gt) * mask
    num_pos = positive.sum().floor()  # floor = int() of MMOCR for these non-negative counts
    num_neg = negative.sum().floor()
    # MMOCR: min(negatives, int(positives * ratio)), and no negative at all without a positive
    k = torch.where(num_pos > 0, torch.minimum(num_neg, (num_pos * negative_ratio).floor()), 0.0)

    loss = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    positive_loss = loss * positive
    negative_loss = loss * negative
    return (positive_loss.sum() + top_k_sum(negative_loss.reshape(-1), k)) / (num_pos + k + eps)


def top_k_sum(values: Tensor, k: Tensor) -> Tensor:
    """Sum of the ``k`` largest of the non-negative 1-D ``values`` (``k``: a 0-d tensor, integral).

    ``torch.topk(values, k).values.sum()`` without reading ``k`` on the host: the k-th largest
    value t is found exactly by bisection on the float bit patterns (31 counting passes; for
    non-negative floats the int32 patterns sort as the values do), then the sum is that of the
    values above t plus t for each of the ``k - count(values > t)`` places left to values equal
    to t. The gradient is 1 for each value above t and is shared equally among the values equal
    to t (topk gives it to some of them). NaN counts as the largest value, as in topk.
    """
    bits = values.detach().float().view(torch.int32).clamp(min=0)  # -0.0 -> 0
    k = k.to(torch.int64)
    low = torch.zeros((), dtype=torch.int64, device=values.device)  # count(bits >= low) >= k always
    high = torch.full((), 2**31 - 1, dtype=torch.int64, device=values.device)
    for _ in range(31):  # invariant: count(bits >= low) >= k > count(bits >= high) or high = max
        mid = low + (high - low + 1) // 2
        enough = (bits >= mid).sum() >= k
        low = torch.where(enough, mid, low)
        high = torch.where(enough, high, mid - 1)
    above = bits > low
    tied = bits == low
    left = (k - above.sum()).to(values.dtype)
    share = left / tied.sum().clamp(min=1).to(values.dtype)
    picked = torch.where(tied & (k > 0), values * share, torch.zeros_like(values))
    return torch.where(above, values, picked).sum()


def masked_l1_loss(pred: Tensor, gt: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """``sum(|pred*mask - gt*mask|) / (sum(mask) + eps)``.

    This is MMOCR's ``MaskedSmoothL1Loss(beta=0)``: torch's ``smooth_l1_loss``
    dispatches ``beta == 0`` to ``l1_loss`` (same values and gradients).
    """
    loss = F.smooth_l1_loss(pred * mask, gt * mask, reduction="none", beta=0.0)
    return loss.sum() / (mask.sum() + eps)


def masked_dice_loss(pred: Tensor, gt: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - 2 * sum(p*g) / (sum(p) + sum(g) + eps)`` with p = pred*mask, g = gt*mask."""
    pred = pred * mask
    gt = gt * mask
    return 1 - 2 * (pred * gt).sum() / (pred.sum() + gt.sum() + eps)


class DBLoss(nn.Module):
    """DBNet / DBNet++ training loss.

    Args:
        alpha: weight of the probability-map loss (MMOCR ``weight_prob``).
        beta: weight of the threshold-map loss (MMOCR ``weight_thr``).
        negative_ratio: negatives kept per positive in the balanced BCE.
        eps: added to every denominator.

    ``forward(outputs, targets)`` takes the train-mode model output (a mapping
    with ``prob_logits``, ``thr_map``, ``binary_map``, each (N, H, W)) and the
    targets (a mapping with ``shrink_map``, ``shrink_mask``, ``thr_map``,
    ``thr_mask``, each (N, H, W)); it returns a dict of scalar tensors
    ``loss`` (the total), ``loss_prob`` (= alpha * L_prob),
    ``loss_thr`` (= beta * L_thr) and ``loss_db``. Everything is computed in
    float32, also under autocast.
    """

    def __init__(
        self, alpha: float = 5.0, beta: float = 10.0, negative_ratio: float = 3.0, eps: float = 1e-6
    ) -> None:
        super().__init__()
        if negative_ratio < 0:
            raise ValueError(f"negative_ratio must be >= 0, got {negative_ratio}")
        self.alpha = alpha
        self.beta = beta
        self.negative_ratio = negative_ratio
        self.eps = eps

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, negative_ratio={self.negative_ratio}, eps={self.eps}"

    def forward(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        _check_inputs(outputs, targets)
        device = outputs["prob_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            prob_logits = outputs["prob_logits"].float()
            thr_map = outputs["thr_map"].float()
            binary_map = outputs["binary_map"].float()
            shrink_map = targets["shrink_map"].to(device=device, dtype=torch.float32)
            shrink_mask = targets["shrink_mask"].to(device=device, dtype=torch.float32)
            gt_thr = targets["thr_map"].to(device=device, dtype=torch.float32)
            thr_mask = targets["thr_mask"].to(device=device, dtype=torch.float32)

            loss_prob = self.alpha * balanced_bce_with_logits_loss(
                prob_logits, shrink_map, shrink_mask, self.negative_ratio, self.eps
            )
            loss_thr = self.beta * masked_l1_loss(thr_map, gt_thr, thr_mask, self.eps)
            loss_db = masked_dice_loss(binary_map, shrink_map, shrink_mask, self.eps)
            # Summed in this order, like mmengine's parse_losses.
            loss = loss_prob + loss_thr + loss_db
        return {"loss": loss, "loss_prob": loss_prob, "loss_thr": loss_thr, "loss_db": loss_db}


def _check_inputs(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
    for kind, mapping, keys in (("outputs", outputs, OUTPUT_KEYS), ("targets", targets, TARGET_KEYS)):
        if not isinstance(mapping, Mapping):
            raise TypeError(f"DBLoss: {kind} must be a mapping with keys {keys}, got {type(mapping).__name__}")
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise KeyError(f"DBLoss: {kind} lacks key(s) {missing}; expected {keys}")
        for k in keys:
            if not isinstance(mapping[k], Tensor):
                raise TypeError(f"DBLoss: {kind}[{k!r}] must be a torch.Tensor, got {type(mapping[k]).__name__}")
    ref = outputs["prob_logits"].shape
    if len(ref) != 3:
        raise ValueError(f"DBLoss: outputs['prob_logits'] must be (N, H, W), got shape {tuple(ref)}")
    if ref.numel() == 0:
        raise ValueError(f"DBLoss: outputs['prob_logits'] is empty, shape {tuple(ref)}")
    for kind, mapping, keys in (("outputs", outputs, OUTPUT_KEYS), ("targets", targets, TARGET_KEYS)):
        for k in keys:
            if mapping[k].shape != ref:
                raise ValueError(
                    f"DBLoss: {kind}[{k!r}] has shape {tuple(mapping[k].shape)}, "
                    f"expected {tuple(ref)} like outputs['prob_logits']"
                )
