"""The mixed-precision search as an episodic environment (gymnasium API), HAQ-style.

One episode visits the quantizable layers in execution order (`LayerSpec` list), one step per layer:

  state s_t  = the layer's features, each min-max normalised over the model's layers to [0, 1]:
               (index, is_conv, is_depthwise, is_linear, in_channels, out_channels, kernel, stride, groups,
                feature size (input H·W), params, MACs, previous action a_{t-1})
  action a_t ∈ [0, 1]  ->  bits b_t = round(b_min − 0.5 + a_t·(b_max − b_min + 1)) clipped to [b_min, b_max],
               used for both the weights and the input activations of layer t (W b_t A b_t).

After the last layer the *action wall* enforces the budget: while the policy's cost exceeds the budget, the layer with
the largest cost contribution among those that can still lose a bit gives up one bit (the larger of its weight and
activation widths, weights on a tie). Cost is BOPs (Σ MACs·b_w·b_a, `QuantPolicy.bops`) or, with a latency table,
the sum of per-layer latencies on a target (`LatencyTable`). A measured latency need not fall with the bits (a
narrower pair can run on another, slower kernel, or a wider one on a faster kernel), so with a latency cost the wall
instead moves, while over budget, the one layer whose move to a narrower-or-equal pair saves the most time per bit
given up, and where no narrower pair of any layer is faster, takes the table's fastest pair of every layer; the
budget is infeasible only below that fastest policy. The episode's reward is `reward_fn(policy)`, given at the
last step; every earlier step returns 0 (the agent spreads the final reward over the episode's transitions, as HAQ).

Nothing here trains or evaluates a network: `reward_fn` does (see `arq_deploy.search.reward`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.policy import MAX_BITS, MIN_BITS, LayerBits, QuantPolicy
from arq_deploy.export.quantize.layers import LayerSpec

FEATURES = ("index", "is_conv", "is_depthwise", "is_linear", "in_channels", "out_channels", "kernel", "stride",
            "groups", "feature_size", "params", "macs", "prev_action")
W32A32 = 32 * 32


def action_to_bits(action: float, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> int:
    """a ∈ [0, 1] -> an integer width in [min_bits, max_bits], each width owning an equal share of [0, 1]."""
    a = float(np.clip(action, 0.0, 1.0))
    b = round(min_bits - 0.5 + a * (max_bits - min_bits + 1))
    return int(min(max(b, min_bits), max_bits))


def bits_to_action(bits: int, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> float:
    """The centre of the action interval that maps to `bits` (inverse of `action_to_bits`)."""
    return (bits - min_bits + 0.5) / (max_bits - min_bits + 1)


def layer_features(specs: Sequence[LayerSpec]) -> np.ndarray:
    """L × len(FEATURES) float32 matrix, columns min-max normalised over the layers (a constant column is 0); the
    last column (previous action) is left 0 for the environment to fill."""
    rows = []
    for i, s in enumerate(specs):
        rows.append([i, s.kind == "conv", s.kind == "dwconv", s.kind == "linear", s.in_channels, s.out_channels,
                     max(s.kernel), max(s.stride), s.groups, s.in_size[0] * s.in_size[1], s.params, s.macs, 0.0])
    m = np.asarray(rows, dtype=np.float64)
    lo, hi = m.min(axis=0), m.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (m - lo) / span
    out[:, hi == lo] = 0.0
    out[:, -1] = 0.0
    return out.astype(np.float32)


# ---------------------------------------------------------------- costs and the action wall


class BopsCost:
    """cost(bits) = Σ_l MACs_l · w_l · a_l; budget = fraction × W32A32 BOPs."""

    unit = "BOPs"

    def __init__(self, specs: Sequence[LayerSpec]):
        self.macs = [int(s.macs) for s in specs]
        self.total_w32a32 = sum(self.macs) * W32A32

    def layer(self, i: int, w: int, a: int) -> float:
        return float(self.macs[i] * w * a)

    def total(self, bits: Sequence[tuple[int, int]]) -> float:
        return float(sum(self.layer(i, w, a) for i, (w, a) in enumerate(bits)))


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer latency (ms) on one target for each bit-width pair, measured by `arq-deploy latency-table`.

    entries[layer name]["w{w}a{a}"] = ms. JSON: {"format": "arq-deploy/latency-table", "version": 1, "target": ...,
    "model": ..., "layers": {...}}, and optionally (tables from `arq-deploy latency-table`, see
    `arq_deploy.search.latency`) "source": {layer: {"w{w}a{a}": the measured variant the entry was copied from}}
    and "details": {variants, float layers, end-to-end check, measurement settings}. Tables without them load."""

    target: str
    model: str
    entries: dict
    source: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    FORMAT = "arq-deploy/latency-table"

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PolicyError(f"latency table {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise PolicyError(f"latency table {path} is not readable JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT or not isinstance(d.get("layers"), dict):
            raise PolicyError(f"{path} is not an arq-deploy latency table (format {cls.FORMAT!r})")
        return cls(str(d.get("target")), str(d.get("model")), d["layers"], dict(d.get("source") or {}),
                   dict(d.get("details") or {}))

    def to_dict(self) -> dict:
        out = {"format": self.FORMAT, "version": 1, "target": self.target, "model": self.model,
               "layers": self.entries}
        return out | ({"source": self.source} if self.source else {}) | ({"details": self.details} if self.details
                                                                         else {})


class LatencyCost:
    """cost(bits) = Σ_l latency_l(w_l, a_l) from a `LatencyTable` covering every layer and width pair used.

    Not monotone in the bits (`monotone` False): `action_wall` and `check_budget` search the table."""

    unit = "ms"
    monotone = False

    def __init__(self, specs: Sequence[LayerSpec], table: LatencyTable, target: str | None = None):
        if target is not None and table.target != target:
            raise PolicyError(f"the latency table was measured on target {table.target!r}, not {target!r}")
        self.names = [s.name for s in specs]
        missing = [n for n in self.names if n not in table.entries]
        if missing:
            raise PolicyError(f"the latency table for {table.target!r} has no entry for layer(s) {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}: measure it for this model")
        self.table = table

    def layer(self, i: int, w: int, a: int) -> float:
        row = self.table.entries[self.names[i]]
        key = f"w{w}a{a}"
        if key not in row:
            raise PolicyError(f"the latency table has no {key} entry for layer {self.names[i]!r}")
        return float(row[key])

    def total(self, bits: Sequence[tuple[int, int]]) -> float:
        return float(sum(self.layer(i, w, a) for i, (w, a) in enumerate(bits)))

    def fastest(self, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> list[tuple[int, int]]:
        """Per layer its fastest pair in [min_bits, max_bits]² (the widest on a tie): the cheapest policy."""
        pairs = [(w, a) for w in range(min_bits, max_bits + 1) for a in range(min_bits, max_bits + 1)]
        return [min(pairs, key=lambda p, i=i: (self.layer(i, *p), -(p[0] + p[1]), -p[0]))
                for i in range(len(self.names))]


def action_wall(bits: Sequence[tuple[int, int]], cost, budget: float, min_bits: int = MIN_BITS
                ) -> list[tuple[int, int]]:
    """Lower bits until cost.total(bits) <= budget, largest contributor first (see the module docstring).

    Raises PolicyError when even min_bits everywhere does not fit (checked by `check_budget` before a search).
    A cost that is not monotone in the bits (`monotone` False: a latency table) takes `_table_wall`."""
    out = [(int(w), int(a)) for w, a in bits]
    if not getattr(cost, "monotone", True):
        return _table_wall(out, cost, budget, min_bits)
    while cost.total(out) > budget * (1 + 1e-12):
        candidates = [i for i, (w, a) in enumerate(out) if max(w, a) > min_bits]
        if not candidates:
            raise PolicyError(f"the budget {budget:g} {cost.unit} cannot be met even at W{min_bits}A{min_bits} "
                              f"everywhere ({cost.total(out):g} {cost.unit})")
        i = max(candidates, key=lambda j: (cost.layer(j, *out[j]), -j))
        w, a = out[i]
        out[i] = (w - 1, a) if w >= a else (w, a - 1)
    return out


def _table_wall(out: list[tuple[int, int]], cost, budget: float, min_bits: int) -> list[tuple[int, int]]:
    """The action wall for a cost that need not fall with the bits (module docstring): while over budget, move the
    layer whose narrower-or-equal pair saves the most cost per bit given up (more bits kept, then the earlier layer,
    on a tie); with no such saving anywhere, every layer's fastest pair (`cost.fastest`)."""
    while cost.total(out) > budget * (1 + 1e-12):
        best = None
        for i, (w, a) in enumerate(out):
            here = cost.layer(i, w, a)
            for w2 in range(min_bits, w + 1):
                for a2 in range(min_bits, a + 1):
                    gain = here - cost.layer(i, w2, a2) if (w2, a2) != (w, a) else 0.0
                    if gain > 0:
                        score = (gain / ((w - w2) + (a - a2)), w2 + a2, -i)
                        if best is None or score > best[0]:
                            best = (score, i, (w2, a2))
        if best is None:
            fastest = cost.fastest(min_bits)
            if cost.total(fastest) > budget * (1 + 1e-12):
                raise PolicyError(f"the budget {budget:g} {cost.unit} cannot be met even by the fastest pair of "
                                  f"every layer ({cost.total(fastest):g} {cost.unit})")
            return fastest
        out[best[1]] = best[2]
    return out


def check_budget(cost, budget: float, n_layers: int, min_bits: int = MIN_BITS) -> None:
    """PolicyError, before any work, when the budget is not positive or below the cheapest policy: min_bits
    everywhere, or for a cost that is not monotone in the bits, every layer's fastest pair."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise PolicyError(f"the budget must be a positive number, got {budget!r}")
    if not getattr(cost, "monotone", True):
        floor = cost.total(cost.fastest(min_bits))
        if floor > budget * (1 + 1e-12):
            raise PolicyError(f"infeasible budget: {budget:g} {cost.unit} is below the fastest pair of every layer "
                              f"({floor:g} {cost.unit})")
        return
    floor = cost.total([(min_bits, min_bits)] * n_layers)
    if floor > budget * (1 + 1e-12):
        raise PolicyError(f"infeasible budget: {budget:g} {cost.unit} is below W{min_bits}A{min_bits} on every layer "
                          f"({floor:g} {cost.unit})")


# ---------------------------------------------------------------- the environment


class QuantEnv(gym.Env):
    """Episodic environment over `specs` with the gymnasium `reset`/`step` API (see the module docstring).

    reward_fn(policy: QuantPolicy) -> float. `info` of the last step holds the policy, its raw bits (before the
    wall), cost and the reward details (`reward_info`, when reward_fn returns (reward, info))."""

    metadata: dict = {"render_modes": []}

    def __init__(self, specs: Sequence[LayerSpec], reward_fn: Callable, budget: float, cost=None,
                 min_bits: int = MIN_BITS, max_bits: int = MAX_BITS):
        if not specs:
            raise PolicyError("the model has no quantizable layers (Conv2d or Linear)")
        if not (MIN_BITS <= min_bits <= max_bits <= MAX_BITS):
            raise PolicyError(f"bit range must satisfy {MIN_BITS} <= min <= max <= {MAX_BITS}, got {min_bits}..{max_bits}")
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        self.reward_fn = reward_fn
        self.cost = cost if cost is not None else BopsCost(self.specs)
        self.budget = float(budget)
        self.min_bits, self.max_bits = int(min_bits), int(max_bits)
        check_budget(self.cost, self.budget, len(self.specs), self.min_bits)
        self.features = layer_features(self.specs)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(FEATURES),), np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self._t = 0
        self._actions: list[float] = []

    @property
    def n_layers(self) -> int:
        return len(self.specs)

    def _obs(self) -> np.ndarray:
        s = self.features[self._t].copy()
        s[-1] = self._actions[-1] if self._actions else 0.0
        return s

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t, self._actions = 0, []
        return self._obs(), {"layer": self.names[0]}

    def policy_from_actions(self, actions: Sequence[float]) -> tuple[QuantPolicy, list[tuple[int, int]]]:
        """(the policy after the action wall, the raw bits before it) for one action per layer."""
        raw = [(b, b) for b in (action_to_bits(a, self.min_bits, self.max_bits) for a in actions)]
        walled = action_wall(raw, self.cost, self.budget, self.min_bits)
        policy = QuantPolicy({n: LayerBits(w, a) for n, (w, a) in zip(self.names, walled)})
        return policy, raw

    def step(self, action):
        if self._t >= self.n_layers:
            raise RuntimeError("step() after the episode ended: call reset()")
        self._actions.append(float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, 1.0)))
        self._t += 1
        if self._t < self.n_layers:
            return self._obs(), 0.0, False, False, {"layer": self.names[self._t]}
        policy, raw = self.policy_from_actions(self._actions)
        out = self.reward_fn(policy)
        reward, rinfo = out if isinstance(out, tuple) else (out, {})
        bits = [(policy.bits(n).w_bits, policy.bits(n).a_bits) for n in self.names]
        info = {"policy": policy, "raw_bits": raw, "cost": self.cost.total(bits), "cost_unit": self.cost.unit,
                "bops": BopsCost(self.specs).total(bits), "reward_info": rinfo}
        terminal = np.zeros(len(FEATURES), dtype=np.float32)
        return terminal, float(reward), True, False, info
