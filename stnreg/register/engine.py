"""The orchestrator: a pipeline of stages, each run level by level by its solver.

``register_many`` loads the problem (:mod:`.problem`), initializes the matrix part
(:mod:`.initialize`), and runs each stage: matrix stages by L-BFGS to convergence (or Adam), the
``syn`` stage by symmetric greedy updates (:mod:`.syn`), parametric fields by Adam
(:mod:`.solvers`), on variables defined in :mod:`.parametrize`. Matrix stages fold into one matrix
``M``; the deformable stage (at most one, last) gives ``T = M ∘ φ`` with ``φ`` on the fixed grid.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..coords import Grid
from ..cubic import bspline_prefilter, cubic_sample
from ..errors import InputError
from ..fast.dispatch import try_fused_loss
from ..image import Image
from ..losses import REGULARIZERS, RegistrationLoss, dice_loss
from ..sampler import sample
from ..transforms import FAMILIES
from ..transforms.base import Composite, Transform, clear_lattice_cache
from ..transforms.matrix import Affine, MatrixTransform, Projective
from ..warp import apply, warp
from .initialize import initial_matrix
from .options import RegisterOptions, resolve_device
from .parametrize import field_for_regularizer, item, make_stage_transform, params_from_raw, refine_field, scale_for
from .problem import Problem, build_problem
from .result import RegistrationResult
from .solvers import LBFGS, Adam, Solver
from .stages import MATRIX, Stage, levels, parse_pipeline, stage_loss
from .syn import SymmetricGreedy, SynLevel, result_displacement, upsample

__all__ = ["register", "register_many"]

# The defaults of every option, shared with the command line and the batch runner.
_D = RegisterOptions()

Callback = Callable[[int, Tensor], None]
# The smallest fraction of the fixed image that must map inside the moving image (reference path).
MIN_OVERLAP = 0.25


def register(
    moving: Any,
    fixed: Any,
    transform: str | Sequence[str | Stage] = _D.transform,
    loss: str = _D.loss,
    *,
    labels: tuple[Any, Any] | None = None,
    **kwargs: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; the result lives on the fixed grid.

    Args:
        moving, fixed: file paths, :class:`~stnreg.image.Image` objects, or arrays/tensors (1 mm
            voxels at the origin). Grids, spacings and orientations may differ; both 2D or both 3D.
        transform: ``+``-joined stages, e.g. ``"rigid+affine+syn"``, ``"affine+svf"``,
            ``"affine+bspline"``, ``"tps"``, or :class:`Stage` objects for custom pyramids, solvers
            and tolerances.
        loss: ``"mse"``, ``"ncc"``, ``"lncc"`` (``window`` in voxels, or mm with ``window_mm``),
            ``"mi"`` (``bins``; for multi-modal pairs). Matrix stages use ``"ncc"`` where this is
            ``"lncc"`` (see :attr:`Stage.loss`).
        labels: ``(moving_labels, fixed_labels)`` label maps (first channel used); used for Dice
            and HD95 metrics, and for a Dice loss when ``dice_weight > 0``.
        **kwargs: the keyword options of :func:`register_many`.
    """
    return register_many([moving], [fixed], transform, loss, labels=None if labels is None else [labels], **kwargs)[0]


