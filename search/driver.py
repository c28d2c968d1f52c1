"""`arq-deploy search` without click: validate every input before work, then run DDPG / random / greedy."""

from __future__ import annotations

from pathlib import Path

from arq_deploy.core.config import SearchRunConfig
from arq_deploy.core.data import image_size, load_dataset
from arq_deploy.core.errors import ArqError, PolicyError
from arq_deploy.core.fileio import sha256_file, write_json
from arq_deploy.core.progress import progress_bar
from arq_deploy.export.pipeline import check_data_fits, load
from arq_deploy.search.agent import DDPGConfig
from arq_deploy.search.baselines import greedy_sensitivity
from arq_deploy.search.env import BopsCost
from arq_deploy.search.reward import RewardConfig
from arq_deploy.search.runner import SearchConfig, make_search


def run_search(cfg: SearchRunConfig, progress: bool = True) -> dict:
    """Run the search a `SearchRunConfig` describes into its run directory `cfg.out` (resumable); returns the summary.

    cfg.cache_dir: where the float model's certificates are kept (default: the run directory); runs with the same
    model and reward settings may share one (the certification log refuses a different run's settings).
    cfg.ray_address ("auto" | "local" | HOST:PORT): evaluate each reward's images in Ray actors
    (`arq_deploy.search.reward_ray`; same results as without).
    cfg.rerank_top > 0: re-score the top-k distinct policies on `cfg.rerank_images` fresh training images and choose the
    best of those scores (`arq_deploy.search.rerank`; not for greedy, which produces one policy)."""
    sigma = cfg.sigma
    pool = None
    if cfg.ray_address:  # address and worker count checked before any work (the connection is made later)
        from arq_deploy.search.reward_ray import RewardPool

        pool = RewardPool(cfg.ray_address, cfg.ray_workers).check()
    if cfg.latency_budget_ms is not None and not cfg.target:
        raise PolicyError("--latency-budget-ms needs --target (the device whose latency table bounds the search)")
    if cfg.latency_budget_ms is not None and cfg.latency_table is None:
        raise PolicyError(f"a latency budget needs a latency table for target {cfg.target!r}: measure one with "
                          f"`arq-deploy latency-table --target {cfg.target}` and pass --latency-table")
    lm = load(cfg.model.name or ("digits_cnn" if cfg.data == "digits" and not cfg.model.weights else None),
              cfg.model.weights, input_shape=cfg.model.input_shape)
    if lm.policy is not None:
        raise ArqError("the checkpoint is already quantized (a `train --policy` model): search starts from a float "
                       "model")
    if sigma is None:
        sigma = float(lm.meta.get("sigma") or 0.0)
        if sigma <= 0:
            raise ArqError("give --sigma (the checkpoint does not record the noise it was trained with)")
    rcfg = RewardConfig(kind=cfg.reward_kind, sigma=sigma, images=cfg.val_images, calib_images=cfg.calib_images, n0=cfg.n0,
                        n=cfg.n, alpha=cfg.alpha, n_p=cfg.n_p, alpha_zeta=cfg.alpha_zeta, seed=cfg.seed,
                        first_n=cfg.first_n, tolerance=cfg.tolerance, stop=cfg.stop)
    scfg = SearchConfig(episodes=cfg.episodes, budget=cfg.budget, latency_budget_ms=cfg.latency_budget_ms, target=cfg.target,
                        min_bits=cfg.min_bits, max_bits=cfg.max_bits, method=cfg.method, seed=cfg.seed)
    if cfg.method == "ddpg":  # replay of ~40 episodes (HAQ: 2000 transitions for ~50 layers): older episodes' rewards
        from arq_deploy.export.quantize.layers import extract_layer_specs  # reflect other actions of their episode

        n_layers = max(1, len(extract_layer_specs(lm.model, lm.input_shape)))
        acfg = DDPGConfig(warmup=cfg.warmup, replay_size=40 * n_layers)
    else:
        acfg = None
    train_ds = load_dataset(cfg.data, "train", cfg.preprocess, model_size=image_size(lm.input_shape))
    check_data_fits(train_ds, lm)
    sha = sha256_file(cfg.model.weights) if cfg.model.weights and Path(cfg.model.weights).is_file() else None
    s = make_search(lm, train_ds, cfg.out, scfg, rcfg, acfg, warm_start=cfg.warm_start, latency_table=cfg.latency_table,
                    model_sha256=sha, progress=progress)
    cfg.save(cfg.config_path)  # the run directory exists and every input was checked
    if pool is not None:
        pool.connect()  # before the float certification
    try:
        s.prepare(cfg.cache_dir)
        if pool is not None:
            pool.start(s.reward)
        if cfg.method == "greedy":
            return run_greedy(s, progress, cfg.greedy_grid)
        summary = s.run()
    finally:
        if pool is not None:
            pool.close()
    if cfg.rerank_top > 0:
        from arq_deploy.core.fileio import write_json
        from arq_deploy.search.rerank import rerank

        rec = rerank(s, train_ds, cfg.rerank_top, cfg.rerank_images, cfg.cache_dir)
        chosen = next(c for c in rec["candidates"] if c["episode"] == rec["chosen_episode"])
        summary |= {"rerank": {k: v for k, v in rec.items() if k not in ("candidates", "indices")},
                    "selected_episode": chosen["episode"], "selected_policy": chosen["policy"],
                    "selected_bops_fraction": chosen["bops_fraction"]}
        write_json(s.out / "summary.json", summary)
    return summary


def run_greedy(s, progress: bool = True, grid=None) -> dict:
    """The greedy sensitivity baseline in a search run directory: greedy.json and policy.json."""

    env = s.env
    grid = sorted(set(grid or range(env.min_bits, env.max_bits + 1)) | {env.max_bits})
    total = env.n_layers * (len(grid) - 1) + 2
    with progress_bar("greedy", total, progress) as (bar, task):
        policy, details = greedy_sensitivity(env, s.reward, grid, progress=lambda d, t: bar.update(task, completed=d))
    bits = [(policy.bits(n).w_bits, policy.bits(n).a_bits) for n in env.names]

    bops = BopsCost(env.specs)
    summary = {"method": "greedy", "episodes": details["evaluations"], "evaluations": details["evaluations"],
               "best_reward": details["reward"], "best_policy": {n: list(b) for n, b in zip(env.names, bits)},
               "best_bops_fraction": bops.total(bits) / bops.total_w32a32, "cost": env.cost.total(bits),
               "reward_seconds": s.reward.seconds, "grid": grid} | {"details": details}
    policy.save(s.out / "policy.json")
    write_json(s.out / "summary.json", summary)
    return summary
