import math

import pytest
import torch

from dbnetpp.loss import DBLoss


def make_batch(n=2, h=9, w=11, seed=0, pos_fraction=0.2, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, h, w, generator=g) * 3
    thr = torch.rand(n, h, w, generator=g)
    binary = torch.rand(n, h, w, generator=g)
    outputs = {"prob_logits": logits, "thr_map": thr, "binary_map": binary}
    if requires_grad:
        outputs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    targets = {
        "shrink_map": (torch.rand(n, h, w, generator=g) < pos_fraction).float(),
        "shrink_mask": (torch.rand(n, h, w, generator=g) < 0.85).float(),
        "thr_map": 0.3 + 0.4 * torch.rand(n, h, w, generator=g),
        "thr_mask": (torch.rand(n, h, w, generator=g) < 0.5).float(),
    }
    return outputs, targets


def brute_force_balanced_bce(logits, gt, mask, ratio=3.0, eps=1e-6):
    """Pixel lists and a sort, in float64: the definition, not the implementation."""
    pos, neg = [], []
    for x, y, m in zip(logits.double().flatten().tolist(), gt.flatten().tolist(), mask.flatten().tolist()):
        bce = max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))
        if m == 1 and y == 1:
            pos.append(bce)
        elif m == 1 and y == 0:
            neg.append(bce)
    k = min(len(neg), int(len(pos) * ratio)) if pos else 0
    hard = sorted(neg, reverse=True)[:k]
    return (sum(pos) + sum(hard)) / (len(pos) + k + eps), len(pos), k


