import numpy as np
import pytest
import torch

from dbnetpp.preprocess import MEAN_RGB, STD_RGB, batch_images, normalize_image, pad_to_divisor


def test_normalize_matches_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = normalize_image(image)
    assert out.shape == (3, 7, 5) and out.dtype == torch.float32
    for c_rgb, c_bgr in ((0, 2), (1, 1), (2, 0)):
        expected = (image[:, :, c_bgr].astype(np.float64) - MEAN_RGB[c_rgb]) / STD_RGB[c_rgb]
        np.testing.assert_allclose(out[c_rgb].numpy(), expected, atol=1e-5)


def test_pad_to_divisor():
    assert pad_to_divisor(720, 1280) == (736, 1280)
    assert pad_to_divisor(1024, 1820) == (1024, 1824)
    assert pad_to_divisor(1, 33, 32) == (32, 64)


def test_batch_pads_bottom_right_with_zeros():
    a = np.full((40, 50, 3), 200, dtype=np.uint8)
    b = np.full((20, 70, 3), 10, dtype=np.uint8)
    batch = batch_images([a, normalize_image(b)])
    assert batch.shape == (2, 3, 64, 96)
    torch.testing.assert_close(batch[0, :, :40, :50], normalize_image(a))
    torch.testing.assert_close(batch[1, :, :20, :70], normalize_image(b))
    assert batch[0, :, 40:].abs().max() == 0 and batch[0, :, :, 50:].abs().max() == 0
    assert batch[1, :, 20:].abs().max() == 0 and batch[1, :, :, 70:].abs().max() == 0


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), "not an image"])
def test_bad_images_are_rejected_with_their_shape(bad):
    with pytest.raises(ValueError, match="H, W, 3"):
        normalize_image(bad)


def test_batch_rejects_empty_and_wrong_tensors():
    with pytest.raises(ValueError, match="at least one"):
        batch_images([])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        batch_images([torch.zeros(1, 8, 8)])
