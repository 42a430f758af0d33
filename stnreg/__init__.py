"""stnreg: differentiable image registration built on the Spatial Transformer Network.

Coordinate convention: see :mod:`stnreg.coords`. Layers: ``coords`` -> ``sampler`` ->
``transforms`` -> ``warp`` -> ``losses`` -> ``nets`` / ``register`` -> ``io`` / ``report`` -> ``cli``;
see ARCHITECTURE.md.
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
from .image import Image, as_image
from .io import read_image, read_transform, write_displacement, write_image, write_transform
from .nets import LocalizationCNN, MultiSpatialTransformer, SpatialTransformer
from .register import RegisterOptions, RegistrationResult, Stage, register
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
from .warp import apply, warp

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Affine",
    "Attention",
    "BSpline",
    "Composite",
    "Displacement",
    "Grid",
    "Image",
    "LocalizationCNN",
    "MultiSpatialTransformer",
    "NumericalInverse",
    "ParametricTransform",
    "Projective",
    "RegisterOptions",
    "RegistrationResult",
    "Rigid",
    "Similarity",
    "SpatialTransformer",
    "Stage",
    "StationaryVelocity",
    "ThinPlateSpline",
    "Transform",
    "Translation",
    "apply",
    "apply_affine",
    "array_order_to_xyz",
    "as_image",
    "displacement_index_to_normalized",
    "displacement_normalized_to_index",
    "index_to_normalized",
    "lattice",
    "normalized_to_index",
    "read_image",
    "read_transform",
    "register",
    "sample",
    "uniform_control_points",
    "warp",
    "write_displacement",
    "write_image",
    "write_transform",
    "xyz_to_array_order",
]
