"""`arq-deploy search` without click: validate every input before work, then run DDPG / random / greedy."""

from __future__ import annotations

from pathlib import Path

from arq_deploy.errors import ArqError, PolicyError


def run_search_command(*, model_name, weights, input_shape, data, sigma, budget, latency_budget_ms, target,
                       latency_table, episodes, method, reward_kind, val_images, calib_images, n0, n, n_p, alpha,
                       alpha_zeta, warmup, min_bits, max_bits, warm_start, seed, out, progress: bool = True,
                       greedy_grid=None, cache_dir=None, ray_address=None, ray_workers=None, rerank_top: int = 0,
                       rerank_images: int = 100) -> dict:
    """cache_dir: where the float model's certificates are kept (default: the run directory); runs with the same
    model and reward settings may share one (the certification log refuses a different run's settings).
    ray_address ("auto" | "local" | HOST:PORT): evaluate each reward's images in Ray actors
    (`arq_deploy.search.reward_ray`; same results as without).
    rerank_top > 0: re-score the top-k distinct policies on `rerank_images` fresh training images and choose the best
    of those scores (`arq_deploy.search.rerank`; not for greedy, which produces one policy)."""
    from arq_deploy.data import load_dataset
    from arq_deploy.fileio import sha256_file
    from arq_deploy.pipeline import check_data_fits, load
    from arq_deploy.search.agent import DDPGConfig
    from arq_deploy.search.reward import RewardConfig
    from arq_deploy.search.runner import SearchConfig, make_search

    if rerank_top < 0 or (rerank_top > 0 and rerank_images < 1):
        raise PolicyError(f"--rerank-top must be >= 0 and --rerank-images >= 1, got {rerank_top} and {rerank_images}")
    pool = None
    if ray_address:  # address and worker count checked before any work (the connection is made later)
        from arq_deploy.search.reward_ray import RewardPool

        pool = RewardPool(ray_address, ray_workers).check()
    if latency_budget_ms is not None and not target:
        raise PolicyError("--latency-budget-ms needs --target (the device whose latency table bounds the search)")
    if latency_budget_ms is not None and latency_table is None:
        raise PolicyError(f"a latency budget needs a latency table for target {target!r}: measure one with "
                          f"`arq-deploy latency-table --target {target}` and pass --latency-table")
    lm = load(model_name or ("digits_cnn" if data == "digits" and not weights else None), weights,
              input_shape=input_shape)
    if lm.meta.get("policy") is not None:
        raise ArqError("the checkpoint is already quantized (a `train --policy` model): search starts from a float "
                       "model")
    if sigma is None:
        sigma = float(lm.meta.get("sigma") or 0.0)
        if sigma <= 0:
            raise ArqError("give --sigma (the checkpoint does not record the noise it was trained with)")
    rcfg = RewardConfig(kind=reward_kind, sigma=sigma, images=val_images, calib_images=calib_images, n0=n0, n=n,
                        alpha=alpha, n_p=n_p, alpha_zeta=alpha_zeta, seed=seed)
    scfg = SearchConfig(episodes=episodes, budget=budget, latency_budget_ms=latency_budget_ms, target=target,
                        min_bits=min_bits, max_bits=max_bits, method=method,
                        seed=seed)
    if method == "ddpg":  # replay of ~40 episodes (HAQ: 2000 transitions for ~50 layers): older episodes' rewards
        from arq_deploy.search.layers import extract_layer_specs  # reflect other actions of their episode

        n_layers = max(1, len(extract_layer_specs(lm.model, lm.input_shape)))
        acfg = DDPGConfig(warmup=warmup, replay_size=40 * n_layers)
    else:
        acfg = None
    train_ds = load_dataset(data, "train")
    check_data_fits(train_ds, lm)
    sha = sha256_file(weights) if weights and Path(weights).is_file() else None
    s = make_search(lm, train_ds, out, scfg, rcfg, acfg, warm_start=warm_start, latency_table=latency_table,
                    model_sha256=sha, progress=progress)
    if pool is not None:
        pool.connect()  # before the float certification
    try:
        s.prepare(cache_dir)
        if pool is not None:
            pool.start(s.reward)
        if method == "greedy":
            return run_greedy(s, progress, greedy_grid)
        summary = s.run()
    finally:
        if pool is not None:
            pool.close()
    if rerank_top > 0:
        from arq_deploy.fileio import write_json
        from arq_deploy.search.rerank import rerank

        rec = rerank(s, train_ds, rerank_top, rerank_images, cache_dir)
        chosen = next(c for c in rec["candidates"] if c["episode"] == rec["chosen_episode"])
        summary |= {"rerank": {k: v for k, v in rec.items() if k not in ("candidates", "indices")},
                    "selected_episode": chosen["episode"], "selected_policy": chosen["policy"],
                    "selected_bops_fraction": chosen["bops_fraction"]}
        write_json(s.out / "summary.json", summary)
    return summary


def run_greedy(s, progress: bool = True, grid=None) -> dict:
    """The greedy sensitivity baseline in a search run directory: greedy.json and policy.json."""
    from arq_deploy.fileio import write_json
    from arq_deploy.progress import progress_bar
    from arq_deploy.search.baselines import greedy_sensitivity

    env = s.env
    grid = sorted(set(grid or range(env.min_bits, env.max_bits + 1)) | {env.max_bits})
    total = env.n_layers * (len(grid) - 1) + 2
    with progress_bar("greedy", total, progress) as (bar, task):
        policy, details = greedy_sensitivity(env, s.reward, grid, progress=lambda d, t: bar.update(task, completed=d))
    bits = [(policy.bits(n).w_bits, policy.bits(n).a_bits) for n in env.names]
    from arq_deploy.search.env import BopsCost

    bops = BopsCost(env.specs)
    summary = {"method": "greedy", "episodes": details["evaluations"], "evaluations": details["evaluations"],
               "best_reward": details["reward"], "best_policy": {n: list(b) for n, b in zip(env.names, bits)},
               "best_bops_fraction": bops.total(bits) / bops.total_w32a32, "cost": env.cost.total(bits),
               "reward_seconds": s.reward.seconds, "grid": grid} | {"details": details}
    policy.save(s.out / "policy.json")
    write_json(s.out / "summary.json", summary)
    return summary
