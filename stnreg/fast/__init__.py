"""Fast paths behind the public API, chosen automatically when they apply (3D, CPU, float).

Modules, one job each:

- :mod:`.dispatch`: which path runs. Every eligibility rule, the arguments each kernel gets from a
  transform chain, the ``STNREG_FAST_REPORT=1`` report and :func:`~.dispatch.record`. Callers ask
  ``try_fused_warp`` (:func:`stnreg.warp`), ``try_fused_loss`` (registration's matrix stages),
  ``try_fast_sample`` and ``try_label_sample`` (:func:`stnreg.sample`), ``try_fused_displaced``
  (field compositions), ``try_fast_lncc`` (:func:`stnreg.losses.lncc_loss`) and ``fast_cubic``
  (:mod:`stnreg.cubic`); each returns ``None`` when the reference torch path must run.
- :mod:`.loader`: loading numba's and Triton's kernels once, the ``STNREG_FAST=0`` switch, and numba's
  cache hygiene. :mod:`.buffers`: flat views and output buffers.
- The autograd Functions, one module per kernel family: :mod:`.affine` (:func:`fused_affine_warp`,
  the coordinates made on the fly from θ and ``∂L/∂θ`` straight from the kernel;
  :func:`fused_affine_loss`, warp, MSE/NCC and the 12-parameter gradient in one pass, no warped
  image), :mod:`.bspline` (:func:`fused_bspline_warp`, the displacement evaluated separably per
  row from the coefficients), :mod:`.tps` (:func:`fused_tps_warp`, the spline evaluated per voxel,
  no ``voxels x K`` basis), :mod:`.field` (:func:`fused_field_warp`, a displacement read in place
  in its channel-first layout; :func:`fast_sample`, trilinear sampling at given coordinates),
  :mod:`.lncc` (:func:`fast_lncc`, box filters by running sums and the gradient in closed form) and
  :mod:`.cubic` (cubic B-spline values and slopes).
- The kernels: ``*_cpu.py`` (numba, on :mod:`.trilinear`'s helpers; compiled on first use and cached
  on disk) and :mod:`.affine_cuda` (Triton, for float32 3D volumes on CUDA, the two fused matrix
  paths; one backward pass gives θ's gradient and scatters the image's when one is needed).

Elsewhere (other CUDA cases, 2D, reflection padding), with ``STNREG_FAST=0``, or without numba /
Triton, the reference torch path runs, after a one-line notice the first time a kernel library is
missing. Fast and reference paths agree to float32 rounding, gradients included
(``tests/test_fast.py``, ``tests/test_fast_cuda.py``). Results are deterministic: threads split
output slices that each write their own outputs, partial sums are added in a fixed order, and the
scatters of image gradients run on one thread, so 1 and 2 threads give the same bits. The Triton
kernels write one row of partial sums per program, except the image gradient's scatter, which adds
with atomics as ``grid_sample``'s CUDA backward does; under ``torch.use_deterministic_algorithms``
that gradient comes from ``grid_sample`` instead, where torch applies its own rule.
"""

from .affine import fused_affine_loss, fused_affine_warp
from .bspline import fused_bspline_warp
from .dispatch import fast_available, fast_cubic, fused_available
from .field import fast_sample, fused_field_warp
from .lncc import fast_lncc
from .tps import fused_tps_warp

__all__ = [
    "fast_available",
    "fast_cubic",
    "fast_lncc",
    "fast_sample",
    "fused_affine_loss",
    "fused_affine_warp",
    "fused_available",
    "fused_bspline_warp",
    "fused_field_warp",
    "fused_tps_warp",
]
