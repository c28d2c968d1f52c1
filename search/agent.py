"""A small DDPG agent for HAQ/ARQ-style mixed-precision search (one continuous action per layer).

Our own, not stable-baselines3: HAQ gives *every* transition of an episode the episode's final reward minus a moving
baseline, plays uniform random warm-up episodes and explores with truncated-normal noise whose std decays per
episode; SB3's DDPG expresses neither the episode-level reward nor the per-episode noise schedule.
  act:     e < W: a ~ U[lo, hi];  else a ~ TN(μ(s), σ_e; lo, hi), σ_e = σ₀·decay^(e − W)   (e: episode, W: warm-up)
  reward:  each transition of an episode stores the final reward R; then b ← β·b + (1 − β)·R (b₀ = first R). Updates
           use R − b with the *current* b, as HAQ's code does (a b frozen at store time learned worse on a toy).
  critic:  min mean_batch (Q(s, a) − y)²,  y = (R − b) + γ·(1 − done)·Q'(s', μ'(s'));   actor: max mean_batch Q(s, μ(s))
  targets: θ' ← (1 − τ)·θ' + τ·θ after each step; updates_per_step steps per transition once W episodes are observed.
All randomness comes from the agent's own numpy and torch Generators: the same seed and rewards give the same actions,
and `state_dict()` holds everything for a bit-for-bit resume. Keep the replay to ~40 episodes (HAQ: 2000 transitions,
~50 layers): a longer one confounds each action with the other actions of its older episode (stuck actions on a toy).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import NormalDist
from typing import Sequence

import numpy as np
import torch
from torch import nn

from arq_deploy.core.errors import ArqError
from arq_deploy.core.fileio import atomic_path

AGENT_FORMAT, AGENT_VERSION = "arq-deploy/ddpg-agent", 1
_STD_NORMAL = NormalDist()


class AgentConfigError(ArqError, ValueError):
    """A DDPG hyper-parameter out of range, or an agent checkpoint that cannot be read (also a ValueError)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DDPGConfig:
    """DDPG hyper-parameters; defaults are HAQ's. `gamma=1`: the task is episodic with the reward at the end."""

    actor_hidden: tuple[int, ...] = (300, 300)
    critic_hidden: tuple[int, ...] = (300, 300)
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    gamma: float = 1.0
    tau: float = 0.01
    replay_size: int = 2000
    batch_size: int = 64
    warmup: int = 20
    init_noise: float = 0.5
    noise_decay: float = 0.99
    baseline_decay: float = 0.95
    action_low: float = 0.0
    action_high: float = 1.0
    updates_per_step: int = 1

    def __post_init__(self):
        bad = []
        for name in ("actor_hidden", "critic_hidden"):
            h = getattr(self, name)
            if isinstance(h, (list, tuple)) and h and all(_is_int(n) and n >= 1 for n in h):
                object.__setattr__(self, name, tuple(h))
            else:
                bad.append(f"{name}={h!r} (must be a list of one or more positive integers)")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "float") and not (_is_int(v) or f.type == "float" and isinstance(v, float)
                                                    and math.isfinite(v)):
                bad.append(f"{f.name}={v!r} (must be {'an integer' if f.type == 'int' else 'a finite number'})")
        if not bad:  # the types are right, so the ranges can be compared
            c = self
            bad = [f"{name}={getattr(c, name)!r} (must be {want})" for name, ok, want in (
                ("lr_actor", c.lr_actor > 0, "> 0"), ("lr_critic", c.lr_critic > 0, "> 0"),
                ("gamma", 0 <= c.gamma <= 1, "in [0, 1]"), ("tau", 0 < c.tau <= 1, "in (0, 1]"),
                ("replay_size", c.replay_size >= 1, ">= 1"), ("batch_size", c.batch_size >= 1, ">= 1"),
                ("warmup", c.warmup >= 0, ">= 0"), ("init_noise", c.init_noise >= 0, ">= 0"),
                ("noise_decay", 0 < c.noise_decay <= 1, "in (0, 1]"),
                ("baseline_decay", 0 <= c.baseline_decay < 1, "in [0, 1)"),
                ("action_high", c.action_high > c.action_low, "> action_low"),
                ("updates_per_step", c.updates_per_step >= 0, ">= 0")) if not ok]
        if bad:
            raise AgentConfigError("bad DDPG config: " + "; ".join(bad))

    def to_dict(self) -> dict:
        return asdict(self) | {"actor_hidden": list(self.actor_hidden), "critic_hidden": list(self.critic_hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> "DDPGConfig":
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise AgentConfigError(f"unknown DDPG config key(s) {', '.join(map(str, unknown))}; "
                                   f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DDPGConfig":
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise AgentConfigError(f"DDPG config is not a JSON object of settings: {e}") from None


class ReplayBuffer:
    """Fixed-capacity ring of transitions (s: d floats, a, r, s': d floats, done); the oldest is overwritten first."""

    KEYS = ("states", "actions", "rewards", "next_states", "dones")

    def __init__(self, capacity: int, state_dim: int):
        self.capacity, self.pos, self.size, d = capacity, 0, 0, state_dim
        self.data = {k: np.zeros((capacity, w), np.float32) for k, w in zip(self.KEYS, (d, 1, 1, d, 1))}

    def add(self, s, a: float, r: float, s2, done: bool) -> None:
        for k, v in zip(self.KEYS, (s, a, r, s2, float(done))):
            self.data[k][self.pos] = v
        self.pos, self.size = (self.pos + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        """`n` transitions drawn uniformly with replacement: [s (n×d), a (n×1), r (n×1), s' (n×d), done (n×1)]."""
        idx = rng.integers(0, self.size, size=n)
        return [self.data[k][idx] for k in self.KEYS]

    def state_dict(self) -> dict:
        return {"pos": self.pos, "size": self.size, **{k: torch.from_numpy(v.copy()) for k, v in self.data.items()}}

    def load_state_dict(self, d: dict) -> None:
        arrays = {k: d[k].numpy().astype(np.float32) for k in self.KEYS}
        if any(arrays[k].shape != self.data[k].shape for k in self.KEYS):
            raise AgentConfigError("agent checkpoint's replay buffer does not fit this agent's state size/capacity")
        self.data, self.pos, self.size = arrays, int(d["pos"]), int(d["size"])


def _mlp(sizes: Sequence[int], gen: torch.Generator) -> nn.Sequential:
    """Linear-ReLU stack; hidden layers init U(±1/√fan_in), the last U(±3e-3) (DDPG paper), all from `gen`."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin, bound = nn.Linear(n_in, n_out), 3e-3 if i == len(sizes) - 2 else 1.0 / math.sqrt(n_in)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Actor(nn.Module):
    """μ(s) = lo + (hi − lo)·sigmoid(MLP(s)):  (B×d) -> (B×1) in [lo, hi]."""

    def __init__(self, state_dim: int, hidden: Sequence[int], gen: torch.Generator, low=0.0, high=1.0):
        super().__init__()
        self.net, self.low, self.high = _mlp([state_dim, *hidden, 1], gen), low, high

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self.net(s))


class Critic(nn.Module):
    """Q(s, a) = MLP([s, a]):  (B×d, B×1) -> (B×1)."""

    def __init__(self, state_dim: int, hidden: Sequence[int], gen: torch.Generator):
        super().__init__()
        self.net = _mlp([state_dim + 1, *hidden, 1], gen)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], dim=1))


def truncated_normal(rng: np.random.Generator, mean: float, std: float, low: float, high: float) -> float:
    """One draw of N(mean, std²) conditioned on [low, high] by inverse CDF of one u ~ U(0, 1) from `rng`:
    x = mean + std·Φ⁻¹(Φ(α) + u·(Φ(β) − Φ(α))),  α = (low − mean)/std,  β = (high − mean)/std."""
    u = rng.random()  # drawn even when std = 0, so the RNG stream does not depend on the noise level
    if std > 0:
        lo, hi = _STD_NORMAL.cdf((low - mean) / std), _STD_NORMAL.cdf((high - mean) / std)
        mean += std * _STD_NORMAL.inv_cdf(min(max(lo + u * (hi - lo), 1e-16), 1 - 1e-16))
    return float(min(max(mean, low), high))


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread: tiny MLPs gain nothing from more, suffer from oversubscription on a busy CPU, and the
    results no longer depend on the caller's torch.set_num_threads."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(n)


class DDPGAgent:
    """DDPG over per-layer actions with HAQ's episode reward, baseline, warm-up and decaying truncated noise."""

    PARTS = ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt")  # torch state_dicts

    def __init__(self, state_dim: int, config: DDPGConfig | None = None, seed: int = 0):
        if not _is_int(state_dim) or state_dim < 1:
            raise AgentConfigError(f"state_dim={state_dim!r} must be a positive integer")
        self.state_dim, self.config, self.seed = state_dim, config or DDPGConfig(), int(seed)
        c = self.config
        self.rng, self.gen = np.random.default_rng(self.seed), torch.Generator().manual_seed(self.seed)
        self.actor = Actor(state_dim, c.actor_hidden, self.gen, c.action_low, c.action_high)
        self.critic = Critic(state_dim, c.critic_hidden, self.gen)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.lr_actor, foreach=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr_critic, foreach=True)
        self.buffer = ReplayBuffer(c.replay_size, state_dim)
        self.baseline: float | None = None  # b; None until the first episode
        self.episode = 0  # episodes observed so far

    def noise_std(self, episode: int) -> float:
        """σ_e = σ_0 · decay^(e − W) for e ≥ W (warm-up episodes are uniform, not noisy)."""
        return self.config.init_noise * self.config.noise_decay ** max(episode - self.config.warmup, 0)

    def act(self, state, episode: int | None = None, explore: bool = True) -> float:
        """The action for one layer. `episode` defaults to the episodes observed so far; explore=False is greedy μ(s)
        (no randomness used)."""
        c, e = self.config, self.episode if episode is None else int(episode)
        if explore and e < c.warmup:
            return float(self.rng.uniform(c.action_low, c.action_high))
        with torch.no_grad(), _one_thread():
            mu = float(self.actor(torch.as_tensor(np.asarray(state, np.float32).reshape(1, -1)))[0, 0])
        return truncated_normal(self.rng, mu, self.noise_std(e), c.action_low, c.action_high) if explore else mu

    def observe_episode(self, transitions: Sequence[tuple], reward: float) -> None:
        """Store each (s, a, s', done) of one episode with its final reward R, update b, train once warm-up is over."""
        reward = float(reward)
        if not math.isfinite(reward):
            raise AgentConfigError(f"episode reward {reward!r} is not finite")
        b = reward if self.baseline is None else self.baseline
        self.baseline = self.config.baseline_decay * b + (1 - self.config.baseline_decay) * reward
        for s, a, s2, done in transitions:
            self.buffer.add(np.asarray(s, np.float32), float(a), reward, np.asarray(s2, np.float32), bool(done))
        self.episode += 1
        if self.episode >= self.config.warmup:
            with _one_thread():
                for _ in range(len(transitions) * self.config.updates_per_step):
                    self._update()

    def _update(self) -> None:
        """One critic step (MSE to the bootstrapped target), one actor step (ascend Q), one soft target update."""
        c = self.config
        s, a, r, s2, d = (torch.from_numpy(x) for x in self.buffer.sample(self.rng, c.batch_size))
        with torch.no_grad():
            y = (r - self.baseline) + c.gamma * (1 - d) * self.critic_target(s2, self.actor_target(s2))
        critic_loss = ((self.critic(s, a) - y) ** 2).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()  # the critic's parameter grads are cleared before use
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                torch._foreach_lerp_(list(tgt.parameters()), list(net.parameters()), c.tau)

    def state_dict(self) -> dict:
        """Everything needed to resume bit-for-bit, as plain tensors, dicts, numbers and strings."""
        return {"format": AGENT_FORMAT, "version": AGENT_VERSION, "config": self.config.to_dict(),
                "state_dim": self.state_dim, "seed": self.seed, "episode": self.episode, "baseline": self.baseline,
                "replay": self.buffer.state_dict(), "np_rng": copy.deepcopy(self.rng.bit_generator.state),
                "torch_rng": self.gen.get_state(), **{k: copy.deepcopy(getattr(self, k).state_dict())
                                                      for k in self.PARTS}}

    def load_state_dict(self, d: dict) -> None:
        if (d.get("format"), d.get("version"), d.get("state_dim")) != (AGENT_FORMAT, AGENT_VERSION, self.state_dim) \
                or DDPGConfig.from_dict(d["config"]) != self.config:
            raise AgentConfigError(f"agent checkpoint is not an {AGENT_FORMAT} v{AGENT_VERSION} one with this state "
                                   "size and DDPG config; use DDPGAgent.load(path) or start a fresh search")
        for k in self.PARTS:
            getattr(self, k).load_state_dict(d[k])
        self.buffer.load_state_dict(d["replay"])
        self.rng.bit_generator.state = copy.deepcopy(d["np_rng"])
        self.gen.set_state(d["torch_rng"])
        self.seed, self.episode, self.baseline = int(d["seed"]), int(d["episode"]), d["baseline"]

    def save(self, path: str | Path) -> None:
        """Write the checkpoint atomically; `torch.load(path, weights_only=True)` reads it."""
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)

    @classmethod
    def load(cls, path: str | Path) -> "DDPGAgent":
        """A new agent restored from `save(path)`, ready to continue exactly where the saved one stopped."""
        try:
            d = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as e:  # missing, corrupt or foreign file
            msg = "no such file" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}".splitlines()[0]
            raise AgentConfigError(f"cannot read agent checkpoint {path}: {msg}") from None
        if not isinstance(d, dict) or d.get("format") != AGENT_FORMAT or "config" not in d:
            raise AgentConfigError(f"{path} is not an {AGENT_FORMAT} checkpoint")
        agent = cls(int(d["state_dim"]), DDPGConfig.from_dict(d["config"]), int(d["seed"]))
        agent.load_state_dict(d)
        return agent
