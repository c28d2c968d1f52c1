"""The adaptive search reward (`search.reward`, kind "adaptive"): anytime-valid per-input radii from fewer f_q samples."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from arq_deploy.core.errors import PolicyError
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.runtime.runners import CountingRunner
from arq_deploy.search.reward import RewardConfig, RewardEvaluator, adaptive_input


class Bernoulli:
    """A base classifier on 1×2×2 inputs answering class 1 on x + σε exactly when ε's first coordinate is below
    Φ⁻¹(p): i.i.d. Bernoulli(p) hits of class 1 on the seeded noise stream; every evaluation counted."""

    input_shape, num_classes, name = (1, 2, 2), 3, "bernoulli"

    def __init__(self, p: float, sigma: float):
        self.cut, self.sigma, self.evaluations = norm.ppf(p), sigma, 0

    def __call__(self, xb):
        self.evaluations += len(xb)
        eps = np.asarray(xb)[:, 0, 0, 0] / self.sigma  # x = 0
        logits = np.zeros((len(xb), 3), np.float32)
        logits[np.arange(len(xb)), np.where(eps < self.cut, 1, 2)] = 1.0
        return logits


def test_adaptive_input_stops_at_once_when_hopeless_and_never_overstates_the_radius():
    cfg = RewardConfig(kind="adaptive", sigma=0.5, n_p=800, first_n=25, tolerance=0.05)
    x, ones = np.zeros((1, 2, 2), np.float32), np.ones(800, np.int16)
    wrong = Bernoulli(0.05, 0.5)
    got = adaptive_input(wrong, x, 1, ones, 0.99, cfg, seed=1)
    assert got["radius"] == 0.0 and got["samples"] == 25 == wrong.evaluations and got["early"]
    # p = 0.9: true radius σ·Φ⁻¹(0.9) = 0.64. f's labels all c with a (wrongly optimistic) float bound 0.999 would let
    # the IRS side certify p_q ≥ 0.999 − ζ̄; ζ_A = 0.1 here, so it is the ζ sequence that must keep it honest.
    true_r, over, samples = 0.5 * norm.ppf(0.9), 0, []
    for seed in range(150):
        r = Bernoulli(0.9, 0.5)
        got = adaptive_input(r, x, 1, ones, 0.999, cfg, seed=seed)
        assert got["samples"] == r.evaluations <= 800
        over += got["radius"] > true_r
        samples.append(got["samples"])
    assert over <= 2  # α + α_ζ = 0.002 per input: ~0.3 expected
    assert np.mean(samples) < 800  # the tolerance stops some inputs before the cap


def test_float_stop_stops_near_the_float_radius_and_stays_sound():
    """stop = "float": an input whose bound is already within the tolerance of f's radius stops there, where the cap
    rule goes on; the radius is still a lower bound (the rule only picks the look)."""
    x, ones = np.zeros((1, 2, 2), np.float32), np.ones(800, np.int16)
    base = {"kind": "adaptive", "sigma": 0.5, "n_p": 800, "first_n": 25, "tolerance": 0.1}
    cap, near = RewardConfig(**base), RewardConfig(**base, stop="float")
    # p_q = 0.995 (true radius 1.29) and f's bound 0.8 (radius 0.42): the direct bound passes f's radius early, while
    # the cap could still add more than 0.1 of radius
    a, b = adaptive_input(Bernoulli(0.995, 0.5), x, 1, ones, 0.8, cap, seed=4), \
        adaptive_input(Bernoulli(0.995, 0.5), x, 1, ones, 0.8, near, seed=4)
    f_radius = 0.5 * norm.ppf(0.8)
    assert b["samples"] < a["samples"] and b["early"]
    assert f_radius - 0.1 <= b["radius"] <= a["radius"]
    # an f_q far below f on the input never stops on rule (c): the same looks as the cap rule
    for seed in range(5):
        r1 = adaptive_input(Bernoulli(0.7, 0.5), x, 1, ones, 0.999, cap, seed=seed)
        r2 = adaptive_input(Bernoulli(0.7, 0.5), x, 1, ones, 0.999, near, seed=seed)
        assert r1 == r2
    true_r, over = 0.5 * norm.ppf(0.9), 0
    for seed in range(150):
        over += adaptive_input(Bernoulli(0.9, 0.5), x, 1, ones, 0.999, near, seed=seed)["radius"] > true_r
    assert over <= 2


@pytest.fixture(scope="module")
def rewards(digits, digits_model, tmp_path_factory):
    lm, _ = digits_model
    train_ds, _ = digits
    cache = tmp_path_factory.mktemp("adaptive-reward")
    base = {"sigma": 0.25, "images": 16, "calib_images": 64, "n0": 50, "n": 300, "n_p": 300, "seed": 2}
    evs = {kind: RewardEvaluator(lm, train_ds, RewardConfig(kind=kind, first_n=25, **base))
           for kind in ("full", "adaptive")}
    for ev in evs.values():
        ev.prepare(cache)
    return evs, cache


def test_adaptive_reward_is_a_radius_cheaper_than_full_at_the_same_cap(rewards):
    evs, _ = rewards
    ada, full = evs["adaptive"], evs["full"]
    got = {}
    for bits in (8, 2):
        runner = CountingRunner(ada.quantized_runner(QuantPolicy.uniform(bits)))
        r_a, info_a = ada.score(runner)
        assert info_a["samples"] == runner.evaluations  # what the reward records is what it ran
        before = runner.evaluations
        r_f, info_f = full.score(runner)
        assert info_f["samples"] == runner.evaluations - before
        assert info_a["samples"] < info_f["samples"]
        assert info_a["samples"] <= info_a["inputs_sampled"] * 300  # the cap n_p per input
        assert info_a["acr"] == r_a and 0 <= info_a["cert_acc_0.5"] <= info_a["cert_acc_0"] <= 1
        got[bits] = (r_a, r_f, info_a)
    assert got[8][0] > got[2][0] >= 0 and got[8][1] > got[2][1]  # ranks W8A8 above W2A2 as full does
    assert got[8][0] > 0.5 * got[8][1]  # a radius of the same order as full certification's, not a proxy
    assert got[2][2]["samples_per_input"] < got[8][2]["samples_per_input"]  # a broken model stops early


def test_adaptive_reward_is_deterministic_for_a_seed(rewards, digits, digits_model):
    evs, cache = rewards
    lm, _ = digits_model
    policy = QuantPolicy.for_layers(evs["adaptive"].names, [(4, 6)] * len(evs["adaptive"].names))
    again = RewardEvaluator(lm, digits[0], evs["adaptive"].cfg)
    again.prepare(cache)
    a, b = evs["adaptive"](policy), again(policy)
    assert a[0] == b[0] and a[1]["samples"] == b[1]["samples"]
    other = RewardEvaluator(lm, digits[0], RewardConfig(**(evs["adaptive"].cfg.to_dict() | {"seed": 3})))
    other.prepare(cache / "seed3")
    assert other(policy)[1]["samples"] != a[1]["samples"] or other(policy)[0] != a[0]


def test_reward_config_fields():
    assert "first_n" not in RewardConfig(kind="irs").to_dict()  # an IRS search's manifest is unchanged
    cfg = RewardConfig(kind="adaptive", n_p=400, first_n=50, tolerance=0.1)
    assert RewardConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "stop" not in cfg.to_dict()  # the default rule: an adaptive run's manifest from before "float" still matches
    near = RewardConfig(kind="adaptive", n_p=400, stop="float")
    assert near.to_dict()["stop"] == "float" and RewardConfig.from_dict(near.to_dict()) == near
    for bad in ({"first_n": 500}, {"first_n": 0}, {"tolerance": 0.0}, {"tolerance": float("nan")}, {"stop": "never"}):
        with pytest.raises(PolicyError):
            RewardConfig(**({"kind": "adaptive", "n_p": 400} | bad))


def test_search_cli_runs_with_the_adaptive_reward(cli, digits_model, tmp_path):
    _, ckpt = digits_model
    out = tmp_path / "run"
    rc, stdout, err = cli("search", "--weights", ckpt, "--data", "digits", "--budget", "0.02", "--warmup", "1",
                          "--val-images", "12", "--n", "100", "--n-p", "100", "--calib-images", "32", "--n0", "50",
                          "--reward", "adaptive", "--first-n", "20", "--tolerance", "0.1", "--stop", "float", "--episodes", "2",
                          "--method", "random", "--out", out)
    assert rc == 0, err
    assert "best reward" in stdout
    rows = [json.loads(line) for line in Path(out, "search.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        info = r["reward_info"]
        assert info["acr"] == pytest.approx(r["reward"]) and 0 < info["samples"] <= 12 * 100
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["reward"]["kind"] == "adaptive" and manifest["reward"]["first_n"] == 20
    assert manifest["reward"]["stop"] == "float"
    from arq_deploy.core.config import SearchRunConfig

    cfg = SearchRunConfig.load(out / "search.config.json")
    assert (cfg.reward_kind, cfg.first_n, cfg.tolerance, cfg.stop) == ("adaptive", 20, 0.1, "float")
    rc, _, err = cli("search", "--weights", ckpt, "--data", "digits", "--reward", "adaptive", "--n-p", "10",
                     "--episodes", "1", "--out", tmp_path / "bad")
    assert rc == 2 and "--first-n" in err and "Traceback" not in err
