"""Differentiable Binarization head (MMOCR ``DBHead``).

"Real-time Scene Text Detection with Differentiable Binarization", https://arxiv.org/abs/1911.08947
"""

from typing import Dict, Optional

import torch
from torch import nn
from torch.func import functional_call

from .layers import BatchNorm2d, Conv2d, ConvTranspose2d

__all__ = ["DBHead"]


def _bias_cancelled(layer: nn.Module, following: Optional[nn.Module]) -> bool:
    """Whether ``layer`` adds a trainable bias that the BatchNorm ``following`` it subtracts again
    (batch statistics: the per-channel batch mean removes any constant per channel)."""
    bias = getattr(layer, "bias", None)
    return (isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(bias, torch.Tensor)
            and bias.requires_grad and isinstance(following, nn.BatchNorm2d)
            and (following.training or not following.track_running_stats))


def _with_zero_gradient(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values with a gradient of exactly 0 (a zero tensor, not None: weight decay and DDP
    still see the parameter)."""
    return t.detach() + t * 0


class _Branch(nn.Sequential):
    """``nn.Sequential`` (same indices and state-dict keys) that gives a bias cancelled by the next
    layer's train-mode BatchNorm its exact gradient, 0.

    Autograd would sum the BatchNorm's input gradient over N, H, W for it: 0 in exact arithmetic,
    rounding noise in float32, different in every run that sums in another order (threads,
    ``torch.compile``). Forward values, running statistics and all other gradients are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        for layer, following in zip(layers, layers[1:] + [None]):
            if torch.is_grad_enabled() and _bias_cancelled(layer, following):
                x = functional_call(layer, {"bias": _with_zero_gradient(layer.bias)}, (x,))
            else:
                x = layer(x)
        return x


def _branch(in_channels: int, bias: bool) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU -> deconv x2 -> BN -> ReLU -> deconv x2 to 1 channel (indices 0..6)."""
    mid = in_channels // 4
    return _Branch(
        Conv2d(in_channels, mid, 3, padding=1, bias=bias),
        BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        ConvTranspose2d(mid, mid, 2, 2),
        BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        ConvTranspose2d(mid, 1, 2, 2),
    )


class DBHead(nn.Module):
    """Probability (``binarize``) and threshold (``threshold``) branches, each upsampling x4.

    Args:
        in_channels: channels of the neck output.
        with_bias: bias on the first conv of ``binarize`` (the threshold conv never has one).
        k: amplification factor of the differentiable binarization.

    Input (N, in_channels, H/4, W/4) -> maps (N, H, W). Keeps PyTorch's default init, as MMOCR
    does (its head init_cfg matches no module).
    """

    def __init__(self, in_channels: int = 256, with_bias: bool = False, k: float = 50) -> None:
        super().__init__()
        if in_channels % 4 != 0:
            raise ValueError(f"DBHead in_channels must be divisible by 4, got {in_channels}")
        self.in_channels = in_channels
        self.k = k
        self.binarize = _branch(in_channels, bias=with_bias)
        self.threshold = _branch(in_channels, bias=False)
        self.threshold.append(nn.Sigmoid())

    def prob_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the text-probability map, (N, H, W)."""
        return self.binarize(x).squeeze(1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Eval path: probability map (N, H, W) in (0, 1); the threshold branch is not run."""
        return torch.sigmoid(self.prob_logits(x))

    def forward_train(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Train path: ``prob_logits``, ``thr_map`` (in (0, 1)) and ``binary_map``, each (N, H, W).

        binary_map = 1 / (1 + exp(-k * (sigmoid(prob_logits) - thr_map))).
        """
        if self.threshold is None:
            raise RuntimeError("this DBHead was prepared for inference (threshold branch removed): it cannot train")
        prob_logits = self.prob_logits(x)
        thr_map = self.threshold(x).squeeze(1)
        binary_map = torch.reciprocal(1.0 + torch.exp(-self.k * (torch.sigmoid(prob_logits) - thr_map)))
        return {"prob_logits": prob_logits, "thr_map": thr_map, "binary_map": binary_map}

    def forward(self, x: torch.Tensor):
        """``forward_train`` in training mode, ``predict`` in eval mode."""
        return self.forward_train(x) if self.training else self.predict(x)