def register_many(
    movings: Sequence[Any],
    fixeds: Sequence[Any],
    transform: str | Sequence[str | Stage] = _D.transform,
    loss: str = _D.loss,
    *,
    window: int | float = _D.window,
    window_mm: bool = _D.window_mm,
    bins: int = _D.bins,
    regularization: dict[str, float] | None = None,
    labels: Sequence[tuple[Any, Any] | None] | None = None,
    dice_weight: float = _D.dice_weight,
    fixed_mask: Any = None,
    init: str = _D.init,
    initial_matrix: Tensor | None = None,
    initial_deformable: Transform | None = None,
    device: str | torch.device | None = _D.device,
    progress: bool = True,
    seed: int = _D.seed,
    tol: float | None = _D.tol,
    linear_loss: str | None = _D.linear_loss,
) -> list[RegistrationResult]:
    """Register ``N`` pairs; all fixed images share one grid, and all moving images another.

    Each pair is solved on its own inside the batch (its own line searches, steps and convergence),
    so the results equal ``N`` separate registrations, except that Adam and ``syn`` levels end when
    the batch's mean loss stalls.

    Args:
        window: LNCC window in voxels (odd), or mm with ``window_mm``.
        bins: histogram bins of ``"mi"``.
        regularization: weights of ``"diffusion"``, ``"bending"``, ``"folding"`` on a parametric
            deformable stage (defaults: diffusion 0.5 for svf/displacement, bending 1.0 for bspline,
            on its coefficients in units of the control spacing; TPS and syn take none: syn is
            regularized by its Gaussian smoothing).
        labels: per pair ``(moving_labels, fixed_labels)`` or ``None``.
        dice_weight: weight of a Dice loss on the labels (labels present in every pair; not syn).
        fixed_mask: optional mask on the fixed grid restricting the similarity.
        init: ``"com"`` (centres of mass), ``"moments"`` (principal axes too) or ``"none"``.
        initial_matrix: a starting world map instead of ``init``, homogeneous ``(1 or N, d+1, d+1)``
            fixed -> moving (e.g. a network's prediction, refined here).
        initial_deformable: a world-space deformable map ``D`` kept fixed between the matrix part
            and the deformable stage: ``T = (M ∘ A) ∘ D ∘ φ``; the result's deformable part is ``D ∘ φ``.
        device: ``"cpu"``, ``"cuda"``...; defaults to CUDA when available.
        progress: show a progress bar over stages, levels and iterations.
        seed: seed of the random sampling of ``"mi"``.
        tol: overrides every stage's :attr:`Stage.tol` (``0``: every level runs its iteration cap).
        linear_loss: the matrix stages' similarity (default: ``"ncc"`` where ``loss`` is ``"lncc"``,
            else ``loss``). On the prostate tuning pairs of ``benchmarks/pairwise.py``, ``"lncc"``
            aligns the gland better (affine alone: Dice 0.667 against 0.537) at twice the time,
            while the global NCC recovers exact transforms more precisely (a 3D affine to 0.010 mm
            against 0.099 mm) and runs in the fused kernel.
    """
    t_start = time.perf_counter()
    if tol is not None and tol < 0:
        raise InputError(f"tol must be >= 0, got {tol}")
    objective = RegistrationLoss(loss, bins=bins, dice_weight=dice_weight)
    if linear_loss is not None:
        RegistrationLoss(linear_loss)  # validates the name
    stages = parse_pipeline(transform)
    if tol is not None:
        for s in stages:
            s.tol = tol
    dev = resolve_device(device)
    problem = build_problem(
        movings,
        fixeds,
        joint_intensities=loss == "mse",
        labels=labels,
        dice_labels=dice_weight > 0,
        fixed_mask=fixed_mask,
        device=dev,
    )
    n, fgrid = problem.n, problem.fixed_grid
    objective.window = max(3, round(window / problem.voxel) | 1) if window_mm else int(window)
    inits = [initial_matrix_of(problem, i, init) for i in range(n)]
    m0 = torch.stack([x[0] for x in inits])
    center = torch.stack([x[1] for x in inits]).mean(0).float()
    d = fgrid.ndim
    if initial_matrix is not None:
        m0 = torch.as_tensor(initial_matrix, dtype=torch.float64).cpu()
        if m0.shape[-2:] != (d + 1, d + 1) or m0.shape[0] not in (1, n):
            raise InputError(f"initial_matrix must be (1 or {n}, {d + 1}, {d + 1}), got {tuple(m0.shape)}")
        m0 = m0.expand(n, d + 1, d + 1)
    projective = bool((m0[:, d, :d].abs() > 1e-12).any())
    prefix: MatrixTransform = (Projective if projective else Affine).from_matrix(m0.float()).to(dev)
    fixed_part = None if initial_deformable is None else initial_deformable.to(dev)
    deformable: Transform | None = None
    history: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    total_iters = sum(k for s in stages for _, k in levels(s, fgrid.shape))
    bar = tqdm(total=total_iters, desc="register", unit="it", disable=not progress or None, leave=False)
    solves: list[dict[str, Any]] = []
    for si, stage in enumerate(stages):
        t_stage = time.perf_counter()
        run = _Run(problem, stage, objective, seed, bar, history, solves, linear_loss)
        if stage.family in MATRIX:
            prefix = run.matrix_stage(prefix, fixed_part, center)
        elif stage.family == "syn":
            deformable = run.syn_stage(prefix, fixed_part)
        else:
            deformable = run.field_stage(prefix, fixed_part, center, regularization)
        timings[f"stage_{si}_{stage.family}_s"] = time.perf_counter() - t_stage
    bar.close()
    timings["optimization_s"] = time.perf_counter() - t_start
    settings = {
        "transform": "+".join(s.family for s in stages),
        "stages": [s.__dict__ for s in stages],
        "loss": loss,
        "stage_losses": [stage_loss(s, loss, linear_loss) for s in stages],
        "window": objective.window if loss == "lncc" else None,
        "bins": bins if loss == "mi" else None,
        "regularization": regularization,
        "dice_weight": dice_weight,
        "init": "given initial transform" if initial_matrix is not None else init,
        "device": str(dev),
        "seed": seed,
        "batch_size": n,
        "solves": solves,
    }
    results = [_result(problem, i, prefix, deformable, fixed_part, settings, history, timings) for i in range(n)]
    for res in results:
        res.timings["total_s"] = time.perf_counter() - t_start
    # The lattices cached for the iterations would otherwise outlive the call (+240 MB RSS on the brain).
    clear_lattice_cache()
    return results


