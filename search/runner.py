"""The search loop: agent × environment × reward, with an append-only episode log that makes it resumable.

Run directory (`out`):
  manifest.json       what was searched and how (model identity, budget, reward and agent settings, seed, versions);
                      a resumed search must match it
  search.jsonl        one row per finished episode: episode, policy (layer -> [w, a]), raw bits, BOPs, BOPs fraction,
                      cost, reward, reward details, seconds, cached
  agent.pt            the agent after its last observed episode (weights, optimizers, replay buffer, RNG states)
  float-cert.tsv, float-irs-labels.npy   the float model's certificates and IRS labels (reward cache)
  policy.json         the best policy so far (written atomically after every improvement)
  reward_curve.png, best_policy.png      written at the end

Order of writes after an episode: the row is appended (and fsynced) first, then the agent is saved. A kill between
the two leaves one more row than the agent has seen: on resume, the agent replays that episode (it is deterministic
given its saved state), checks that it proposes the logged policy, and observes the logged reward. So no episode is
lost or repeated, and a resumed search equals an uninterrupted one with the same seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arq_deploy import __version__
from arq_deploy.core.errors import PolicyError
from arq_deploy.core.fileio import atomic_path, write_json
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.core.progress import progress_bar
from arq_deploy.export.quantize.layers import extract_layer_specs
from arq_deploy.search.agent import DDPGAgent
from arq_deploy.search.env import BopsCost, LatencyCost, LatencyTable, QuantEnv, bits_to_action
from arq_deploy.search.reward import RewardEvaluator, save_json_line

METHODS = ("ddpg", "random", "greedy")


@dataclass(frozen=True)
class SearchConfig:
    episodes: int = 200
    budget: float = 0.015  # fraction of W32A32 BOPs (ignored with a latency budget)
    latency_budget_ms: float | None = None
    target: str | None = None
    min_bits: int = 2
    max_bits: int = 8
    method: str = "ddpg"
    seed: int = 0

    def __post_init__(self):
        if int(self.episodes) < 1:
            raise PolicyError(f"episodes must be >= 1, got {self.episodes}")
        if self.method not in METHODS:
            raise PolicyError(f"unknown search method {self.method!r}; choose one of {', '.join(METHODS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def read_rows(path: Path) -> list[dict]:
    """The finished episodes of a search log; a partial last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise PolicyError(f"{path} line {n} is not JSON: the search log is damaged") from None
    for i, r in enumerate(rows):
        if r.get("episode") != i:
            raise PolicyError(f"{path}: row {i} is episode {r.get('episode')}; the search log is damaged")
    return rows


