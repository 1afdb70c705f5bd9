"""Inference-only copy of a DBNet: BatchNorm folded into the convolutions, no threshold branch.

``prepare_for_inference(model)`` returns a model whose eval output (the probability map
(N, H, W)) equals the original's to float precision while skipping the BatchNorm passes and
the threshold branch of the head (which eval mode never uses):

- every ``BatchNorm2d`` directly after a convolution is folded into it: the ResNet stem and
  blocks (``convK`` -> ``bnK``, the deformable ``conv2`` included: the DCN is linear in its
  weight), ``downsample`` (conv, BN) and the head's ``binarize`` (conv -> BN and
  ConvTranspose2d -> BN; a transposed convolution's output channels are dim 1 of its weight);
- ``det_head.threshold`` is removed, every parameter has ``requires_grad=False``;
- the two stride-2 transposed convs of ``det_head.binarize`` become 1x1 convs and one
  PixelShuffle (``PixelShuffleDeconvs``);
- the neck computes its convolutions of upsampled maps at the maps' own resolution
  (``FPNC.split_for_inference``: a 3x3 conv of a nearest-upsampled map is a transposed conv of
  the small map): the ASF conv (64 instead of 138 GFLOP at 1024x1824) and the first level's
  smoothing conv, folded with its 1x1 lateral conv; upsampled maps are added and concatenated
  through broadcast views, not copies;
- on the CPU the weights are put in channels_last memory format, which is faster there (oneDNN
  convolutions skip their layout reorders and the fast deformable convolution reads
  channels_last input without a copy); see ``benchmarks/dcn.py``;
- on the CPU, ``dbnetpp.allocator.keep_freed_memory()`` is called (process-wide, glibc only):
  the 30-120 MB activations of every forward are then served from memory the process already
  has instead of fresh, page-faulted ``mmap``s (6.5 s -> 5.3 s per 1x3x1024x1824 forward on the
  2-core CPU of ``benchmarks/forward.py``); pass ``keep_memory=False`` to leave malloc alone.

The returned model is for eval only: ``train()`` on it is not supported.
"""

import copy
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import skip_init

from dbnetpp.allocator import keep_freed_memory
from dbnetpp.models.clip_resnet import CLIPBottleneck
from dbnetpp.models.dcn import ModulatedDeformConv2d
from dbnetpp.models.fpnc import FPNC
from dbnetpp.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["PixelShuffleDeconvs", "fold_batchnorm", "prepare_for_inference"]

ConvLike = Union[nn.Conv2d, nn.ConvTranspose2d, ModulatedDeformConv2d]