def test_hand_computed_balanced_bce():
    # logits 0 everywhere: every pixel costs ln 2; 1 positive -> 3 negatives.
    outputs = {k: torch.zeros(1, 1, 5) for k in ("prob_logits", "thr_map", "binary_map")}
    targets = {
        "shrink_map": torch.tensor([[[1.0, 0, 0, 0, 0]]]),
        "shrink_mask": torch.ones(1, 1, 5),
        "thr_map": torch.zeros(1, 1, 5),
        "thr_mask": torch.zeros(1, 1, 5),
    }
    out = DBLoss(alpha=1.0)(outputs, targets)
    assert out["loss_prob"].item() == pytest.approx(4 * math.log(2) / (4 + 1e-6), rel=1e-6)

    # negative_ratio 1 keeps only the hardest negative (logit 3 -> softplus(3)).
    outputs["prob_logits"] = torch.tensor([[[0.0, 2.0, -1.0, 3.0, 1.0]]])
    out = DBLoss(alpha=1.0, negative_ratio=1.0)(outputs, targets)
    expected = (math.log(2) + math.log1p(math.exp(3.0))) / (2 + 1e-6)
    assert out["loss_prob"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("pos_fraction", [0.05, 0.2, 0.6])  # 0.6: fewer negatives than 3 x positives
def test_hard_negative_mining_matches_brute_force(pos_fraction):
    outputs, targets = make_batch(pos_fraction=pos_fraction, seed=int(pos_fraction * 100))
    expected, num_pos, k = brute_force_balanced_bce(
        outputs["prob_logits"], targets["shrink_map"], targets["shrink_mask"]
    )
    num_neg = int(((1 - targets["shrink_map"]) * targets["shrink_mask"]).sum())
    assert k == min(num_neg, 3 * num_pos)
    got = DBLoss()(outputs, targets)["loss_prob"].item() / 5.0
    assert got == pytest.approx(expected, rel=1e-5)


def test_mining_is_over_the_whole_batch():
    # Image 0: 8 positives and no negatives; image 1: 32 negatives, no positive.
    # Batch-wide mining takes the 24 hardest negatives of image 1; per-image
    # mining would take none.
    logits = torch.zeros(2, 4, 8)
    logits[1] = torch.linspace(-4, 6, 32).reshape(4, 8)[torch.randperm(4, generator=torch.Generator().manual_seed(0))]
    gt = torch.zeros(2, 4, 8)
    gt[0, 0] = 1
    mask = torch.ones(2, 4, 8)
    mask[0, 1:] = 0
    zeros = torch.zeros(2, 4, 8)
    outputs = {"prob_logits": logits, "thr_map": zeros, "binary_map": zeros}
    targets = {"shrink_map": gt, "shrink_mask": mask, "thr_map": zeros, "thr_mask": mask}
    got = DBLoss(alpha=1.0)(outputs, targets)["loss_prob"].item()
    expected, num_pos, k = brute_force_balanced_bce(logits, gt, mask)
    assert (num_pos, k) == (8, 24)
    assert got == pytest.approx(expected, rel=1e-5)
    per_image = math.log(2)  # image 0 alone: 8 positives at ln 2, no negatives
    assert abs(got - per_image) > 0.1


def test_masked_l1_and_dice_equal_their_formulas():
    outputs, targets = make_batch(seed=3)
    out = DBLoss()(outputs, targets)
    m = targets["thr_mask"].double()
    l1 = (outputs["thr_map"].double() * m - targets["thr_map"].double() * m).abs().sum() / (m.sum() + 1e-6)
    assert out["loss_thr"].item() == pytest.approx(10 * l1.item(), rel=1e-5)

    M = targets["shrink_mask"].double()
    p = outputs["binary_map"].double() * M
    g = targets["shrink_map"].double() * M
    dice = 1 - 2 * (p * g).sum() / (p.sum() + g.sum() + 1e-6)
    assert out["loss_db"].item() == pytest.approx(dice.item(), rel=1e-5)


def test_weights_and_total():
    outputs, targets = make_batch(seed=4)
    plain = DBLoss(alpha=1.0, beta=1.0)(outputs, targets)
    weighted = DBLoss(alpha=5.0, beta=10.0)(outputs, targets)
    assert weighted["loss_prob"].item() == pytest.approx(5 * plain["loss_prob"].item(), rel=1e-6)
    assert weighted["loss_thr"].item() == pytest.approx(10 * plain["loss_thr"].item(), rel=1e-6)
    assert weighted["loss_db"].item() == pytest.approx(plain["loss_db"].item(), rel=1e-6)
    total = weighted["loss_prob"] + weighted["loss_thr"] + weighted["loss_db"]
    assert weighted["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_no_positives_is_finite_with_finite_gradients():
    outputs, targets = make_batch(seed=5, requires_grad=True)
    targets["shrink_map"].zero_()
    out = DBLoss()(outputs, targets)
    assert out["loss_prob"].item() == 0.0  # no positive -> no negative either
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name, tensor in outputs.items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name


def test_gradients_finite_and_nonzero():
    outputs, targets = make_batch(seed=6, requires_grad=True)
    DBLoss()(outputs, targets)["loss"].backward()
    for name, tensor in outputs.items():
        assert torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name


def test_extreme_logits_stay_finite():
    outputs, targets = make_batch(seed=7, requires_grad=True)
    with torch.no_grad():
        outputs["prob_logits"].mul_(1e4)
    out = DBLoss()(outputs, targets)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(outputs["prob_logits"].grad).all()


def test_autocast_computes_in_float32():
    outputs, targets = make_batch(seed=8)
    reference = DBLoss()(outputs, targets)
    half = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DBLoss()(half, targets)
    assert out["loss"].dtype == torch.float32
    expected = DBLoss()({k: v.float() for k, v in half.items()}, targets)
    assert out["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=5e-2)


def test_shape_and_key_errors():
    outputs, targets = make_batch()
    bad = dict(targets, thr_mask=targets["thr_mask"][:, :-1])
    with pytest.raises(ValueError, match="thr_mask"):
        DBLoss()(outputs, bad)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        DBLoss()({k: v[None] for k, v in outputs.items()}, targets)
    with pytest.raises(KeyError, match="binary_map"):
        DBLoss()({k: v for k, v in outputs.items() if k != "binary_map"}, targets)
    assert "alpha=5.0" in repr(DBLoss())
