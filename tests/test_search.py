"""ARQ search: environment (state, action mapping, action wall), reward, baselines, resumable search end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.export.quantize.layers import LayerSpec
from arq_deploy.search.env import (
    FEATURES,
    BopsCost,
    LatencyCost,
    LatencyTable,
    QuantEnv,
    action_to_bits,
    action_wall,
    bits_to_action,
    check_budget,
    layer_features,
)


def spec(i, name, kind="conv", cin=16, cout=16, k=3, s=1, groups=1, hw=8, macs=None):
    macs = macs if macs is not None else hw * hw * cout * (cin // groups) * k * k
    return LayerSpec(i, name, kind, cin, cout, (k, k), (s, s), groups, (hw, hw), (hw // s, hw // s), macs,
                     cout * (cin // groups) * k * k)


SPECS = [spec(0, "a", cin=3, macs=1000), spec(1, "b", macs=8000), spec(2, "c", kind="dwconv", groups=16, macs=500),
         spec(3, "fc", kind="linear", k=1, hw=1, macs=100)]


def test_action_mapping_covers_every_width_equally():
    a = np.linspace(0, 1, 70001)
    bits = np.array([action_to_bits(v) for v in a])
    counts = np.bincount(bits, minlength=9)[2:]
    assert set(bits) == set(range(2, 9))
    assert counts.max() - counts.min() <= 2  # each width owns 1/7 of [0, 1]
    for b in range(2, 9):
        assert action_to_bits(bits_to_action(b)) == b
    assert action_to_bits(-3) == 2 and action_to_bits(7) == 8
    assert action_to_bits(0.5, 4, 6) == 5


def test_layer_features_normalised_and_informative():
    f = layer_features(SPECS)
    assert f.shape == (4, len(FEATURES))
    assert f.min() >= 0 and f.max() <= 1
    col = {n: f[:, i] for i, n in enumerate(FEATURES)}
    assert list(col["index"]) == [0, 1 / 3, 2 / 3, 1]
    assert list(col["is_depthwise"]) == [0, 0, 1, 0] and list(col["is_linear"]) == [0, 0, 0, 1]
    assert col["macs"][1] == 1 and col["macs"][3] == 0


@pytest.mark.parametrize("frac", [0.004, 0.01, 0.02, 0.05])
def test_action_wall_always_meets_the_budget(frac):
    cost = BopsCost(SPECS)
    budget = frac * cost.total_w32a32
    rng = np.random.default_rng(0)
    for _ in range(200):
        raw = [(int(b), int(b)) for b in rng.integers(2, 9, len(SPECS))]
        out = action_wall(raw, cost, budget)
        assert cost.total(out) <= budget
        assert all(2 <= w <= wr and 2 <= a <= ar for (w, a), (wr, ar) in zip(out, raw))
        if cost.total(raw) <= budget:
            assert out == raw  # nothing lowered when the budget already holds


def test_action_wall_lowers_the_largest_contributor_first():
    cost = BopsCost(SPECS)
    raw = [(8, 8)] * 4
    budget = cost.total(raw) - 1  # one bit off the biggest layer (b: 8000 MACs) suffices
    assert action_wall(raw, cost, budget) == [(8, 8), (7, 8), (8, 8), (8, 8)]


def test_infeasible_and_bad_budgets_are_refused():
    cost = BopsCost(SPECS)
    with pytest.raises(PolicyError, match="infeasible budget"):
        check_budget(cost, 0.9 * cost.total([(2, 2)] * 4), 4)
    for bad in (0, -1, float("nan")):
        with pytest.raises(PolicyError):
            check_budget(cost, bad, 4)
    with pytest.raises(PolicyError, match="no quantizable layers"):
        QuantEnv([], lambda p: 0.0, 1.0)


def test_latency_cost_needs_a_complete_table(tmp_path):
    entries = {s.name: {f"w{w}a{a}": 0.05 * (w + a) for w in range(2, 9) for a in range(2, 9)} for s in SPECS}
    t = LatencyTable("rpi4", "toy", entries)
    c = LatencyCost(SPECS, t, "rpi4")
    assert c.total([(8, 8)] * 4) == pytest.approx(4 * 0.8)
    out = action_wall([(8, 8)] * 4, c, 2.0)
    assert c.total(out) <= 2.0
    with pytest.raises(PolicyError, match="measured on target"):
        LatencyCost(SPECS, t, "rpi5")
    with pytest.raises(PolicyError, match="no entry for layer"):
        LatencyCost(SPECS, LatencyTable("rpi4", "toy", {"a": entries["a"]}))
    (tmp_path / "t.json").write_text(json.dumps(t.to_dict()))
    assert LatencyTable.load(tmp_path / "t.json") == t
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PolicyError, match="not an arq-deploy latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def _kernel_table() -> LatencyTable:
    """A latency table that does not fall with the bits, as measured integer builds do: per layer W8A8 on a fast
    8-bit kernel (1.0 ms), the pairs of 6..8 bits in all on a narrow kernel (0.9 ms at 6 bits: W3A3, W4A2, W2A4),
    the narrowest pairs slower again (1.2 ms: W2A2), and the rest slowest (1.4 ms); layer i adds 0.1·i."""
    def ms(i, w, a):
        if (w, a) == (8, 8):
            return 1.0 + 0.1 * i
        if 6 <= w + a <= 8:
            return 0.6 + 0.05 * (w + a) + 0.1 * i
        return (1.2 if w + a < 6 else 1.4) + 0.1 * i
    return LatencyTable("x86-avx2", "toy", {s.name: {f"w{w}a{a}": ms(i, w, a) for w in range(2, 9)
                                                     for a in range(2, 9)} for i, s in enumerate(SPECS)})


def test_latency_wall_searches_a_table_that_does_not_fall_with_the_bits():
    c = LatencyCost(SPECS, _kernel_table())
    w8 = c.total([(8, 8)] * 4)
    fastest = c.fastest()
    assert all(w + a == 6 for w, a in fastest) and c.total(fastest) == pytest.approx(w8 - 4 * 0.1)
    check_budget(c, 0.95 * w8, 4)  # feasible: W3A3 everywhere is 0.93× W8A8, though W2A2 is slower than W8A8
    c.monotone = True  # the BOPs rule (W2A2 everywhere is the cheapest) would refuse it
    with pytest.raises(PolicyError, match="infeasible budget"):
        check_budget(c, 0.95 * w8, 4)
    c.monotone = False
    with pytest.raises(PolicyError, match="below the fastest pair of every layer"):
        check_budget(c, 0.99 * c.total(fastest), 4)
    rng = np.random.default_rng(1)
    for _ in range(100):
        raw = [(int(b), int(b)) for b in rng.integers(2, 9, 4)]
        budget = float(rng.uniform(c.total(fastest), w8 + 1))
        out = action_wall(raw, c, budget)
        assert c.total(out) <= budget * (1 + 1e-12)
        if c.total(raw) <= budget:
            assert out == raw
    # from W8A8 with one layer's saving needed, the wall moves one layer to the pair that saves the most per bit
    # given up: 6 bits in all (0.1 ms for 10 bits), not the 7-bit pairs (0.05 ms for 9)
    out = action_wall([(8, 8)] * 4, c, w8 - 0.05)
    moved = [(i, p) for i, p in enumerate(out) if p != (8, 8)]
    assert len(moved) == 1 and sum(moved[0][1]) == 6 and c.total(out) <= w8 - 0.05


def test_latency_wall_falls_back_to_the_fastest_policy_when_no_narrower_pair_is_faster():
    # W8A8 is each layer's fastest pair: from (5, 5) no narrower pair saves anything, yet W8A8 meets the budget
    entries = {s.name: {f"w{w}a{a}": (0.5 if (w, a) == (8, 8) else 1.0) for w in range(2, 9) for a in range(2, 9)}
               for s in SPECS}
    c = LatencyCost(SPECS, LatencyTable("x86", "toy", entries))
    check_budget(c, 2.5, 4)
    assert action_wall([(5, 5)] * 4, c, 2.5) == [(8, 8)] * 4


def test_env_follows_the_gymnasium_api():
    from gymnasium.utils.env_checker import check_env

    seen = []

    def reward(policy):
        seen.append(policy)
        return -policy.bops(SPECS) / 1e6, {"note": "toy"}

    cost = BopsCost(SPECS)
    env = QuantEnv(SPECS, reward, 0.02 * cost.total_w32a32)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset()
    assert obs.shape == (len(FEATURES),) and obs[-1] == 0
    obs, r, term, trunc, _ = env.step(np.array([0.9]))
    assert obs[-1] == pytest.approx(0.9) and r == 0 and not term  # the previous action is part of the state
    for _ in range(3):
        obs, r, term, trunc, info = env.step(np.array([1.0]))
    assert term and not trunc
    assert info["bops"] <= 0.02 * cost.total_w32a32
    assert r == pytest.approx(-info["policy"].bops(SPECS) / 1e6)
    assert info["reward_info"] == {"note": "toy"}
    assert info["raw_bits"][0] == (8, 8)
    with pytest.raises(RuntimeError):
        env.step(np.array([0.5]))


def test_greedy_baseline_meets_budget_and_keeps_the_sensitive_layer():
    from arq_deploy.search.baselines import best_uniform, greedy_sensitivity

    cost = BopsCost(SPECS)
    env = QuantEnv(SPECS, lambda p: 0.0, 0.03 * cost.total_w32a32)

    def reward(policy):  # layer "a" is very sensitive, the others not at all
        return float(policy.bits("a").w_bits), {}

    policy, details = greedy_sensitivity(env, reward, grid=[2, 4, 6, 8])
    bits = [(policy.bits(n).w_bits, policy.bits(n).a_bits) for n in env.names]
    assert cost.total(bits) <= env.budget
    assert policy.bits("a").w_bits == 8
    assert details["evaluations"] == 4 * 3 + 2
    assert best_uniform(env) == max(b for b in range(2, 9) if cost.total([(b, b)] * 4) <= env.budget)


# ---------------------------------------------------------------- on the digits model (real reward)

SEARCH_ARGS = ["--data", "digits", "--budget", "0.02", "--warmup", "2", "--val-images", "16", "--n", "300",
               "--n-p", "64", "--calib-images", "64", "--n0", "50", "--seed", "3"]


def test_rewards_on_digits_rank_widths_and_are_cached(digits, digits_model, tmp_path):
    from arq_deploy.search.reward import RewardConfig, RewardEvaluator

    lm, _ = digits_model
    train_ds, _ = digits
    ev = RewardEvaluator(lm, train_ds, RewardConfig(kind="irs", sigma=0.25, images=20, n=500, n_p=100,
                                                    calib_images=64))
    fl = ev.prepare(tmp_path)
    assert (tmp_path / "float-cert.tsv").exists() and (tmp_path / "float-irs-labels.npy").exists()
    r8, i8 = ev(QuantPolicy.uniform(8))
    r2, i2 = ev(QuantPolicy.uniform(2))
    assert not i8["cached"] and ev(QuantPolicy.uniform(8))[1]["cached"] and ev.evaluations == 2
    assert r8 > r2 >= 0
    assert r8 <= fl["acr"] + 1e-9  # IRS can only lose radius against the float certificate
    assert i8["mean_disagreement"] < i2["mean_disagreement"]
    # the float labels come from the cache file on a second evaluator (prepare is resumable)
    ev2 = RewardEvaluator(lm, train_ds, ev.cfg)
    ev2.prepare(tmp_path)
    assert ev2(QuantPolicy.uniform(8))[0] == pytest.approx(r8)
    acc = RewardEvaluator(lm, train_ds, RewardConfig(kind="accuracy", sigma=0.25, images=64, calib_images=64))
    acc.prepare(tmp_path / "acc")
    a8, _ = acc(QuantPolicy.uniform(8))
    assert 0.5 < a8 <= 1.0


def _rows(path):
    return [json.loads(line) for line in Path(path, "search.jsonl").read_text().splitlines()]


def test_search_end_to_end_from_the_cli(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    full = tmp_path / "full"
    rc, out, err = cli("search", "--weights", ckpt, *SEARCH_ARGS, "--episodes", "3", "--out", full)
    assert rc == 0, err
    rows = _rows(full)
    assert [r["episode"] for r in rows] == [0, 1, 2]
    for name in ("policy.json", "manifest.json", "agent.pt", "summary.json", "reward_curve.png", "best_policy.png",
                 "float-cert.tsv"):
        assert (full / name).exists(), name
    assert all(r["bops_fraction"] <= 0.02 for r in rows)
    from arq_deploy.core.config import SearchRunConfig

    cfg = SearchRunConfig.load(full / "search.config.json")  # the config the command ran with
    assert (cfg.episodes, cfg.budget, cfg.model.weights, cfg.out) == (3, 0.02, str(ckpt), str(full))
    best = max(rows, key=lambda r: r["reward"])
    pol = QuantPolicy.load(full / "policy.json")
    assert {n: [b.w_bits, b.a_bits] for n, b in pol.layers.items()} == best["policy"]
    assert "best reward" in out
    rc, _, err = cli("search", "--weights", ckpt, *SEARCH_ARGS[:-1], "4", "--episodes", "3", "--out", full)
    assert rc == 2 and err.startswith("error:") and "another search" in err and "Traceback" not in err


SEARCH = dict(data="digits", budget=0.02, method="ddpg", reward_kind="irs", val_images=16, calib_images=64, n0=50,
              n=300, n_p=64, warmup=1, seed=5)


def search(weights, out, model=None, input_shape=None, **changes) -> dict:
    """`run_search` of a SearchRunConfig: SEARCH with `changes`, the model from `weights` (and `model`)."""
    from arq_deploy.core.config import ModelSource, SearchRunConfig
    from arq_deploy.search.driver import run_search

    cfg = SearchRunConfig(model=ModelSource(model, str(weights), input_shape), out=str(out), **(SEARCH | changes))
    return run_search(cfg, progress=False)


def test_resumed_search_equals_an_uninterrupted_one(digits_model, tmp_path):
    """2 episodes, then continued to 3 with the agent file one episode behind (a kill between logging an episode
    and saving the agent): the agent replays the logged episode and the run equals an uninterrupted 4-episode one."""
    from arq_deploy.search.agent import DDPGAgent

    _, ckpt = digits_model
    a = search(ckpt, tmp_path / "a", episodes=4)
    search(ckpt, tmp_path / "b", episodes=2)
    shutil.copy(tmp_path / "b" / "agent.pt", tmp_path / "agent-2.pt")
    search(ckpt, tmp_path / "b", episodes=3)
    shutil.copy(tmp_path / "agent-2.pt", tmp_path / "b" / "agent.pt")
    b = search(ckpt, tmp_path / "b", episodes=4)
    assert DDPGAgent.load(tmp_path / "b" / "agent.pt").episode == 4
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["policy"] for r in rb] == [r["policy"] for r in ra]
    assert [r["reward"] for r in rb] == pytest.approx([r["reward"] for r in ra])
    assert b["best_policy"] == a["best_policy"]
    # random search in the same harness, also resumable
    rnd = {"method": "random"}
    r1 = search(ckpt, tmp_path / "r1", episodes=3, **rnd)
    search(ckpt, tmp_path / "r2", episodes=1, **rnd)
    r2 = search(ckpt, tmp_path / "r2", episodes=3, **rnd)
    assert [r["policy"] for r in _rows(tmp_path / "r1")] == [r["policy"] for r in _rows(tmp_path / "r2")]
    assert r1["best_reward"] == pytest.approx(r2["best_reward"])


def test_search_survives_kill_9(digits_model, tmp_path):
    _, ckpt = digits_model
    exe = Path(sys.executable).with_name("arq-deploy")
    out = tmp_path / "run"
    args = [str(exe), "search", "--weights", str(ckpt), *SEARCH_ARGS, "--episodes", "4", "--out", str(out)]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "search.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(log.read_text().splitlines())
    assert 2 <= done
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [row["episode"] for row in _rows(out)] == list(range(4))


def test_search_bad_input_fails_before_work(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    cases = [
        (["--budget", "0.0001"], "infeasible budget"),
        (["--latency-budget-ms", "2", "--target", "rpi4"], "latency table"),
        (["--reward", "irs", "--n-p", "0"], "--n-p (number of noise samples) must be an integer >= 1"),
    ]
    for extra, msg in cases:
        out = tmp_path / f"run{len(msg)}"
        args = [a for a in SEARCH_ARGS]
        rc, _, err = cli("search", "--weights", ckpt, *args, *extra, "--episodes", "2", "--out", out)
        assert rc == 2 and msg in err and "Traceback" not in err, err
        assert not (out / "float-cert.tsv").exists()
    warm = tmp_path / "warm.json"
    QuantPolicy.for_layers(["conv1", "nosuchlayer"], [(8, 8), (4, 4)]).save(warm)
    rc, _, err = cli("search", "--weights", ckpt, *SEARCH_ARGS, "--warm-start", warm, "--episodes", "2",
                     "--out", tmp_path / "w")
    assert rc == 2 and "nosuchlayer" in err, err


def test_search_runs_mobilenetv2_and_a_user_model_unchanged(digits_model, tmp_path, monkeypatch):
    """Depthwise layers (CIFAR MobileNetV2) and a `package.module:factory` model go through the same harness."""
    import torch

    from arq_deploy.core.data import Dataset
    from arq_deploy.export.pipeline import load
    from arq_deploy.search.reward import RewardConfig
    from arq_deploy.search.runner import SearchConfig, make_search

    lm = load("mobilenetv2", None)
    rng = np.random.default_rng(0)
    ds = Dataset("random", rng.integers(0, 256, (96, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 96),
                 tuple(str(i) for i in range(10)))
    s = make_search(lm, ds, tmp_path / "mnv2", SearchConfig(episodes=1, budget=0.05, method="random"),
                    RewardConfig(kind="accuracy", sigma=0.25, images=32, calib_images=32, backend="torch"),
                    progress=False)
    assert any(sp.kind == "dwconv" for sp in s.env.specs)
    assert s.env.features[:, 2].max() == 1  # the depthwise feature is set
    s.prepare()
    summary = s.run()
    assert summary["episodes"] == 1 and summary["best_bops_fraction"] <= 0.05

    (tmp_path / "usermod.py").write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import usermod

    torch.save(usermod.make().state_dict(), tmp_path / "user.pt")
    out = search(tmp_path / "user.pt", tmp_path / "user", model="usermod:make", input_shape=(1, 8, 8), sigma=0.25,
                 reward_kind="accuracy", method="random", episodes=2)
    assert out["episodes"] == 2 and set(out["best_policy"]) == {"0", "2", "6"}


def test_rerank_rescores_top_policies_on_fresh_images(digits_model, tmp_path):
    """--rerank-top: the top-k distinct policies are re-scored on training images outside the search's validation
    and calibration sets, the best re-scored one becomes policy.json, and its re-scored reward is what an
    independent evaluator on those images gives."""
    from arq_deploy.core.config import ConfigError
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.errors import PolicyError
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import load
    from arq_deploy.search.reward import RewardConfig, RewardEvaluator, split_indices

    _, ckpt = digits_model
    kw = {"method": "random"}
    s = search(ckpt, tmp_path / "r", episodes=5, rerank_top=3, rerank_images=40, **kw)
    rec = json.loads((tmp_path / "r" / "rerank.json").read_text())
    rows = _rows(tmp_path / "r")
    assert 1 <= len(rec["candidates"]) <= 3 and rec["images"] == 40
    assert len({json.dumps(c["policy"], sort_keys=True) for c in rec["candidates"]}) == len(rec["candidates"])
    top = sorted(r["reward"] for r in rows)[::-1]
    assert rec["candidates"][0]["search_reward"] == pytest.approx(top[0])
    ds = load_dataset("digits", "train")
    val, calib = split_indices(len(ds), 16, 64, 5)
    fresh = set(rec["indices"])
    assert len(fresh) == 40 and not fresh & set(val.tolist()) and not fresh & set(calib.tolist())
    best = max(rec["candidates"], key=lambda c: c["rerank_reward"])
    assert rec["chosen_episode"] == best["episode"] == s["selected_episode"]
    chosen = QuantPolicy.load(tmp_path / "r" / "policy.json")
    assert {n: [b.w_bits, b.a_bits] for n, b in chosen.layers.items()} == best["policy"]
    lm = load(None, str(ckpt))
    cfg = RewardConfig(kind="irs", sigma=lm.meta["sigma"], images=40, calib_images=64, n0=50, n=300, n_p=64, seed=5)
    ev = RewardEvaluator(lm, ds, cfg, indices=(np.array(sorted(fresh)), calib))
    ev.prepare(tmp_path / "indep")
    assert ev(chosen)[0] == pytest.approx(best["rerank_reward"])
    with pytest.raises(ConfigError, match="--rerank-top"):
        search(ckpt, tmp_path / "bad", episodes=1, rerank_top=-1, **kw)
    with pytest.raises(PolicyError, match="only"):
        search(ckpt, tmp_path / "big", episodes=1, rerank_top=1, rerank_images=10**6, **kw)
