"""Re-scoring a search's best policies on fresh validation images before choosing one.

The search keeps the policy with the highest reward, but each reward is an estimate on a small validation subset
(40-50 images), so the maximum over dozens of episodes favours policies that were lucky on those images (the
winner's curse): a random search's best-of-80 draws looks as good as a learning agent's best although its other
candidates are much worse. `rerank` takes the top-k distinct policies of the finished search, scores each with the
same reward kind and settings on `images` *other* training images (disjoint from the search's validation and
calibration images; the calibration images are the search's, so every candidate is the same quantized model the
search scored), and selects the best of those scores. Every method that produces several candidates (DDPG with either
reward, random search) goes through the same step, with the same number of extra evaluations.

Writes `rerank.json` (candidates with their search and re-scored rewards, the chosen episode) and replaces
`policy.json` with the chosen policy, both atomically. The fresh images' float certificates are cached in
`cache_dir/rerank-<images>` like the search's own.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.fileio import write_json
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.search.reward import RewardEvaluator
from arq_deploy.search.runner import read_rows


def top_candidates(rows: list[dict], k: int) -> list[dict]:
    """The k highest-reward episodes with distinct policies (the earlier episode of a tie first)."""
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: (-r["reward"], r["episode"])):
        key = json.dumps(r["policy"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) >= k:
            break
    return out


def fresh_indices(n_train: int, exclude, images: int, seed: int) -> np.ndarray:
    """`images` seeded training indices outside `exclude`, sorted."""
    rest = np.setdiff1d(np.arange(n_train), np.asarray(list(exclude), dtype=np.int64))
    if images > len(rest):
        raise PolicyError(f"re-ranking needs {images} training images outside the search's validation and "
                          f"calibration images; only {len(rest)} are left (lower --rerank-images)")
    return np.sort(np.random.default_rng([seed, 0x5E1EC7]).permutation(rest)[:images])


def make_rerank_evaluator(search_reward, train_ds, images: int):
    """A RewardEvaluator with the search's reward settings and calibration images on fresh validation images."""

    cfg = dataclasses.replace(search_reward.cfg, images=int(images))
    idx = fresh_indices(len(train_ds), np.concatenate([search_reward.val_idx, search_reward.calib_idx]), images,
                        cfg.seed)
    return RewardEvaluator(search_reward.lm, train_ds, cfg, indices=(idx, search_reward.calib_idx))


def rerank(search, train_ds, k: int, images: int, cache_dir: str | Path | None = None) -> dict:
    """Re-score the top-k policies of a finished `Search` on `images` fresh training images; write rerank.json and
    the chosen policy.json. Returns the rerank record."""

    if k < 1 or images < 1:
        raise PolicyError(f"--rerank-top and --rerank-images must be >= 1, got {k} and {images}")
    rows = read_rows(search.log)
    if not rows:
        raise PolicyError("nothing to re-rank: the search has no finished episode")
    t0 = time.perf_counter()
    ev = make_rerank_evaluator(search.reward, train_ds, images)
    base = Path(cache_dir) if cache_dir is not None else search.out
    prep = ev.prepare(base / f"rerank-{images}")
    cands = []
    for r in top_candidates(rows, k):
        reward, info = ev(QuantPolicy.for_layers(r["policy"], r["policy"].values()))
        cands.append({"episode": r["episode"], "policy": r["policy"], "bops_fraction": r["bops_fraction"],
                      "search_reward": r["reward"], "rerank_reward": reward, "seconds": info["seconds"]})
    best = max(cands, key=lambda c: (c["rerank_reward"], c["search_reward"], -c["episode"]))
    record = {"top": k, "images": images, "kind": ev.cfg.kind, "indices": [int(i) for i in ev.val_idx],
              "float_prepare_seconds": prep["seconds"], "seconds": time.perf_counter() - t0,
              "chosen_episode": best["episode"], "chosen_rerank_reward": best["rerank_reward"],
              "chosen_search_reward": best["search_reward"], "candidates": cands}
    write_json(search.out / "rerank.json", record)
    QuantPolicy.for_layers(best["policy"], best["policy"].values()).save(search.out / "policy.json")
    return record
