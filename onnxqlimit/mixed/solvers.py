"""Choose one measured configuration per block: the smallest predicted loss within budgets.

With blocks independent (the sensitivity model), this is a multiple-choice knapsack with
one constraint per budget. `milp` solves it exactly with scipy's HiGHS MILP solver;
`ga` is the paper's genetic algorithm over per-block configurations (tournament
selection, uniform crossover, per-gene mutation, elitism; fixed seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import QLimitError
from .config import SOLVERS, GAConfig


@dataclass
class Problem:
    losses: list[np.ndarray]  # per block: predicted loss of each option
    costs: list[np.ndarray]  # per block: (options, budgets) cost of each option
    limits: np.ndarray  # per budget: what the blocks together may spend

    def totals(self, choice: list[int]) -> tuple[float, np.ndarray]:
        loss = sum(float(l[i]) for l, i in zip(self.losses, choice))
        cost = np.sum([c[i] for c, i in zip(self.costs, choice)], axis=0) if choice else np.zeros(len(self.limits))
        return loss, cost

    def feasible(self, choice: list[int]) -> bool:
        return bool(np.all(self.totals(choice)[1] <= self.limits * (1 + 1e-9) + 1e-9))

    def cheapest(self, budget: int) -> list[int]:
        return [int(np.argmin(c[:, budget] + 1e-12 * l)) for c, l in zip(self.costs, self.losses)]


def solve(problem: Problem, solver: str = "milp", ga: GAConfig | None = None, seed: int = 0) -> list[int] | None:
    if solver == "milp":
        return solve_milp(problem)
    if solver == "ga":
        return solve_ga(problem, ga or GAConfig(), seed)
    raise QLimitError(f"--solver must be one of {', '.join(SOLVERS)} (got {solver!r})")


def solve_milp(problem: Problem) -> list[int] | None:
    sizes = [len(l) for l in problem.losses]
    starts = np.cumsum([0] + sizes)
    scale = max(1e-30, max(float(np.max(np.abs(l))) for l in problem.losses))
    objective = np.concatenate(problem.losses) / scale  # well-scaled for the solver's tolerances
    one_each = np.zeros((len(sizes), starts[-1]))
    for b, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        one_each[b, lo:hi] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    if len(problem.limits):
        spend = np.concatenate(problem.costs).T  # (budgets, variables)
        norm = np.maximum(np.abs(problem.limits), 1e-30)[:, None]
        constraints.append(LinearConstraint(spend / norm, -np.inf, problem.limits / norm[:, 0]))
    result = milp(objective, constraints=constraints, integrality=np.ones_like(objective), bounds=Bounds(0, 1),
                  options={"time_limit": 60})
    if result.x is None:
        return None
    choice = [int(np.argmax(result.x[lo:hi])) for lo, hi in zip(starts[:-1], starts[1:])]
    return choice if problem.feasible(choice) else None


def solve_ga(problem: Problem, config: GAConfig, seed: int = 0) -> list[int] | None:
    rng = np.random.default_rng(seed)
    sizes = np.array([len(l) for l in problem.losses])
    losses = [np.asarray(l, float) for l in problem.losses]
    scale = max(1e-30, sum(float(np.max(l)) for l in losses))
    limits = np.maximum(np.abs(problem.limits), 1e-30)

    def fitness(pop: np.ndarray) -> np.ndarray:
        loss = np.sum([l[pop[:, b]] for b, l in enumerate(losses)], axis=0) / scale
        if not len(problem.limits):
            return loss
        cost = np.sum([c[pop[:, b]] for b, c in enumerate(problem.costs)], axis=0)
        over = np.maximum(cost - problem.limits, 0) / limits
        return loss + 1e3 * over.sum(axis=1) + (over.sum(axis=1) > 0)  # any violation ranks below every plan within

    pop = rng.integers(0, sizes, size=(config.population, len(sizes)))
    for k in range(len(problem.limits)):  # the cheapest plan per budget: a feasible start where one exists
        pop[k % config.population] = problem.cheapest(k)
    score = fitness(pop)
    for _ in range(config.generations):
        order = np.argsort(score, kind="stable")
        children = [pop[i].copy() for i in order[: config.elite]]
        while len(children) < config.population:
            a, b = (pop[min(rng.integers(0, config.population, config.tournament), key=lambda i: score[i])]
                    for _ in range(2))
            child = np.where(rng.random(len(sizes)) < 0.5, a, b) if rng.random() < config.crossover else a.copy()
            mutate = rng.random(len(sizes)) < config.mutation
            child[mutate] = rng.integers(0, sizes[mutate])
            children.append(child)
        pop = np.stack(children)
        score = fitness(pop)
    best = [int(i) for i in pop[int(np.argmin(score))]]
    return best if problem.feasible(best) else None
