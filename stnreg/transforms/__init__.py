"""Transform families: parameters -> point maps -> sampler coordinates (see :mod:`.base`)."""

from .base import Composite, NumericalInverse, ParametricTransform, Transform
from .bspline import BSpline
from .dense import Displacement, StationaryVelocity
from .matrix import Affine, Attention, MatrixTransform, Projective, Rigid, Similarity, Translation
from .tps import ThinPlateSpline, uniform_control_points

FAMILIES = {
    "translation": Translation,
    "rigid": Rigid,
    "similarity": Similarity,
    "attention": Attention,
    "affine": Affine,
    "projective": Projective,
    "tps": ThinPlateSpline,
    "bspline": BSpline,
    "displacement": Displacement,
    "svf": StationaryVelocity,
}

__all__ = [
    "FAMILIES",
    "Affine",
    "Attention",
    "BSpline",
    "Composite",
    "Displacement",
    "MatrixTransform",
    "NumericalInverse",
    "ParametricTransform",
    "Projective",
    "Rigid",
    "Similarity",
    "StationaryVelocity",
    "ThinPlateSpline",
    "Transform",
    "Translation",
    "uniform_control_points",
]
