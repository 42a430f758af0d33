"""stnreg: differentiable image registration built on the Spatial Transformer Network.

Coordinate convention: see :mod:`stnreg.coords`. Layers: ``coords`` -> ``sampler`` ->
``transforms`` -> ``warp`` -> ``nets``; see ARCHITECTURE.md.
"""

from .coords import (
    Grid,
    apply_affine,
    array_order_to_xyz,
    displacement_index_to_normalized,
    displacement_normalized_to_index,
    index_to_normalized,
    lattice,
    normalized_to_index,
    xyz_to_array_order,
)
from .nets import LocalizationCNN, MultiSpatialTransformer, SpatialTransformer
from .sampler import sample
from .transforms import (
    FAMILIES,
    Affine,
    Attention,
    BSpline,
    Composite,
    Displacement,
    NumericalInverse,
    ParametricTransform,
    Projective,
    Rigid,
    Similarity,
    StationaryVelocity,
    ThinPlateSpline,
    Transform,
    Translation,
    uniform_control_points,
)
from .warp import warp

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Affine",
    "Attention",
    "BSpline",
    "Composite",
    "Displacement",
    "Grid",
    "LocalizationCNN",
    "MultiSpatialTransformer",
    "NumericalInverse",
    "ParametricTransform",
    "Projective",
    "Rigid",
    "Similarity",
    "SpatialTransformer",
    "StationaryVelocity",
    "ThinPlateSpline",
    "Transform",
    "Translation",
    "apply_affine",
    "array_order_to_xyz",
    "displacement_index_to_normalized",
    "displacement_normalized_to_index",
    "index_to_normalized",
    "lattice",
    "normalized_to_index",
    "sample",
    "uniform_control_points",
    "warp",
    "xyz_to_array_order",
]
