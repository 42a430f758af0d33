"""Pairwise registration by instance optimization, in world coordinates.

``register(moving, fixed, transform="rigid+affine+syn", loss="lncc")`` runs a staged pipeline of
transform families on multi-resolution pyramids. Every stage maps fixed-space world points (mm) to
moving-space world points; the result lives on the fixed image's grid, whatever the two images'
grids, spacings and orientations.

The package splits the work at a problem / objective / solver seam:

- :mod:`.problem`: the inputs, checked once: images, intensities, masks, labels, pyramids;
- :mod:`.stages`: pipeline stages and their defaults (which family, levels, solver, loss, tolerance);
- :mod:`.initialize`: centre-of-mass / principal-axes start;
- :mod:`.parametrize`: each family's variables (scaled so that one unit is about one voxel);
- :mod:`.solvers`: L-BFGS and Adam behind one ``minimize(objective, x0, budget, stop, callbacks)``;
- :mod:`.syn`: the symmetric greedy diffeomorphic stage;
- :mod:`.engine`: the orchestrator; :mod:`.result`: :class:`RegistrationResult`;
- :mod:`.options`: :class:`RegisterOptions`, the options and defaults shared with the command line.

Staging: each stage starts at the identity and is composed after the frozen product of the
previous ones. Matrix stages fold into one matrix ``M``; the deformable stage (at most one, last)
gives ``T = M ∘ φ``, exactly an ITK ``CompositeTransform`` with ``M`` added first and ``φ`` second.
The first matrix stage rotates about the fixed image's centre of mass and starts from a
centre-of-mass (or principal-moments) alignment.
"""

from .engine import register, register_many
from .options import RegisterOptions
from .result import RegistrationResult
from .stages import DEFAULTS, Stage, parse_pipeline

__all__ = [
    "DEFAULTS",
    "RegisterOptions",
    "RegistrationResult",
    "Stage",
    "parse_pipeline",
    "register",
    "register_many",
]
