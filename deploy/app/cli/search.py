"""`arq-deploy search`: per-layer bit-widths under a BOPs (or latency) budget, rewarded by certified robustness."""

from __future__ import annotations

from pathlib import Path

import click

from arq_deploy.app.cli.options import data_opt, model_opts, model_source, parse_preprocess, preprocess_opts


@click.command()
@model_opts
@data_opt
@preprocess_opts
@click.option("--sigma", type=float, default=None, help="smoothing noise std (default: the checkpoint's training σ)")
@click.option("--budget", type=float, default=0.015, show_default=True, help="fraction of W32A32 BOPs")
@click.option("--latency-budget-ms", type=float, default=None, help="latency budget on --target instead of BOPs")
@click.option("--target", default=None, help="target of the latency budget (its latency table)")
@click.option("--latency-table", default=None, type=click.Path(dir_okay=False),
              help="per-layer latency table of --target (from `arq-deploy latency-table`)")
@click.option("--episodes", type=int, default=200, show_default=True)
@click.option("--method", type=click.Choice(["ddpg", "random", "greedy"]), default="ddpg", show_default=True,
              help="DDPG agent (ARQ/HAQ), random search, or the greedy sensitivity baseline")
@click.option("--reward", "reward_kind", type=click.Choice(["irs", "full", "accuracy", "adaptive"]), default="irs",
              show_default=True, help="ACR by incremental smoothing (ARQ), by full certification, clean accuracy "
              "(HAQ), or ACR by adaptive certification (anytime-valid, at most --n-p samples per image, combined "
              "with IRS's bound; fewer samples per reward)")
@click.option("--val-images", type=int, default=50, show_default=True, help="validation subset of training images")
@click.option("--calib-images", type=int, default=256, show_default=True)
@click.option("--n0", type=int, default=100, show_default=True)
@click.option("--n", "n", type=int, default=2000, show_default=True, help="float certification samples per input")
@click.option("--n-p", "n_p", type=int, default=200, show_default=True,
              help="IRS disagreement samples per input (--reward adaptive: the cap per input)")
@click.option("--first-n", "first_n", type=int, default=25, show_default=True,
              help="--reward adaptive: samples of the first look per input (looks double up to --n-p)")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="--reward adaptive: stop an input when the cap could add at most this much radius")
@click.option("--stop", type=click.Choice(["cap", "float"]), default="cap", show_default=True,
              help="--reward adaptive: float also stops an input once its radius is within --tolerance of the float "
              "model's certified radius on it")
@click.option("--alpha", type=float, default=0.001, show_default=True)
@click.option("--alpha-zeta", type=float, default=0.001, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True, help="DDPG episodes with random actions")
@click.option("--min-bits", type=int, default=2, show_default=True)
@click.option("--max-bits", type=int, default=8, show_default=True)
@click.option("--warm-start", default=None, type=click.Path(dir_okay=False), help="policy.json tried first")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory (resumable)")
@click.option("--ray", "ray_address", default=None,
              help="evaluate each reward's validation images in parallel Ray actors: auto, local or HOST:PORT")
@click.option("--ray-workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs)")
@click.option("--rerank-top", type=int, default=0, show_default=True,
              help="re-score the K best distinct policies on fresh training images and keep the best of those "
              "(counters the winner's curse of a small validation set; 0: keep the best search reward)")
@click.option("--rerank-images", type=int, default=100, show_default=True,
              help="fresh training images (outside the search's validation and calibration sets) for --rerank-top")
def search(model_name, weights, input_shape, data, resize, center_crop, sigma, budget, latency_budget_ms, target,
           latency_table, episodes, method, reward_kind, val_images, calib_images, n0, n, n_p, first_n, tolerance,
           stop, alpha, alpha_zeta, warmup, min_bits, max_bits, warm_start, seed, out, ray_address, ray_workers,
           rerank_top, rerank_images):
    """Search per-layer bit-widths under a BOPs (or latency) budget; reward: certified robustness (ARQ)."""
    from arq_deploy.app.stages import search_stage
    from arq_deploy.core.config import SearchRunConfig

    cfg = SearchRunConfig(
        model=model_source(model_name, weights, input_shape), out=out, data=data,
        preprocess=parse_preprocess(resize, center_crop), sigma=sigma, budget=budget,
        latency_budget_ms=latency_budget_ms, target=target, latency_table=latency_table, episodes=episodes,
        method=method, reward_kind=reward_kind, val_images=val_images, calib_images=calib_images, n0=n0, n=n, n_p=n_p,
        alpha=alpha, alpha_zeta=alpha_zeta, warmup=warmup, min_bits=min_bits, max_bits=max_bits,
        warm_start=warm_start, seed=seed, ray_address=ray_address, ray_workers=ray_workers, rerank_top=rerank_top,
        rerank_images=rerank_images, first_n=first_n, tolerance=tolerance, stop=stop)
    summary = search_stage(cfg)
    if "rerank" in summary:
        r = summary["rerank"]
        click.echo(f"re-ranked the top {r['top']} on {r['images']} fresh images: chose episode "
                   f"{r['chosen_episode']} (reward {r['chosen_rerank_reward']:.4f} there, "
                   f"{r['chosen_search_reward']:.4f} in the search)")
    click.echo(f"best reward {summary['best_reward']:.4f} at {100 * summary['best_bops_fraction']:.3f}% of W32A32 "
               f"BOPs after {summary['episodes']} episodes ({summary['evaluations']} evaluated); wrote "
               f"{Path(out) / 'policy.json'}")


COMMANDS = (search,)
