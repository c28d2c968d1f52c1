"""Stage configs: frozen, validated, and the same after a JSON round trip (arq_deploy.core.config)."""

import dataclasses
import json

import pytest

from arq_deploy.core.config import (BenchConfig, CertifyConfig, CheckConfig, CompileConfig, ConfigError, ExportConfig,
                                    IrsConfig, ModelSource, RayConfig, SearchRunConfig)
from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.policy import QuantPolicy

EXAMPLES = [
    ExportConfig(model=ModelSource(name="resnet20", weights="w.pt", input_shape=(3, 32, 32)), out="m.onnx",
                 policy=QuantPolicy.for_layers(["conv1", "fc"], [(4, 8), (8, 8)]), sigma=0.25, seed=3),
    ExportConfig(model=ModelSource(weights="qat.pt"), out="m.onnx"),
    CompileConfig(onnx="m.onnx", out="art", target="rpi5", batch_size=16, integer=True, int_kernel="sdot"),
    CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.5, target="cuda", n=100000),
    CertifyConfig(out="c.tsv", model_path="art", irs=IrsConfig(float_log="f.tsv", float_model="f.onnx", n_p=500,
                                                               fallback_n=0, float_labels="none")),
    CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, ray=RayConfig(address="10.0.0.2:6379", workers=4)),
    CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, radii=(0.5, 0.25, 0.75), max_n=20000, first_n=250),
    CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.5, adaptive=True, tolerance=0.01),
    CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.5, randomized_cp=True),
    BenchConfig(model_path="art", out="b.json", target="x86", repeats=7),
    CheckConfig(check="attacks", model_path="m.onnx", out="checks", names=("fgsm", "pgd"), eps=(0.01, 0.03)),
    CheckConfig(check="corruptions", model_path="art", out="checks", severities=(1, 3)),
    SearchRunConfig(model=ModelSource(weights="f.pt"), out="run", sigma=0.25, greedy_grid=(2, 4, 8), rerank_top=5),
    SearchRunConfig(model=ModelSource(weights="f.pt"), out="run", reward_kind="adaptive", n_p=400, first_n=50,
                    tolerance=0.1),
    SearchRunConfig(model=ModelSource(weights="f.pt"), out="run", reward_kind="adaptive", stop="float"),
]


@pytest.mark.parametrize("cfg", EXAMPLES, ids=lambda c: type(c).__name__)
def test_json_round_trip_gives_the_same_config(cfg, tmp_path):
    again = type(cfg).from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())
    path = cfg.save(tmp_path / "c.config.json")
    assert type(cfg).load(path) == cfg
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically


def test_configs_are_frozen():
    cfg = EXAMPLES[2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 1
    assert cfg.replace(batch_size=1).batch_size == 1 and cfg.batch_size == 16


def test_certify_fills_the_defaults_it_ran_with():
    cfg = CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25)
    assert (cfg.n0, cfg.n, cfg.alpha, cfg.seed) == (100, 10000, 0.001, 0)
    irs = CertifyConfig(out="c.tsv", model_path="m.onnx", irs=IrsConfig(float_log="f.tsv", float_model="f.onnx"))
    assert irs.sigma is None and irs.n is None  # the float log supplies them
    assert irs.irs.labels_path.name == "f.tsv.labels"