def _is_conv(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.groups == 1 or isinstance(module, nn.Conv2d)
    return isinstance(module, ModulatedDeformConv2d)


def _is_foldable_bn(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.running_mean is not None and module.running_var is not None


@torch.no_grad()
def _fold(conv: ConvLike, bn: _BatchNorm) -> None:
    """conv <- bn(conv(.)) for eval-mode BN: scale each output channel, then shift it (in place)."""
    weight = conv.weight
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if isinstance(conv, nn.ConvTranspose2d):
        out_dim = 1  # weight (in, out, kh, kw)
    else:
        out_dim = 0  # weight (out, in, kh, kw), deformable conv included
    if weight.shape[out_dim] != scale.numel():
        raise ValueError(
            f"cannot fold BatchNorm of {scale.numel()} channels into {type(conv).__name__} "
            f"with weight {tuple(weight.shape)}"
        )
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias * scale + shift).to(weight.dtype)
    if conv.bias is not None:
        conv.bias.copy_(new_bias)
    else:
        conv.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place.

    Pairs: consecutive (conv, BN) entries of any ``nn.Sequential`` (the CLIPResNet stem and
    ``downsample`` included), and ``convK`` / ``bnK`` attribute pairs of the ResNet stem and the
    ResNet / CLIPResNet blocks (whose forward applies ``bnK`` to the output of ``convK``).
    Folded BNs become ``nn.Identity``. Valid for eval mode only. Returns the number of BNs folded.
    """
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = parent._modules[first], parent._modules[second]
                if conv is not None and bn is not None and _is_conv(conv) and _is_foldable_bn(bn):
                    _fold(conv, bn)
                    parent._modules[second] = nn.Identity()
                    count += 1
        elif isinstance(parent, (ResNet, BasicBlock, Bottleneck, CLIPBottleneck)):
            for name, bn in list(parent.named_children()):
                if not name.startswith("bn") or not _is_foldable_bn(bn):
                    continue
                conv = getattr(parent, "conv" + name[2:], None)
                if conv is not None and _is_conv(conv):
                    _fold(conv, bn)
                    setattr(parent, name, nn.Identity())
                    count += 1
    return count


class PixelShuffleDeconvs(nn.Module):
    """``second(relu(first(x)))`` for two ConvTranspose2d with kernel = stride = 2 (no padding),
    as 1x1 convolutions and one PixelShuffle(4) (inference; about 40 % faster on the CPU).

    A transposed conv with kernel = stride = r maps every input pixel to an r x r block: it is a
    1x1 conv to C*r*r channels followed by PixelShuffle(r). ReLU commutes with the shuffle, and
    the second transposed conv then acts on each of the 4 sub-pixel channel groups separately,
    i.e. one 1x1 conv with a block-diagonal weight whose outputs PixelShuffle(4) puts in place.

    Input (N, C_in, H, W) -> (N, C_out, 4H, 4W), equal to the original up to float rounding.
    """

    def __init__(self, first: nn.ConvTranspose2d, second: nn.ConvTranspose2d) -> None:
        super().__init__()
        for t in (first, second):
            if not _is_2x2_deconv(t):
                raise ValueError(f"PixelShuffleDeconvs needs kernel 2, stride 2, no padding, got {t}")
        w1 = first.weight.detach()  # (C_in, C_mid, 2, 2)
        w2 = second.weight.detach()  # (C_mid, C_out, 2, 2)
        c_in, c_mid = w1.shape[:2]
        c_out = w2.shape[1]
        if w2.shape[0] != c_mid:
            raise ValueError(f"PixelShuffleDeconvs: {first} does not feed {second}")
        # expand: channel (i*2 + j)*C_mid + c of the 1x1 conv is sub-pixel (i, j) of channel c
        # skip_init: the weights are set below (and the global RNG is left alone)
        self.expand = skip_init(nn.Conv2d, c_in, 4 * c_mid, 1, device=w1.device, dtype=w1.dtype)
        self.expand.weight.data = w1.permute(2, 3, 1, 0).reshape(4 * c_mid, c_in, 1, 1).clone()
        self.expand.bias.data = _bias_of(first, c_mid).repeat(4)
        # mix: out channel co*16 + ry*4 + rx, ry = 2i + a, rx = 2j + b, from group (i, j) only
        mix = w1.new_zeros(c_out, 4, 4, 2, 2, c_mid)  # (co, ry, rx, i, j, c)
        for i in range(2):
            for j in range(2):
                for a in range(2):
                    for b in range(2):
                        mix[:, 2 * i + a, 2 * j + b, i, j] = w2[:, :, a, b].t()
        self.mix = skip_init(nn.Conv2d, 4 * c_mid, 16 * c_out, 1, device=w1.device, dtype=w1.dtype)
        self.mix.weight.data = mix.reshape(16 * c_out, 4 * c_mid, 1, 1)
        self.mix.bias.data = _bias_of(second, c_out).repeat_interleave(16)
        self.shuffle = nn.PixelShuffle(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.mix(torch.relu(self.expand(x))))


def _is_2x2_deconv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.ConvTranspose2d)
        and tuple(m.kernel_size) == (2, 2)
        and tuple(m.stride) == (2, 2)
        and tuple(m.padding) == (0, 0)
        and tuple(m.output_padding) == (0, 0)
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
    )


def _bias_of(t: nn.ConvTranspose2d, channels: int) -> torch.Tensor:
    return t.bias.detach().clone() if t.bias is not None else t.weight.new_zeros(channels)


def _shuffle_head_deconvs(branch: nn.Sequential) -> nn.Sequential:
    """A BN-folded DB head branch [conv, Identity, ReLU, deconv, Identity, ReLU, deconv] with its
    two deconvs as ``PixelShuffleDeconvs``; any other layout is returned unchanged."""
    layers = [m for m in branch if not isinstance(m, nn.Identity)]
    if (
        len(layers) == 5
        and isinstance(layers[2], nn.ConvTranspose2d)
        and isinstance(layers[3], nn.ReLU)
        and isinstance(layers[4], nn.ConvTranspose2d)
        and _is_2x2_deconv(layers[2])
        and _is_2x2_deconv(layers[4])
    ):
        return nn.Sequential(layers[0], layers[1], PixelShuffleDeconvs(layers[2], layers[4]))
    return branch


def _on_cpu(model: nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu"


def prepare_for_inference(
    model: nn.Module, channels_last: Optional[bool] = None, keep_memory: Optional[bool] = None
) -> nn.Module:
    """An eval-only copy of ``model`` (a ``DBNet``) for fast inference; ``model`` is not modified.

    Args:
        model: a DBNet (``dbnetpp.models.DBNet``) on any device.
        channels_last: put the weights in channels_last memory format; None = the faster
            choice for the model's device (True on CPU, False elsewhere).
        keep_memory: call ``dbnetpp.allocator.keep_freed_memory()`` (a process-wide malloc
            setting: freed activations stay mapped for the next forward); None = True when the
            model is on the CPU.

    Returns a model on the same device mapping normalised (N, 3, H, W) images to probability
    maps (N, H, W), as ``model.eval()`` does, with BatchNorm folded, no threshold branch and no
    gradients.
    """
    net = copy.deepcopy(model).eval()
    fold_batchnorm(net)
    head = getattr(net, "det_head", None)
    if head is not None and getattr(head, "threshold", None) is not None:
        head.threshold = None  # eval mode only runs `binarize`
    if head is not None and isinstance(getattr(head, "binarize", None), nn.Sequential):
        head.binarize = _shuffle_head_deconvs(head.binarize)
    for module in net.modules():
        if isinstance(module, FPNC):
            module.split_for_inference()
    for param in net.parameters():
        param.requires_grad_(False)
    on_cpu = _on_cpu(net)
    if channels_last is None:
        # benchmarks/dcn.py --modes model, 2-core CPU, 2 threads, R50-DCNv2 at 1x3x1024x1824:
        # 7.2 s with channels_last against 11.8 s without. Elsewhere (CUDA) leave the layout alone.
        channels_last = on_cpu
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if keep_memory or (keep_memory is None and on_cpu):
        keep_freed_memory()
    return net
