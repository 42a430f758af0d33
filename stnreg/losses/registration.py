"""The registration loss: similarity + weighted regularizers + weighted Dice, one definition for both
instance optimization (:mod:`stnreg.register`) and learning (:mod:`stnreg.learn`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError
from .regularizers import bending_energy, diffusion, folding_penalty
from .similarity import dice_loss, lncc_loss, mi_loss, mse_loss, ncc_loss

__all__ = ["REGULARIZERS", "SIMILARITIES", "RegistrationLoss"]

SIMILARITIES = {"mse": mse_loss, "ncc": ncc_loss, "lncc": lncc_loss, "mi": mi_loss}
REGULARIZERS = {"diffusion": diffusion, "bending": bending_energy, "folding": folding_penalty}


@dataclass
class RegistrationLoss:
    """``similarity(warped, fixed) + Σ w · regularizer(field) + dice_weight · Dice(labels)``.

    Args:
        similarity: ``"mse"``, ``"ncc"``, ``"lncc"`` (``window`` voxels, odd) or ``"mi"`` (``bins``).
        regularization: weights of ``"diffusion"``, ``"bending"``, ``"folding"``, applied to every
            field given to :meth:`__call__` (``(N, d, *shape)``, in voxels of its grid).
        dice_weight: weight of ``dice_loss(warped_labels, fixed_labels)`` when labels are given.
        similarity_weight: weight of the similarity (0: labels and regularizers alone, as networks
            trained on synthetic label maps are, :mod:`stnreg.learn.synth`).
    """

    similarity: str = "lncc"
    window: int = 9
    bins: int = 32
    regularization: dict[str, float] = field(default_factory=dict)
    dice_weight: float = 0.0
    similarity_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise InputError(f"loss must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        for name in self.regularization:
            if name not in REGULARIZERS:
                raise InputError(f"unknown regularizer {name!r}; choose from {', '.join(REGULARIZERS)}")

    def similarity_term(
        self,
        warped: Tensor,
        fixed: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        reduce: bool = True,
    ) -> Tensor:
        """The similarity of ``(N, C, *spatial)`` images: the batch mean, or ``(N,)`` with ``reduce=False``."""
        fn = SIMILARITIES[self.similarity]
        if self.similarity == "lncc":
            return fn(warped, fixed, window=self.window, mask=mask, reduce=reduce)
        if self.similarity == "mi":
            return fn(warped, fixed, bins=self.bins, mask=mask, generator=generator, reduce=reduce)
        return fn(warped, fixed, mask=mask, reduce=reduce)

    def __call__(
        self,
        warped: Tensor,
        fixed: Tensor,
        fields: Sequence[Tensor | None] = (),
        warped_labels: Tensor | None = None,
        fixed_labels: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Named terms (``"similarity"``, ``"<regularizer>_<k>"`` per field ``k``, ``"dice"``) and their
        sum ``"loss"``, each a batch mean."""
        terms = {}
        if self.similarity_weight:
            terms["similarity"] = self.similarity_weight * self.similarity_term(warped, fixed, mask, generator)
        for k, fld in enumerate(fields):
            if fld is None:
                continue
            for name, w in self.regularization.items():
                if w:
                    terms[f"{name}_{k}"] = w * REGULARIZERS[name](fld)
        if self.dice_weight and warped_labels is not None and fixed_labels is not None:
            terms["dice"] = self.dice_weight * dice_loss(warped_labels, fixed_labels)
        terms["loss"] = sum(terms.values())
        return terms
