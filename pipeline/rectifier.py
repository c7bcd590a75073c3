"""The rectifier (docs/method.md): a small EfficientViT network at latent resolution that removes most of the
quantization error, (B, C, H, W) -> (B, C, H, W) in the standardized latent space.

    x -> conv3x3 C->W  (+ x repeated along channels, W/C times each)   # stem with channel-repeat shortcut
      -> L x EfficientViTBlock(W, head dim, multiscale (5,), RMSNorm)  # diffusers' DC-AE block
      -> RMSNorm (channel-wise) -> ReLU -> conv3x3 W->C = h             # head
    residual=True:  output = x + g h, the last conv zero-initialised (starts as the identity);
    residual=False: output = g h + (1 - g) x, the reference's plain form h when g = 1.

g is the gate, a scalar buffer (1 unless fitted): training fits it after every epoch in closed form on
held-out training latents (stages/train_loop.fit_gate), so that the rectified latent is never worse than
the quantized one there. At g = 1 both formulas give exactly the ungated output.

The blocks are diffusers' own modules (their parameters, names and checkpoints), but `forward` can evaluate
them channels-last, (B, H, W, C): every 1x1 conv becomes one matmul over B*H*W rows and the depthwise
convs run on channels-last memory, where diffusers' forward moves the channel axis back and forth around
every norm and linear layer (the speed of each form: docs/cli.md, "Rectifier forward"). `forward_diffusers`
is diffusers' own NCHW forward: the definition the tests hold the channels-last form to (values and
gradients), and the form `forward="auto"` takes off the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SanaMultiscaleLinearAttention
from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.sana_transformer import GLUMBConv
from torch import nn

from revq_pipe.pipeline.rectifier_spec import RectifierSpec


class EfficientViTRectifier(nn.Module):
    """EfficientViT-block rectifier.

    Args:
        channels: C, the latent channels.
        width: W, the working channels; a multiple of C (the stem's shortcut repeats each channel W/C
            times) and of head_dim.
        depth: L, the number of EfficientViT blocks.
        head_dim: attention head dimension of the blocks' multiscale linear attention.
        residual: add the input to the output and zero-initialise the last conv, so that the module
            starts as the exact identity.
        forward: how the blocks are evaluated, one of FORWARDS (pipeline/rectifier_spec.py).

    The sizes are checked by `RectifierSpec.check`, the rules the config loader applies too.
    """

    def __init__(self, channels: int, width: int, depth: int, head_dim: int = 32, residual: bool = True,
                 forward: str = "auto") -> None:
        super().__init__()
        RectifierSpec("vit", width, depth, head_dim, residual, forward).check(channels)  # the spec's rules, once
        self.forward_impl = forward
        self.residual = residual
        self.head_dim = head_dim
        self.repeats = width // channels
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            EfficientViTBlock(width, attention_head_dim=head_dim, qkv_multiscales=(5,), norm_type="rms_norm")
            for _ in range(depth))
        self.norm_out = RMSNorm(width, eps=1e-5, elementwise_affine=True, bias=True)
        self.act_out = nn.ReLU()
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        if residual:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        self.register_buffer("residual_gate", torch.ones(()))  # g: fitted by training, saved with the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), the blocks evaluated channels-last or by diffusers' forward."""
        return self._gated(x, self._correction_head(x))

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """d with output = x + g d: what the gate scales (the head's output h, or h - x for the plain form)."""
        h = self._correction_head(x)
        return h if self.residual else h - x

    def _correction_head(self, x: torch.Tensor) -> torch.Tensor:
        if not self._channels_last(x):
            return self._head(self._diffusers_features(x))
        h = _to_nhwc(self._stem(x)).contiguous()  # (B, H, W, width)
        for block in self.blocks:
            h = _glumbconv_nhwc(block.conv_out, _linear_attention_nhwc(block.attn, h))
        return self._head(h)

    def _gated(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h, gate = h.to(x.dtype), self.residual_gate.to(x.dtype)  # the fitted g exactly, also under bf16 autocast
        return x + gate * h if self.residual else gate * h + (1 - gate) * x

    def _channels_last(self, x: torch.Tensor) -> bool:
        if x.shape[-2] * x.shape[-1] <= self.head_dim:  # diffusers switches to quadratic attention here
            return False
        if self.forward_impl == "auto":
            return x.device.type == "cpu"
        return self.forward_impl == "channels_last"

    def forward_diffusers(self, x: torch.Tensor) -> torch.Tensor:
        """The same function through diffusers' own (NCHW) block forward."""
        return self._gated(x, self._head(self._diffusers_features(x)))

    def _diffusers_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self._stem(x)
        for block in self.blocks:
            h = block(h)
        return _to_nhwc(h)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_in(x) + x.repeat_interleave(self.repeats, dim=1)  # (B, width, H, W)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Channels-last features (B, H, W, width) -> the head's output h (B, C, H, W)."""
        h = self.act_out(self.norm_out(h))  # RMSNorm over channels
        return self.conv_out(_to_nchw(h)).contiguous()  # (B, C, H, W)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # tokenizers saved before the gate existed, and the reference's checkpoints, have none: g = 1
        state_dict.setdefault(prefix + "residual_gate", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _to_nchw(h: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> a (B, C, H, W) view in channels-last memory (no copy)."""
    return h.permute(0, 3, 1, 2)


def _to_nhwc(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> a (B, H, W, C) view."""
    return h.permute(0, 2, 3, 1)


def _linear_attention_nhwc(attn: SanaMultiscaleLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """diffusers' SanaMultiscaleAttnProcessor2_0 (its linear-attention branch) on (B, H, W, C)."""
    batch, height, width, _ = x.shape
    qkv_weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])  # one matmul for q, k, v
    qkv = F.linear(x, qkv_weight)  # (B, H, W, 3I)
    scales = [qkv] + [_to_nhwc(scale.proj_out(scale.proj_in(_to_nchw(qkv)))) for scale in attn.to_qkv_multiscale]
    # diffusers cuts the concatenated channels into heads of 3 * head_dim and each head into q | k | v
    heads = torch.cat(scales, dim=-1).float().reshape(batch, height * width, -1, 3 * attn.attention_head_dim)
    query, key, value = heads.chunk(3, dim=-1)  # (B, N, heads, head_dim)
    query, key = attn.nonlinearity(query), attn.nonlinearity(key)
    value = F.pad(value, (0, 1), value=1.0)  # the extra all-ones row yields the normaliser
    value_key = torch.einsum("bnhv,bnhk->bhvk", value, key)  # (B, heads, head_dim + 1, head_dim)
    out = torch.einsum("bhvk,bnhk->bnhv", value_key, query).float()  # (B, N, heads, head_dim + 1)
    out = (out[..., :-1] / (out[..., -1:] + attn.eps)).to(x.dtype)
    out = attn.norm_out(attn.to_out(out.reshape(batch, height, width, -1)))
    return out + x if attn.residual_connection else out


def _glumbconv_nhwc(mbconv: GLUMBConv, x: torch.Tensor) -> torch.Tensor:
    """diffusers' GLUMBConv on (B, H, W, C): 1x1 expand, SiLU, depthwise 3x3, SiLU gate, 1x1 project, norm."""
    h = mbconv.nonlinearity(F.linear(x, mbconv.conv_inverted.weight.flatten(1), mbconv.conv_inverted.bias))
    h = _to_nhwc(mbconv.conv_depth(_to_nchw(h)))  # (B, H, W, 2 * hidden)
    h, gate = h.chunk(2, dim=-1)
    h = F.linear(h * mbconv.nonlinearity(gate), mbconv.conv_point.weight.flatten(1))
    if mbconv.norm is not None:
        h = mbconv.norm(h)
    return h + x if mbconv.residual_connection else h


def build_rectifier(spec: RectifierSpec, latent_channels: int) -> nn.Module:
    """The rectifier `spec` describes for latents with `latent_channels` channels (ValueError: what cannot be built)."""
    if spec.check(latent_channels).kind == "none":
        return nn.Identity()
    return EfficientViTRectifier(latent_channels, spec.width, spec.depth, spec.head_dim, spec.residual, spec.forward)
