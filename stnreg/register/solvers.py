"""Solvers behind one protocol: ``solver.minimize(objective, x0, budget, stop, callbacks)``.

``objective(x)`` takes the variables ``x`` ``(N, ...)`` (one row per pair, requiring grad) and returns
the loss per pair ``(N,)`` (or the batch mean, for Adam); pairs are independent: pair ``i``'s loss
depends on ``x[i]`` alone. Each solver moves every pair on its own (its own step lengths, history
and convergence), so batched pairs give the results of separate runs.

``stop(x_old, x_new)`` returns the size of an update per pair ``(N,)``, in voxels of the level for the
engine's stages (the largest displacement of a point of the fixed image); a pair has converged
once an update is smaller than ``tol``. ``callbacks`` are called as ``cb(iteration, losses)`` with
the per-pair losses ``(N,)`` after each iteration (progress bars, history).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["LBFGS", "Adam", "Callback", "Plateau", "Solution", "Solver", "StepSize"]

Objective = Callable[[Tensor], Tensor]
StepSize = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor], None]


@dataclass
class Solution:
    """A solver's answer: the variables ``(N, ...)``, iterations and objective evaluations spent, and
    per pair ``(N,)`` whether the update size fell below ``tol`` (rather than the budget running out)."""

    x: Tensor
    iterations: int
    evaluations: int
    converged: Tensor


class Solver(Protocol):
    def minimize(
        self, objective: Objective, x0: Tensor, budget: int, stop: StepSize, callbacks: Sequence[Callback] = ()
    ) -> Solution: ...


@dataclass
class Plateau:
    """A loss-plateau stop: the best loss so far gained less than ``tol`` (relative) over the last
    ``patience`` iterations (``tol = 0``: never). The best loss is monotone, so that noisy losses
    such as sampled MI do not end a level by chance."""

    tol: float
    patience: int = 10

    def __post_init__(self) -> None:
        self.bests: list[float] = []

    def __call__(self, loss: float) -> bool:
        """Record one iteration's loss; whether the level has converged."""
        self.bests.append(min(loss, self.bests[-1]) if self.bests else loss)
        b = self.bests
        return len(b) > self.patience and b[-self.patience - 1] - b[-1] < self.tol * abs(b[-1])