@pytest.mark.parametrize("make, fragment", [
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx"), "--sigma"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=-1), "sigma"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, alpha=1.5), "alpha"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, n=0), "n"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, skip=0), "--skip"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, backend="jax"), "--backend"),
    (lambda: CertifyConfig(out="c.tsv", model_path="art", sigma=0.25, remote="nohost"), "--remote"),
    (lambda: CertifyConfig(out="c.tsv", model_path="art", sigma=0.25, remote="h:1", ray=RayConfig("local")),
     "cannot be combined"),
    (lambda: CertifyConfig(out="c.tsv", sigma=0.25, ray=RayConfig("local")), "MODEL_PATH"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", irs=IrsConfig("f.tsv", "f.onnx"),
                           ray=RayConfig("local")), "cannot be combined"),
    (lambda: RayConfig(address="host-without-port"), "HOST:PORT"),
    (lambda: IrsConfig("f.tsv", "f.onnx", n_p=0), "n-p"),
    (lambda: CompileConfig(onnx="m.onnx", out="a", batch_size=0), "--batch-size"),
    (lambda: CompileConfig(onnx="m.onnx", out="a", int_kernel="avx9"), "--int-kernel"),
    (lambda: ExportConfig(model=ModelSource(), out="m.onnx", min_agreement=1.5), "--min-agreement"),
    (lambda: ModelSource(input_shape=(3, 32)), "--input-shape"),
    (lambda: BenchConfig(model_path="a", out="b.json", repeats=0), "--repeats"),
    (lambda: CheckConfig(check="vibes", model_path="a", out="o"), "check"),
    (lambda: CheckConfig(check="corruptions", model_path="a", out="o", severities=(0, 6)), "--severities"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", budget=0), "--budget"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", min_bits=6, max_bits=4), "--min-bits"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", rerank_top=-1), "--rerank-top"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", reward_kind="adaptive", n_p=20, first_n=25), "--first-n"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", reward_kind="adaptive", tolerance=-0.1), "--tolerance"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", reward_kind="adaptive", stop="never"), "--stop"),
    (lambda: SearchRunConfig(model=ModelSource(), out="r", reward_kind="adaptive", ray_address="auto"), "--ray"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, radii=(0.25,), adaptive=True), "--adaptive"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, radii=(0.25, -1.0)), "--radii"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, radii=(0.25,), max_n=100), "--max-n"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, adaptive=True, tolerance=0.0), "--tolerance"),
    (lambda: CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, max_n=1000), "--max-n"),
])
def test_bad_settings_fail_with_one_line_naming_the_option(make, fragment):
    with pytest.raises((ConfigError, CertificationInputError)) as e:
        make()
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_reading_refuses_another_stage_unknown_keys_and_bad_json():
    text = EXAMPLES[2].to_json()
    with pytest.raises(ConfigError, match="'compile' config, not a 'certify'"):
        CertifyConfig.from_json(text)
    doc = json.loads(text)
    doc["config"]["turbo"] = True
    with pytest.raises(ConfigError, match="turbo"):
        CompileConfig.from_json(json.dumps(doc))
    with pytest.raises(ConfigError, match="not valid JSON"):
        CompileConfig.from_json("{")
    doc = json.loads(text)
    doc["config"]["batch_size"] = 0  # a tampered file is validated like a new config
    with pytest.raises(ConfigError, match="--batch-size"):
        CompileConfig.from_json(json.dumps(doc))


def test_preprocess_round_trips_in_every_stage_config_that_loads_data():
    from arq_deploy.app.predict import PredictConfig
    from arq_deploy.core.config import Preprocess

    pre = Preprocess(resize=256, crop=224)
    assert pre.crop == (224, 224) and pre.given and not Preprocess().given
    configs = [ExportConfig(model=ModelSource(weights="w.pt"), out="m.onnx", data="imgs", preprocess=pre),
               CertifyConfig(out="c.tsv", model_path="m.onnx", sigma=0.25, data="imgs.tar.gz", preprocess=pre),
               CheckConfig(check="systematic", model_path="m.onnx", out="o", preprocess=Preprocess(crop=(20, 30))),
               SearchRunConfig(model=ModelSource(weights="f.pt"), out="run", preprocess=Preprocess(resize=40)),
               PredictConfig(model_path="m.onnx", inputs=("a.png",), sigma=0.25, preprocess=pre)]
    for cfg in configs:
        doc = json.loads(cfg.to_json())["config"]["preprocess"]
        assert doc == {"resize": cfg.preprocess.resize, "crop": list(cfg.preprocess.crop or []) or None}
        again = type(cfg).from_json(cfg.to_json())
        assert again == cfg and isinstance(again.preprocess, Preprocess)
    old = json.loads(configs[0].to_json())
    del old["config"]["preprocess"]  # a config written before the option existed reads as "none given"
    assert ExportConfig.from_json(json.dumps(old)).preprocess == Preprocess()
    assert Preprocess().or_model((24, 32)) == Preprocess(resize=32, crop=(24, 32)) and pre.or_model((8, 8)) == pre


@pytest.mark.parametrize("kwargs, fragment", [
    ({"resize": 0}, "--resize must be an integer >= 1"),
    ({"resize": 2.5}, "--resize"),
    ({"crop": (0, 4)}, "--center-crop must be N or H,W"),
    ({"crop": (4, 4, 4)}, "--center-crop must be N or H,W"),
    ({"resize": 100, "crop": (64, 128)}, "--center-crop 64×128 is larger than --resize 100"),
])
def test_bad_preprocessing_fails_with_one_line(kwargs, fragment):
    from arq_deploy.core.config import Preprocess

    with pytest.raises(ConfigError) as e:
        Preprocess(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)
