"""``Conv2d``, ``ConvTranspose2d`` and ``BatchNorm2d``: torch.nn's, plus one path for compiled CPU training.

Same parameters, buffers, state-dict names and eager behaviour as ``torch.nn``'s (they are
subclasses). While ``torch.compile`` traces a training step on the CPU, they call
``dbnetpp.ops.conv_bn``'s registered operators, whose kernels and layout are eager's, so the
compiled step reproduces eager's numbers (see that module for why and what it costs).
"""

from typing import List, Optional

import torch
from torch import nn

from dbnetpp.ops.conv_bn import batch_norm_train, convolution, eager_kernels_wanted

__all__ = ["BatchNorm2d", "Conv2d", "ConvTranspose2d"]


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``; in compiled CPU training, eager's convolution kernel as one opaque operator."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.training and self.padding_mode == "zeros" and not isinstance(self.padding, str) \
                and eager_kernels_wanted(input):
            return convolution(input, weight, bias, list(self.stride), list(self.padding), list(self.dilation),
                               False, [0, 0], self.groups)
        return super()._conv_forward(input, weight, bias)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``; in compiled CPU training, eager's kernel as one opaque operator."""

    def forward(self, input: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if self.training and output_size is None and self.padding_mode == "zeros" and eager_kernels_wanted(input):
            return convolution(input, self.weight, self.bias, list(self.stride), list(self.padding),
                               list(self.dilation), True, list(self.output_padding), self.groups)
        return super().forward(input, output_size)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``; in compiled CPU training with batch statistics, eager's kernel (and
    its in-place running-statistics update) as one opaque operator."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.momentum is not None and input.dim() == 4 and eager_kernels_wanted(input)):
            return super().forward(input)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        running = self.track_running_stats
        return batch_norm_train(
            input,
            self.weight,
            self.bias,
            self.running_mean if running else None,
            self.running_var if running else None,
            self.momentum,
            self.eps,
        )