def _value_and_grad(objective: Objective, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair losses ``(N,)`` and their gradients ``(N, ...)`` at ``x`` (pairs are independent, so the
    gradient of the sum is each pair's own)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        f = objective(x)
        if f.dim() != 1 or f.shape[0] != x.shape[0]:
            raise ValueError(f"the objective must return one loss per pair ({x.shape[0]},), got {tuple(f.shape)}")
        (g,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), g.detach()


@dataclass
class LBFGS:
    """Limited-memory BFGS with a backtracking (Armijo) line search, per pair.

    Each pair keeps ``history`` curvature pairs and its own step length. A first step (or one after a
    reset) moves the largest variable by ``first_step`` (variables are scaled so that one unit is
    about one voxel of displacement). A pair converges once an accepted update is smaller than
    ``tol`` (``stop``), or once no step along steepest descent longer than ``tol / 16`` lowers its loss
    (the loss is at a minimum to within ``tol``: linear interpolation makes the loss piecewise smooth,
    with kinks at whole-voxel shifts, where a line search, not the gradient, decides). No step moves
    a point by more than ``max_step`` (in ``stop``'s units).
    """

    tol: float = 1e-3
    history: int = 10
    first_step: float = 1.0
    armijo: float = 1e-4
    max_step: float = 2.0

    def minimize(
        self, objective: Objective, x0: Tensor, budget: int, stop: StepSize, callbacks: Sequence[Callback] = ()
    ) -> Solution:
        n = x0.shape[0]
        shape = x0.shape
        x = x0.detach().reshape(n, -1).clone()
        fun = lambda v: objective(v.reshape(shape))  # noqa: E731
        size_of = lambda a, b: stop(a.reshape(shape), b.reshape(shape))  # noqa: E731
        f, g = _value_and_grad(fun, x)
        evals = 1
        mem_s: list[list[Tensor]] = [[] for _ in range(n)]
        mem_y: list[list[Tensor]] = [[] for _ in range(n)]
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        converged = torch.zeros(n, dtype=torch.bool, device=x.device)
        it = 0
        for it in range(1, budget + 1):
            d = torch.stack([self._direction(g[i], mem_s[i], mem_y[i]) for i in range(n)])
            # A trust region: no trial step moves a point by more than max_step voxels (a step far
            # outside the basin can find a better but wrong optimum, e.g. MI on a sliver of overlap).
            reach = size_of(x, x + d)
            d = d * (self.max_step / reach.clamp_min(self.max_step))[:, None]
            slope = (d * g).sum(1)
            t = torch.ones(n, dtype=x.dtype, device=x.device)
            accepted = ~active
            x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
            while True:
                trial = torch.where(accepted[:, None], x_new, x + t[:, None] * d)
                f_try, g_try = _value_and_grad(fun, trial)
                evals += 1
                ok = ~accepted & (f_try <= f + self.armijo * t * slope)
                x_new[ok], f_new[ok], g_new[ok] = trial[ok], f_try[ok], g_try[ok]
                accepted = accepted | ok
                t = torch.where(accepted, t, t * 0.5)
                # A pair whose step has shrunk far below tol without lowering its loss gives up.
                too_small = ~accepted & (size_of(x, x + t[:, None] * d) < self.tol / 16)
                if bool((accepted | too_small).all()):
                    break
            failed = active & ~accepted
            for i in torch.nonzero(failed).flatten().tolist():
                if mem_s[i]:
                    mem_s[i], mem_y[i] = [], []  # a bad quasi-Newton direction: retry along -g
                else:
                    active[i], converged[i] = False, True
            moved = active & accepted
            size = size_of(x, x_new)
            for i in torch.nonzero(moved).flatten().tolist():
                s, y = x_new[i] - x[i], g_new[i] - g[i]
                if float(s @ y) > 1e-12 * float(s @ s):
                    mem_s[i].append(s)
                    mem_y[i].append(y)
                    if len(mem_s[i]) > self.history:
                        mem_s[i].pop(0)
                        mem_y[i].pop(0)
            done = moved & (size < self.tol)
            x = torch.where(moved[:, None], x_new, x)
            f = torch.where(moved, f_new, f)
            g = torch.where(moved[:, None], g_new, g)
            active &= ~done
            converged |= done
            for cb in callbacks:
                cb(it, f)
            if not bool(active.any()):
                break
        return Solution(x.reshape(shape), it, evals, converged)

    def _direction(self, g: Tensor, mem_s: list[Tensor], mem_y: list[Tensor]) -> Tensor:
        """The two-loop recursion: ``-H g``; without history a steepest-descent step of ``first_step``."""
        if not mem_s:
            return -g * (self.first_step / max(float(g.abs().max()), 1e-30))
        q = g.clone()
        alphas = []
        for s, y in zip(reversed(mem_s), reversed(mem_y), strict=True):
            rho = 1.0 / float(y @ s)
            a = rho * float(s @ q)
            q -= a * y
            alphas.append((rho, a))
        s, y = mem_s[-1], mem_y[-1]
        q *= float(s @ y) / float(y @ y)
        for (s, y), (rho, a) in zip(zip(mem_s, mem_y, strict=True), reversed(alphas), strict=True):
            q += (a - rho * float(y @ q)) * s
        d = -q
        return d if float(d @ g) < 0 else -g * (self.first_step / max(float(g.abs().max()), 1e-30))


@dataclass
class Adam:
    """Adam with a cosine decay of its rate to 5% over the budget (it lets Adam settle into an optimum
    instead of circling it); stops on a :class:`Plateau` of the batch-mean loss (``tol = 0``: runs
    the whole budget). Adam updates each variable on its own, so pairs stay independent; the stop
    watches the batch mean.
    """

    lr: float
    tol: float = 1e-3
    patience: int = 10

    def minimize(
        self, objective: Objective, x0: Tensor, budget: int, stop: StepSize, callbacks: Sequence[Callback] = ()
    ) -> Solution:
        x = x0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, budget), eta_min=0.05 * self.lr)
        plateau = Plateau(self.tol, self.patience)
        it = 0
        converged = False
        for it in range(1, budget + 1):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                f = objective(x)
                f.sum().backward()
            opt.step()
            sched.step()
            losses = f.detach().reshape(-1)
            for cb in callbacks:
                cb(it, losses)
            if plateau(float(losses.mean())):
                converged = math.isfinite(plateau.bests[-1])
                break
        return Solution(x.detach(), it, it, torch.full((x0.shape[0],), converged, dtype=torch.bool))
