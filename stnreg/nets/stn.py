"""Spatial Transformer modules (Jaderberg et al., 2015): localization net -> transform -> sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..sampler import sample
from ..transforms.base import ParametricTransform

__all__ = ["MultiSpatialTransformer", "SpatialTransformer", "identity_head"]


def identity_head(features: int, transform: ParametricTransform) -> nn.Linear:
    """Linear regression head ``(N, features) -> (N, transform.num_params)`` that starts at the identity.

    Zero weights and bias = the family's identity parameters: without this, STN training often
    never starts (the sampling grid wanders off the image and the gradient vanishes).
    """
    head = nn.Linear(int(features), transform.num_params)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(transform.identity_params(1).reshape(-1))
    return head


class SpatialTransformer(nn.Module):
    """A Spatial Transformer: ``out = sample(x, T_θ(grid))`` with ``θ = head(localization(x))``.

    The transform's domain is the normalized space of the input (``-1``/``+1`` at the image's outer
    edges), so the output may have any size and the identity keeps the input's field of view.

    Args:
        localization: module mapping the (localization) input ``(N, C, *spatial)`` to features ``(N, F)``.
        transform: a transform family instance used as a template (e.g. ``Affine(2)``,
            ``ThinPlateSpline(uniform_control_points((4, 4)))``); its ``with_params`` binds θ.
        features: ``F``, the number of features the localization net outputs.
        output_size: spatial output shape, array order; ``None`` keeps the input's.
        mode, padding, antialias: sampler settings (see :func:`stnreg.sampler.sample`).

    The regression head is initialized to the identity (zero weights, bias = identity
    parameters), without which STN training often never starts.
    """

    def __init__(
        self,
        localization: nn.Module,
        transform: ParametricTransform,
        features: int,
        output_size: Sequence[int] | None = None,
        mode: str = "linear",
        padding: str = "zeros",
        antialias: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(transform, ParametricTransform):
            raise TypeError(f"transform must be a ParametricTransform family, got {type(transform).__name__}")
        self.localization = localization
        # Keep the family and its configuration, not the template's own parameters: the head
        # predicts θ, so they would sit in every optimizer and checkpoint without a gradient
        # (and make DDP demand find_unused_parameters).
        self.transform = transform.with_params(transform.identity_params(1))
        self.head = identity_head(features, transform)
        self.output_size = None if output_size is None else tuple(int(s) for s in output_size)
        self.mode, self.padding, self.antialias = mode, padding, antialias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the template dropped its parameters still carry them.
        state_dict.pop(f"{prefix}transform.params", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def predict(self, x: Tensor) -> ParametricTransform:
        """The transform predicted for input ``x`` ``(N, C, *spatial)``."""
        theta = self.head(self.localization(x).flatten(1))
        return self.transform.with_params(theta.reshape(theta.shape[0], *self.transform.param_shape))

    def forward(self, x: Tensor, loc_input: Tensor | None = None) -> Tensor:
        """Warp ``x``; ``loc_input`` (default ``x``) is what the localization net sees.

        Returns:
            ``(N, C, *output_size)``.
        """
        if x.dim() - 2 != self.transform.ndim:
            raise ValueError(f"a {self.transform.ndim}D transformer got input of shape {tuple(x.shape)}")
        t = self.predict(x if loc_input is None else loc_input)
        out_shape = self.output_size or tuple(x.shape[2:])
        coords = t.sampling_grid(out_shape)
        return sample(x, coords, self.mode, self.padding, self.antialias)


class MultiSpatialTransformer(nn.Module):
    """``K`` Spatial Transformers in parallel on the same input, outputs concatenated on channels.

    The paper's 2xST / 4xST: each transformer can attend to a different part of the input.
    Output ``(N, K * C, *output_size)``; all transformers must share the output size.
    """

    def __init__(self, transformers: Sequence[SpatialTransformer]) -> None:
        super().__init__()
        if not transformers:
            raise ValueError("MultiSpatialTransformer needs at least one SpatialTransformer")
        sizes = {t.output_size for t in transformers}
        if len(sizes) != 1:
            raise ValueError(f"all transformers must share one output_size, got {sorted(map(str, sizes))}")
        self.transformers = nn.ModuleList(transformers)

    def forward(self, x: Tensor, loc_input: Tensor | None = None) -> Tensor:
        return torch.cat([t(x, loc_input) for t in self.transformers], dim=1)