class Search:
    """One search run in `out` (see the module docstring). `env` is a `QuantEnv` whose reward_fn is `reward`
    (a `RewardEvaluator`, or any callable policy -> (reward, info) with a `remember` method)."""

    def __init__(self, out: str | Path, env, reward, config: SearchConfig, manifest: dict, agent_config=None,
                 progress: bool = True, warm_actions: list[float] | None = None):
        self.out = Path(out)
        self.warm_actions = warm_actions
        self.env, self.reward, self.cfg = env, reward, config
        self.progress = progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest | {"search": config.to_dict()}
        self._check_manifest()
        self.log = self.out / "search.jsonl"
        self.agent_path = self.out / "agent.pt"
        self.agent = self._make_agent(agent_config) if config.method == "ddpg" else None
        self.rng = np.random.default_rng(config.seed)  # random search's actions
        self._w32a32 = sum(s.macs for s in env.specs) * 32 * 32  # BOPs of the float model

    # ------------------------------------------------------------ files

    def _check_manifest(self) -> None:
        path = self.out / "manifest.json"
        mine = json.loads(json.dumps(self.manifest, sort_keys=True, default=str))
        if path.exists():
            theirs = json.loads(path.read_text())
            keys = ("model", "model_sha256", "layers", "reward", "search", "agent")
            strip = lambda m: m | {"search": {k: v for k, v in (m.get("search") or {}).items() if k != "episodes"}}
            diff = [k for k in keys if strip(theirs).get(k) != strip(mine).get(k)]  # more episodes: a continuation
            if diff:
                raise PolicyError(f"{self.out} holds another search (its manifest differs in {diff}); use another "
                                  f"--out or the same settings to resume it")
        else:
            write_json(path, mine)

    def _make_agent(self, agent_config):

        if self.agent_path.exists():
            return DDPGAgent.load(self.agent_path)
        state_dim = self.env.observation_space.shape[0]
        return DDPGAgent(state_dim, agent_config, seed=self.cfg.seed) if agent_config is not None \
            else DDPGAgent(state_dim, seed=self.cfg.seed)

    # ------------------------------------------------------------ episodes

    def _act(self, state, episode: int) -> float:
        if episode == 0 and self.warm_actions is not None:
            return float(self.warm_actions[self.env._t])
        if self.agent is None:
            return float(self.rng.random())
        return float(self.agent.act(state, episode))

    def _play(self, episode: int, logged: dict | None = None):
        """One episode: the agent proposes bits layer by layer, the env walls and rewards them."""
        state, _ = self.env.reset()
        transitions, done, info, reward = [], False, {}, 0.0
        while not done:
            action = self._act(state, episode)
            if self.env._t == self.env.n_layers - 1 and logged is not None:
                self._expect(logged, self.env.policy_from_actions(self.env._actions + [action])[0])
            nxt, reward, done, _, info = self.env.step(action)
            transitions.append((state, action, nxt, done))
            state = nxt
        return transitions, reward, info

    def _expect(self, logged: dict, policy) -> None:
        got = {n: [b.w_bits, b.a_bits] for n, b in policy.layers.items()}
        if got != logged["policy"]:
            raise PolicyError(f"resuming episode {logged['episode']}: the restored agent proposes another policy than "
                              f"the log holds; the run directory was changed or the agent file is stale")

    def _row(self, episode: int, info: dict, reward: float, seconds: float) -> dict:
        policy = info["policy"]
        rinfo = {k: v for k, v in info["reward_info"].items() if k != "cached"}
        return {"episode": episode, "policy": {n: [b.w_bits, b.a_bits] for n, b in policy.layers.items()},
                "raw_bits": [list(b) for b in info["raw_bits"]], "bops": info["bops"],
                "bops_fraction": info["bops"] / self._w32a32,
                "cost": info["cost"], "cost_unit": info["cost_unit"], "reward": reward, "reward_info": rinfo,
                "cached": bool(info["reward_info"].get("cached", False)), "seconds": round(seconds, 3)}

    def prepare(self, cache_dir: str | Path | None = None) -> dict:
        """The reward's one-off work (float certificates, cached in `cache_dir`, default the run directory)."""
        info = self.reward.prepare(cache_dir if cache_dir is not None else self.out)
        write_json(self.out / "float.json", info)
        return info

    def run(self) -> dict:
        """Run (or resume) to `episodes`; returns the summary (best policy, reward, cost, timings)."""

        rows = read_rows(self.log)
        for r in rows:  # a repeated policy costs nothing, also across a resume
            self.reward.remember(QuantPolicy.for_layers(r["policy"], r["policy"].values()), r["reward"],
                                 r["reward_info"])
        seen = self.agent.episode if self.agent is not None else len(rows)
        if seen > len(rows):
            raise PolicyError(f"{self.agent_path} has seen {seen} episodes but {self.log} holds {len(rows)}: "
                              "the run directory is inconsistent")
        for ep in range(seen, len(rows)):  # killed after logging, before saving the agent
            transitions, reward, _ = self._play(ep, logged=rows[ep])
            self.agent.observe_episode(transitions, rows[ep]["reward"])
            self.agent.save(self.agent_path)
        if self.agent is None:  # random search: advance the RNG past the logged episodes
            for r in rows[1 if self.warm_actions is not None else 0:]:
                self.rng.random(len(r["raw_bits"]))
        best = max(rows, key=lambda r: r["reward"]) if rows else None
        t_start = time.perf_counter()
        with progress_bar("search", self.cfg.episodes, self.progress) as (bar, task):
            bar.update(task, completed=len(rows), info=f"best {best['reward']:.4f}" if best else "")
            for ep in range(len(rows), self.cfg.episodes):
                t0 = time.perf_counter()
                transitions, reward, info = self._play(ep)
                row = self._row(ep, info, reward, time.perf_counter() - t0)
                save_json_line(self.log, row)
                rows.append(row)
                if self.agent is not None:
                    self.agent.observe_episode(transitions, reward)
                    self.agent.save(self.agent_path)
                if best is None or reward > best["reward"]:
                    best = row
                    info["policy"].save(self.out / "policy.json")
                bar.update(task, advance=1, info=f"best {best['reward']:.4f} @ {best['bops_fraction']:.2%} BOPs")
        if best is not None and not (self.out / "policy.json").exists():
            QuantPolicy.for_layers(best["policy"], best["policy"].values()).save(self.out / "policy.json")
        summary = summarize_rows(rows) | {"seconds_this_run": time.perf_counter() - t_start}
        write_json(self.out / "summary.json", summary)
        plot_search(rows, self.out, self.env.names)
        return summary