def _result(
    problem: Problem,
    i: int,
    matrix: MatrixTransform,
    deformable: Transform | None,
    fixed_part: Transform | None,
    settings: dict[str, Any],
    history: list[dict[str, Any]],
    timings: dict[str, float],
) -> RegistrationResult:
    """Pair ``i``'s result: ``T = M ∘ D ∘ φ`` (``D`` the kept initial deformable part), warped on the fixed grid."""
    mat = item(matrix, i).cpu()
    deform = None if deformable is None else item(deformable, i).cpu()
    if fixed_part is not None:
        kept = item(fixed_part, i if fixed_part.batch_size > 1 else 0).cpu()
        deform = kept if deform is None else Composite([kept, deform])
    full: Transform = mat if deform is None else Composite([mat, deform])
    with torch.no_grad():
        warped = apply(full, problem.moving[i], problem.fixed[i])
    res = RegistrationResult(
        warped=Image(warped.data, problem.fixed_grid, "warped"),
        transform=full,
        matrix=mat,
        deformable=deform,
        fixed=problem.fixed[i],
        moving=problem.moving[i],
        settings=settings,
        history=history,
        timings=dict(timings),
    )
    lm, lf = problem.label_maps[i] if problem.label_maps[i] else (None, None)
    res.label_maps = (lm, lf, problem.label_ids[i])
    return res


def initial_matrix_of(problem: Problem, i: int, init: str) -> tuple[Tensor, Tensor]:
    """Pair ``i``'s initial world map ``(d+1, d+1)`` (fixed -> moving) and the fixed centre of mass ``(d,)``."""
    f = problem.fixed_int[i : i + 1].cpu()
    m = problem.moving_int[i : i + 1].cpu()
    return initial_matrix(f, problem.fixed_grid, m, problem.moving_grid, init)


