"""Baselines for the search, in the same harness (environment, budget, reward evaluator):

  uniform(b)             W b A b everywhere;
  best_uniform(budget)   the widest uniform W b A b whose cost fits the budget;
  greedy_sensitivity     per-layer sensitivity, then greedy bit lowering: mixed precision without RL;
  (random search and HAQ's accuracy reward are `Search` with method "random" / a RewardConfig of kind "accuracy".)

greedy_sensitivity: with every layer at b_max, r_l(b) = reward with layer l alone at b ∈ grid (one evaluation each;
r_l(b_max) = the all-b_max reward). Starting from b_max everywhere, while the cost exceeds the budget, move the layer
whose next lower grid width costs the least reward per unit of cost saved, (r_l(b) − r_l(b⁻)) / (c_l(b) − c_l(b⁻)),
down to that width (assuming per-layer drops add up, the usual first-order sensitivity assumption). The final policy is
evaluated too. Evaluations: L·(|grid| − 1) + 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.policy import LayerBits, QuantPolicy


def uniform(names: Sequence[str], bits: int) -> QuantPolicy:
    return QuantPolicy({n: LayerBits(bits, bits) for n in names})


def best_uniform(env) -> int:
    """The largest b in [min_bits, max_bits] with W b A b everywhere within the env's budget."""
    for b in range(env.max_bits, env.min_bits - 1, -1):
        if env.cost.total([(b, b)] * env.n_layers) <= env.budget * (1 + 1e-12):
            return b
    raise PolicyError(f"no uniform width fits the budget {env.budget:g} {env.cost.unit}")


def greedy_sensitivity(env, reward, grid: Sequence[int] | None = None, progress=None) -> tuple[QuantPolicy, dict]:
    """(policy, details) of the greedy sensitivity baseline (see the module docstring). `reward(policy)` returns
    (reward, info); `progress(done, total)` is called after each evaluation when given."""
    grid = sorted({int(b) for b in (grid or range(env.min_bits, env.max_bits + 1))} | {env.max_bits})
    if grid[0] < env.min_bits:
        raise PolicyError(f"greedy grid {grid} goes below the minimum width {env.min_bits}")
    names, top = env.names, env.max_bits
    total = len(names) * (len(grid) - 1) + 2
    done = 0

    def evaluate(bits: list[int]) -> float:
        nonlocal done
        r, _ = reward(QuantPolicy({n: LayerBits(b, b) for n, b in zip(names, bits)}))
        done += 1
        if progress:
            progress(done, total)
        return float(r)

    base = evaluate([top] * len(names))
    sens = {}
    for i in range(len(names)):
        sens[i] = {top: base}
        for b in grid[:-1]:
            bits = [top] * len(names)
            bits[i] = b
            sens[i][b] = evaluate(bits)
    current = [top] * len(names)
    while env.cost.total([(b, b) for b in current]) > env.budget * (1 + 1e-12):
        best, best_key = None, None
        for i, b in enumerate(current):
            lower = [g for g in grid if g < b]
            if not lower:
                continue
            nb = lower[-1]
            saved = env.cost.layer(i, b, b) - env.cost.layer(i, nb, nb)
            if saved <= 0:
                continue
            key = ((sens[i][b] - sens[i][nb]) / saved, -saved, i)
            if best_key is None or key < best_key:
                best, best_key = (i, nb), key
        if best is None:
            raise PolicyError("the greedy baseline cannot meet the budget with its grid")
        current[best[0]] = best[1]
    policy = QuantPolicy({n: LayerBits(b, b) for n, b in zip(names, current)})
    final = evaluate(current)
    return policy, {"reward": final, "evaluations": done, "base_reward": base,
                    "sensitivity": {names[i]: {str(b): r for b, r in s.items()} for i, s in sens.items()}}