def summarize_rows(rows: list[dict]) -> dict:
    best = max(rows, key=lambda r: r["reward"])
    evaluated = [r for r in rows if not r["cached"]]
    return {"episodes": len(rows), "best_episode": best["episode"], "best_reward": best["reward"],
            "best_policy": best["policy"], "best_bops_fraction": best["bops_fraction"],
            "best_reward_info": best["reward_info"], "evaluations": len(evaluated),
            "reward_seconds": sum(r["reward_info"].get("seconds", 0.0) for r in evaluated),
            "episode_seconds": sum(r["seconds"] for r in rows)}


def plot_search(rows: list[dict], out: Path, names: list[str]) -> None:
    """reward_curve.png (reward per episode and best so far) and best_policy.png (bits per layer of the best)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    rewards = np.array([r["reward"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rewards, ".", ms=3, alpha=0.6, label="episode reward")
    ax.plot(np.maximum.accumulate(rewards), "-", label="best so far")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "reward_curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    best = max(rows, key=lambda r: r["reward"])
    w = [best["policy"][n][0] for n in names]
    a = [best["policy"][n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, w, 0.4, label="weight bits")
    ax.bar(x + 0.2, a, 0.4, label="activation bits")
    ax.set_xticks(x, [n.replace("layer", "L") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_title(f"best policy: reward {best['reward']:.4f}, {best['bops_fraction']:.2%} of W32A32 BOPs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "best_policy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def make_search(lm, train_ds, out: str | Path, search: SearchConfig, reward, agent_config=None,
                warm_start=None, latency_table=None, model_sha256: str | None = None, progress: bool = True
                ) -> "Search":
    """Check everything that can be wrong before any expensive work (budget, warm start, latency table, layers), then
    set up the run directory. `reward`: a `RewardConfig`. Returns a `Search`; call `.prepare()` then `.run()`."""

    specs = extract_layer_specs(lm.model, lm.input_shape)
    if not specs:
        raise PolicyError(f"model {lm.name!r} has no quantizable layers (Conv2d or Linear)")
    if search.latency_budget_ms is not None:
        if latency_table is None:
            raise PolicyError(f"a latency budget needs a latency table for target {search.target or '?'!r} "
                              f"(--latency-table, measured with `arq-deploy latency-table`)")
        table = latency_table if isinstance(latency_table, LatencyTable) else LatencyTable.load(latency_table)
        cost, budget = LatencyCost(specs, table, search.target), float(search.latency_budget_ms)
    else:
        if not (0 < search.budget <= 1):
            raise PolicyError(f"--budget is a fraction of W32A32 BOPs in (0, 1], got {search.budget}")
        cost = BopsCost(specs)
        budget = search.budget * cost.total_w32a32
    warm = None
    if warm_start is not None:
        from arq_deploy.core.policy import QuantPolicy

        pol = warm_start if isinstance(warm_start, QuantPolicy) else QuantPolicy.load(warm_start)
        pol.validate(specs)  # unknown layers -> PolicyError naming them
        warm = []
        for s in specs:
            b = pol.bits(s.name)
            warm.append(bits_to_action(max(search.min_bits, min(search.max_bits, b.w_bits if b else search.max_bits)),
                                       search.min_bits, search.max_bits))
    evaluator = RewardEvaluator(lm, train_ds, reward, progress=progress)
    env = QuantEnv(specs, evaluator, budget, cost, search.min_bits, search.max_bits)
    manifest = {"format": "arq-deploy/search", "version": 1, "tool_version": __version__, "model": lm.name,
                "model_sha256": model_sha256, "layers": [s.name for s in specs], "num_classes": lm.num_classes,
                "input_shape": list(lm.input_shape), "budget": {"value": budget, "unit": cost.unit},
                "reward": reward.to_dict(), "agent": agent_config.to_dict() if agent_config is not None else None,
                "warm_start": warm is not None}
    return Search(out, env, evaluator, search, manifest, agent_config, progress, warm_actions=warm)