class _Run:
    """One stage's run over its levels: builds each level's objective and hands it to the stage's solver."""

    def __init__(
        self,
        problem: Problem,
        stage: Stage,
        loss: RegistrationLoss,
        seed: int,
        bar: tqdm,
        history: list[dict[str, Any]],
        solves: list[dict[str, Any]],
        linear_loss: str | None,
    ) -> None:
        self.problem, self.stage, self.seed, self.bar = problem, stage, seed, bar
        self.history, self.solves = history, solves
        sim = stage_loss(stage, loss.similarity, linear_loss)
        self.loss = RegistrationLoss(sim, loss.window, loss.bins, {}, loss.dice_weight)

    def _callback(self, factor: int) -> Callback:
        def cb(it: int, losses: Tensor) -> None:
            v = float(losses.mean())
            self.history.append({"stage": self.stage.family, "level": factor, "iteration": it - 1, "loss": v})
            self.bar.update()
            self.bar.set_postfix(stage=self.stage.family, level=f"1/{factor}", loss=f"{v:.4f}")

        return cb

    def _record(self, factor: int, cap: int, sol: Any) -> None:
        self.bar.update(cap - sol.iterations)
        self.solves.append(
            {
                "stage": self.stage.family,
                "level": factor,
                "iterations": sol.iterations,
                "evaluations": sol.evaluations,
                "cap": cap,
                "converged": [bool(c) for c in sol.converged],
            }
        )

    def matrix_stage(self, prefix: MatrixTransform, fixed_part: Transform | None, center: Tensor) -> MatrixTransform:
        """Optimize a matrix family after ``prefix`` (and before ``fixed_part``); returns the folded matrix."""
        p, stage = self.problem, self.stage
        dev, n, d = p.device, p.n, p.fixed_grid.ndim
        family = FAMILIES[stage.family](d, center=center).to(dev)
        scale = scale_for(family, p.extent, p.voxel).to(dev, torch.float32)
        init_params = family.identity_params(n).to(dev)
        x = torch.zeros_like(init_params)
        sim = self.loss.similarity
        has_labels = "moving_labels" in p.pyramids
        cubic = (stage.interpolation or ("cubic" if d == 2 else "linear")) == "cubic"

        def transform_of(xv: Tensor) -> MatrixTransform:
            return family.with_params(init_params + xv * scale)

        stage_levels = levels(stage, p.fixed_grid.shape)
        for li, (factor, cap) in enumerate(stage_levels):
            f_l, fgrid_l = p.pyramids["fixed"](factor)
            m_l, mgrid_l = p.pyramids["moving"](factor)
            mask_l, ohm_l, ohf_l = (p.level(k, factor) for k in ("mask", "moving_labels", "fixed_labels"))
            corners = _corners(fgrid_l, dev)
            # Cubic reading matters at the last level only, where the subvoxel optimum is decided;
            # its B-spline coefficients are computed once per level, not per evaluation.
            cubic_l = cubic and li == len(stage_levels) - 1
            read = bspline_prefilter(m_l.double()) if cubic_l else m_l
            voxel_l = float(min(fgrid_l.spacing))

            def objective(
                xv: Tensor, f_l=f_l, m_l=m_l, read=read, cubic_l=cubic_l, fgrid_l=fgrid_l, mgrid_l=mgrid_l,
                mask_l=mask_l, ohm_l=ohm_l, ohf_l=ohf_l,
            ) -> Tensor:  # fmt: skip
                mapping = prefix.compose(transform_of(xv))
                mapping = mapping if fixed_part is None else mapping.compose(fixed_part)
                # Only fixed voxels mapped inside the moving image count (ITK's rule): a moved-in
                # border, read as replicated edge values, would otherwise pull the optimum (0.39 mm
                # off an exact 3D shift of a prostate MR whose tissue reaches the image edges). The
                # fused kernel applies that rule in its one pass where it runs (stnreg.fast.dispatch).
                mode = "cubic" if cubic_l else "linear"
                value = try_fused_loss(m_l, f_l, mapping, fgrid_l, mgrid_l, sim, mask_l, mode, has_labels)
                if value is None:
                    # One sample of MI's voxels per level: a line search compares values of one function.
                    gen = torch.Generator(device=dev).manual_seed(self.seed)
                    coords = mapping.sampling_grid(fgrid_l, mgrid_l)
                    if cubic_l:
                        warped = cubic_sample(read, coords.double(), "border")
                    else:
                        warped = sample(m_l, coords.to(m_l.dtype), "linear", "border")
                    inside = _inside(coords, m_l.shape[2:])
                    mask = inside if mask_l is None else inside * mask_l
                    # In float64: near the optimum a line search compares losses that differ by less
                    # than float32 resolves (a 13 x 17 px rigid shift stopped 0.045 px short).
                    value = self.loss.similarity_term(warped.double(), f_l.double(), mask, gen, reduce=False)
                    # A pair whose overlap falls below a quarter of the fixed image scores +inf, so that
                    # a line search backs off (MI can rise on a sliver of overlap).
                    enough = inside.flatten(1).mean(1) >= MIN_OVERLAP
                    value = torch.where(enough, value, torch.full_like(value, math.inf))
                if ohm_l is not None and self.loss.dice_weight:
                    warped_labels = warp(ohm_l, mapping, fgrid_l, mgrid_l)
                    value = value + self.loss.dice_weight * dice_loss(warped_labels, ohf_l, reduce=False)
                return value

            def step_size(xa: Tensor, xb: Tensor, corners=corners, voxel_l=voxel_l) -> Tensor:
                # The largest move of the level's corners (mm, fixed world) over the level's voxel.
                with torch.no_grad():
                    delta = transform_of(xb.detach())(corners) - transform_of(xa.detach())(corners)
                return delta.norm(dim=-1).amax(-1) / voxel_l

            solver: Solver
            if stage.solver == "lbfgs":
                solver = LBFGS(tol=stage.tol)
            else:
                solver = Adam(lr=stage.lr * p.extent / p.voxel, tol=stage.tol)
            sol = solver.minimize(objective, x, cap, step_size, [self._callback(factor)])
            x = sol.x.detach()
            self._record(factor, cap, sol)
        with torch.no_grad():
            return prefix.compose(transform_of(x))

    def field_stage(
        self,
        prefix: MatrixTransform,
        fixed_part: Transform | None,
        center: Tensor,
        regularization: dict[str, float] | None,
    ) -> Transform:
        """Optimize a parametric deformable family (svf, displacement, bspline, tps) by Adam."""
        p, stage = self.problem, self.stage
        dev, n = p.device, p.n
        weights = dict(regularization or {})
        if not weights:
            weights = {"diffusion": 0.5} if stage.family in ("svf", "displacement") else {"bending": 1.0}
        for name in weights:
            if name not in REGULARIZERS:
                raise InputError(f"unknown regularizer {name!r}; choose from {', '.join(REGULARIZERS)}")
        loss = RegistrationLoss(self.loss.similarity, self.loss.window, self.loss.bins, weights, self.loss.dice_weight)
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        lv = levels(stage, p.fixed_grid.shape)
        family = make_stage_transform(stage, p.fixed_grid, center, p.voxel, lv[0][0]).to(dev)
        scale = scale_for(family, p.extent, p.voxel).to(dev, torch.float32)
        init_params = family.identity_params(n).to(dev)
        raw = torch.zeros_like(init_params)
        head = prefix if fixed_part is None else prefix.compose(fixed_part)
        for factor, cap in lv:
            if family.lattice_field:
                family, raw, scale, init_params = refine_field(
                    family, raw.detach(), stage, p.fixed_grid, center, p.voxel, factor, n
                )
            f_l, fgrid_l = p.pyramids["fixed"](factor)
            m_l, mgrid_l = p.pyramids["moving"](factor)
            mask_l, ohm_l, ohf_l = (p.level(k, factor) for k in ("mask", "moving_labels", "fixed_labels"))

            def objective(
                xv: Tensor, family=family, scale=scale, init_params=init_params, f_l=f_l, m_l=m_l, fgrid_l=fgrid_l,
                mgrid_l=mgrid_l, mask_l=mask_l, ohm_l=ohm_l, ohf_l=ohf_l,
            ) -> Tensor:  # fmt: skip
                params = params_from_raw(xv, scale, init_params, family, stage)
                mapping = head.compose(family.with_params(params))
                warped = warp(m_l, mapping, fgrid_l, mgrid_l, padding="border")
                warped_labels = None if ohm_l is None else warp(ohm_l, mapping, fgrid_l, mgrid_l)
                fld = field_for_regularizer(family, params)
                terms = loss(warped, f_l, [fld], warped_labels, ohf_l, mask_l, gen)
                return terms["loss"].reshape(1)

            sol = Adam(lr=stage.lr, tol=stage.tol).minimize(
                objective, raw.detach(), cap, _no_step, [self._callback(factor)]
            )
            raw = sol.x
            self._record(factor, cap, sol)
        with torch.no_grad():
            return family.with_params(params_from_raw(raw, scale, init_params, family, stage))

    def syn_stage(self, prefix: MatrixTransform, fixed_part: Transform | None) -> Transform:
        """Symmetric greedy diffeomorphic registration after the matrix part (see :mod:`.syn`)."""
        p, stage = self.problem, self.stage
        if fixed_part is not None:
            raise InputError("the syn stage does not take an initial deformable transform; use svf to refine one")
        if prefix.projective:
            raise InputError("the syn stage follows affine stages only, not a projective one")
        if "moving_labels" in p.pyramids:
            raise InputError("dice_weight > 0 is not supported by the syn stage; use svf or bspline")
        matrix = prefix.matrix().detach()
        x: Tensor | None = None
        level: SynLevel | None = None
        for factor, cap in levels(stage, p.fixed_grid.shape):
            f_l, fgrid_l = p.pyramids["fixed"](factor)
            m_l, mgrid_l = p.pyramids["moving"](factor)
            level = SynLevel(fgrid_l, mgrid_l, matrix, p.device)
            d, shape = fgrid_l.ndim, fgrid_l.shape
            if x is None:
                x = torch.zeros(p.n, 3, d, *shape, device=p.device)
            else:
                x = upsample(x.flatten(1, 2), shape).reshape(p.n, 3, d, *shape)
            solver = SymmetricGreedy(
                level, m_l, f_l, self.loss, p.level("mask", factor), stage.lr, stage.smooth, stage.smooth_total,
                stage.tol,
            )  # fmt: skip
            sol = solver.minimize(None, x, cap, None, [self._callback(factor)])
            x = sol.x
            self._record(factor, cap, sol)
        with torch.no_grad():
            return result_displacement(level, x)


def _inside(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """``(N, 1, *out)`` 1 where normalized sampler ``coords`` ``(N, *out, d)`` (``x, y, z``) have their
    linear interpolation cell inside an image of array ``shape``, else 0."""
    sizes = torch.tensor(list(reversed(shape)), dtype=coords.dtype, device=coords.device)
    index = ((coords + 1) * sizes - 1) / 2
    ok = ((index >= 0) & (index <= sizes - 1)).all(-1)
    return ok.unsqueeze(1).to(coords.dtype)


def _no_step(xa: Tensor, xb: Tensor) -> Tensor:
    """Adam's stop watches the loss; it asks no update size."""
    return torch.full((xa.shape[0],), float("inf"))


def _corners(grid: Grid, device: torch.device) -> Tensor:
    """World points ``(1, 2**d, d)`` of the corner voxel centres of ``grid``."""
    d = grid.ndim
    sizes = list(reversed(grid.shape))  # x, y, z
    idx = torch.tensor(list(itertools.product(*[(0.0, s - 1.0) for s in sizes])), dtype=torch.float64)
    m = grid.index_to_world()
    pts = idx @ m[:d, :d].T + m[:d, d]
    return pts.float().unsqueeze(0).to(device)
