"""`search --ray`: rewards evaluated by Ray actors over shares of the validation images equal sequential ones."""

import json
import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from arq_deploy.core.policy import QuantPolicy  # noqa: E402


def search(weights, out, **changes) -> dict:
    from arq_deploy.core.config import ModelSource, SearchRunConfig
    from arq_deploy.search.driver import run_search

    base = dict(data="digits", budget=0.02, val_images=16, calib_images=64, n0=50, n=300, n_p=64, warmup=1, seed=5)
    return run_search(SearchRunConfig(model=ModelSource(weights=str(weights)), out=str(out), **(base | changes)),
                      progress=False)


@pytest.fixture(autouse=True)
def no_ray_connection():
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "the search must shut down the Ray it started"


def _rows(path):
    return [json.loads(line) for line in Path(path, "search.jsonl").read_text().splitlines()]


def _strip(info):
    return {k: v for k, v in info.items() if k != "seconds"}


def test_ray_search_equals_the_sequential_one(digits_model, tmp_path):
    """3 DDPG episodes with the IRS reward, sequential and with 2 local Ray actors (sharing the float cache)."""
    _, ckpt = digits_model
    a = search(ckpt, tmp_path / "seq", episodes=3)
    b = search(ckpt, tmp_path / "ray", episodes=3, cache_dir=str(tmp_path / "seq"), ray_address="local", ray_workers=2)
    ra, rb = _rows(tmp_path / "seq"), _rows(tmp_path / "ray")
    assert [r["policy"] for r in rb] == [r["policy"] for r in ra]
    assert [r["reward"] for r in rb] == [r["reward"] for r in ra]  # exactly, not approximately
    assert [_strip(r["reward_info"]) for r in rb] == [_strip(r["reward_info"]) for r in ra]
    assert b["best_policy"] == a["best_policy"]
    assert max(r["reward"] for r in ra) > 0  # the trained model certifies something: the comparison means something


@pytest.mark.slow  # ~80 s: the IRS sharding is covered by the default suite (test_ray_search_equals_the_sequential_one)
def test_full_and_accuracy_rewards_shard_identically(digits, digits_model, tmp_path):
    from arq_deploy.search.reward import RewardConfig, RewardEvaluator
    from arq_deploy.search.reward_ray import RewardPool

    lm, _ = digits_model
    train_ds, _ = digits
    pols = [QuantPolicy.uniform(8), QuantPolicy.uniform(3)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for kind, extra in (("full", dict(n0=30, n=200)), ("accuracy", {})):
            cfg = RewardConfig(kind=kind, sigma=0.25, images=10, calib_images=32, **extra)
            seq, par = RewardEvaluator(lm, train_ds, cfg), RewardEvaluator(lm, train_ds, cfg)
            seq.prepare(tmp_path / kind)
            par.prepare(tmp_path / kind)
            seq(QuantPolicy.uniform(7))
            par._float_graph = seq._float_graph  # the policy-independent float export, made once
            pool = RewardPool("auto", 2).connect().start(par)
            assert not pool.started  # a Ray connection it did not start is left alone
            try:
                for p in pols:
                    (r1, i1), (r2, i2) = seq(p), par(p)
                    assert r1 == r2 and _strip(i1) == _strip(i2), kind
            finally:
                pool.close()
            assert ray.is_initialized()
    finally:
        ray.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_fails_before_the_float_certification(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    out = tmp_path / "run"
    rc, _, err = cli("search", "--weights", ckpt, "--episodes", "1", "--val-images", "8", "--ray",
                     f"127.0.0.1:{_closed_port()}", "--out", out)
    assert rc == 2 and err.startswith("error:") and "cannot reach a Ray cluster" in err and "Traceback" not in err
    assert not out.exists()  # refused before the run directory was made


def test_bad_worker_count_is_refused():
    from arq_deploy.core.errors import ArqError
    from arq_deploy.search.reward_ray import RewardPool

    with pytest.raises(ArqError, match="--ray-workers must be >= 1"):
        RewardPool("local", 0)
