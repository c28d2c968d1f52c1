"""Stage configs: one frozen, validated dataclass per stage, built once (by the CLI or by a caller) and written beside
the stage's output as JSON, so that a run says exactly what it was asked to do.

    cfg = CertifyConfig(model_path="m.onnx", data="digits", sigma=0.25, out="runs/m/certify-x86.tsv")
    cfg.save(cfg.config_path)              # runs/m/certify-x86.config.json
    CertifyConfig.load(cfg.config_path) == cfg

Validation happens in `__post_init__` and raises `ConfigError` (or the stage's own typed error, such as
`CertificationInputError` for σ, N0, N, α), with one line naming the option. Only what can be checked without loading a
model or touching the disk is checked here; the stages check the rest before they write anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from arq_deploy.core.errors import ArqError
from arq_deploy.core.fileio import write_json
from arq_deploy.core.policy import QuantPolicy
from arq_deploy.core.validation import check_alpha, check_count, check_seed, check_sigma

CONFIG_FORMAT = "arq-deploy/config"
CONFIG_VERSION = 1
BACKENDS = ("auto", "onnxruntime", "tvm", "qemu", "torch")
INT_KERNELS = ("auto", "vpdpbusd", "vpmaddwd", "vpmaddubsw", "sdot", "smlal", "smlal_narrow", "none")  # targets.int_kernels.KERNELS
CHECKS = ("corruptions", "systematic", "attacks")


class ConfigError(ArqError):
    """A stage config with an invalid or conflicting setting."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(name: str, value, minimum: int = 1) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
             f"{name} must be an integer >= {minimum}, got {value!r}")


def _optional_positive_int(name: str, value, minimum: int = 1) -> None:
    if value is not None:
        _positive_int(name, value, minimum)


def _fraction(name: str, value) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
             and 0.0 <= value <= 1.0, f"{name} must lie in [0, 1], got {value!r}")


def _choice(name: str, value, known) -> None:
    _require(value in known, f"{name} must be one of {', '.join(map(str, known))}, got {value!r}")


def _address(name: str, value: str | None) -> None:
    if value is None:
        return
    host, sep, port = str(value).rpartition(":")
    _require(bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
             f"{name} must be HOST:PORT with a port in 1..65535, got {value!r}")


@dataclass(frozen=True)
class StageConfig:
    """Base of the stage configs: JSON round trip and the file written beside the stage's output."""

    STAGE: ClassVar[str] = ""

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict:
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"a {cls.__name__} is a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        _require(not unknown, f"{cls.__name__} has no setting(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _decode(hints[k], v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps({"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "stage": self.STAGE,
                           "config": self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        _require(isinstance(doc, dict) and doc.get("format") == CONFIG_FORMAT,
                 f"not an arq-deploy config (expected format {CONFIG_FORMAT!r})")
        _require(doc.get("version") == CONFIG_VERSION,
                 f"config format version {doc.get('version')!r} is not supported (expected {CONFIG_VERSION})")
        _require(doc.get("stage") == cls.STAGE, f"this is a {doc.get('stage')!r} config, not a {cls.STAGE!r} one")
        return cls.from_dict(doc.get("config"))

    def save(self, path: str | Path) -> Path:
        write_json(path, json.loads(self.to_json()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return cls.from_json(p.read_text())

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def config_path(self) -> Path:
        """Where the stage writes this config: beside its output file OUT, as OUT with the suffix .config.json
        (stages whose output is a directory say otherwise)."""
        return Path(self.out).with_suffix(".config.json")


def _encode(v: Any) -> Any:
    if isinstance(v, QuantPolicy):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return v.to_dict() if isinstance(v, StageConfig) else dataclasses.asdict(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    return v


def _decode(hint, v: Any) -> Any:
    """A JSON value back into the field's type (nested configs, policies, tuples); plain values as they are."""
    if v is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint is QuantPolicy:
        return QuantPolicy.from_dict(v)
    if isinstance(hint, type) and issubclass(hint, StageConfig):
        return hint.from_dict(v)
    if typing.get_origin(hint) is tuple and isinstance(v, list):
        inner = typing.get_args(hint)
        return tuple(_decode(inner[0], x) for x in v) if inner and inner[-1] is Ellipsis else tuple(v)
    return v


# ---------------------------------------------------------------------------------------------------- shared parts
@dataclass(frozen=True)
class ModelSource(StageConfig):
    """A torch model: a zoo name or `package.module:factory`, a checkpoint, and the input shape of a user model."""

    STAGE: ClassVar[str] = "model"
    name: str | None = None
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.input_shape is not None:
            _require(len(self.input_shape) == 3 and all(isinstance(v, int) and v > 0 for v in self.input_shape),
                     f"--input-shape must be C,H,W with positive integers, got {self.input_shape!r}")


@dataclass(frozen=True)
class Preprocess(StageConfig):
    """How images are brought to one size, torchvision's standard evaluation transform: `resize` N scales each image
    so that its shorter side is N (bilinear, as `transforms.Resize(N)`), then `crop` (H, W) keeps the center H×W (as
    `transforms.CenterCrop`). Either may be None (not done); the crop must fit inside the resized shorter side.

    Neither given: image files (folders, archives, `predict`'s inputs) are fitted to the model's input size H×W,
    `Preprocess.for_model(H, W)`: shorter side to max(H, W), then the center H×W (images already H×W are unchanged).
    `arq_deploy.core.data.preprocess_image` applies it."""

    STAGE: ClassVar[str] = "preprocess"
    resize: int | None = None
    crop: tuple[int, int] | None = None  # (H, W); an int N is (N, N)

    def __post_init__(self):
        _optional_positive_int("--resize", self.resize)
        if self.crop is None:
            return
        crop = (self.crop, self.crop) if isinstance(self.crop, int) and not isinstance(self.crop, bool) else self.crop
        _require(isinstance(crop, (tuple, list)) and len(crop) == 2
                 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in crop),
                 f"--center-crop must be N or H,W with positive integers, got {self.crop!r}")
        object.__setattr__(self, "crop", tuple(crop))
        if self.resize is not None:
            _require(max(crop) <= self.resize,
                     f"--center-crop {crop[0]}×{crop[1]} is larger than --resize {self.resize} (the shorter side "
                     f"after resizing): give a crop of at most {self.resize}, or a larger --resize")

    @property
    def given(self) -> bool:
        """Whether anything is done to the images."""
        return self.resize is not None or self.crop is not None

    @classmethod
    def for_model(cls, height: int, width: int) -> Preprocess:
        """The default for a model that takes H×W: shorter side to max(H, W), then the center H×W."""
        return cls(resize=max(height, width), crop=(height, width))

    def or_model(self, size: tuple[int, int] | None) -> Preprocess:
        """This preprocessing when given, else the default for a model of input size (H, W) when that is known."""
        return self if self.given or size is None else self.for_model(*size)

    def describe(self) -> str:
        """'resize 256, center-crop 224×224' (or 'none'): what the images went through."""
        parts = ([f"resize {self.resize}"] if self.resize else []) + \
            ([f"center-crop {self.crop[0]}×{self.crop[1]}"] if self.crop else [])
        return ", ".join(parts) or "none"


# ---------------------------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """Quantize a torch model (policy + calibration on x + σ·ε), write a QDQ ONNX model, validate it against torch."""

    STAGE: ClassVar[str] = "export"
    model: ModelSource
    out: str
    policy: QuantPolicy | None = None  # None: the checkpoint's own (a QAT checkpoint)
    data: str = "digits"
    preprocess: Preprocess = field(default_factory=Preprocess)  # --resize / --center-crop of image data
    sigma: float | None = None  # None: the checkpoint's training σ, else 0
    calib_images: int = 512
    validate_images: int = 1000
    min_agreement: float = 0.99
    int4_weights: bool = False
    quantizer: str | None = None
    skip_unsupported: bool = False  # leave layers the quantizer cannot take in float instead of refusing the model
    seed: int = 0

    def __post_init__(self):
        _positive_int("--calib-images", self.calib_images)
        _positive_int("--validate-images", self.validate_images)
        _fraction("--min-agreement", self.min_agreement)
        if self.sigma is not None:
            _require(math.isfinite(self.sigma) and self.sigma >= 0, f"--sigma must be >= 0, got {self.sigma}")
        check_seed(self.seed)


# ---------------------------------------------------------------------------------------------------- compile
@dataclass(frozen=True)
class CompileConfig(StageConfig):
    """Compile an ONNX model with TVM for a target into an artifact directory."""

    STAGE: ClassVar[str] = "compile"
    onnx: str
    out: str
    target: str = "x86"
    batch_size: int = 100
    tune_trials: int = 0
    tuning_db: str | None = None
    integer: bool = False
    int_kernel: str = "auto"

    def __post_init__(self):
        _positive_int("--batch-size", self.batch_size)
        _positive_int("--tune-trials", self.tune_trials, 0)
        _choice("--int-kernel", self.int_kernel, INT_KERNELS)

    @property
    def config_path(self) -> Path:
        """Beside the artifact directory (the directory itself holds only hashed files)."""
        out = Path(self.out)
        return out.with_name(out.name + ".config.json")


# ---------------------------------------------------------------------------------------------------- certify
@dataclass(frozen=True)
class IrsConfig(StageConfig):
    """Incremental randomized smoothing from a float model's certification log (Ugare et al. 2024)."""

    STAGE: ClassVar[str] = "irs"
    float_log: str
    float_model: str
    n_p: int = 1000
    alpha_zeta: float = 0.001
    fallback_n: int | None = None  # None: the float log's N; 0: abstain where the bound fails
    float_labels: str | None = None  # None: FLOAT_LOG.labels; "none": keep nothing

    def __post_init__(self):
        check_count("--n-p", self.n_p)
        check_alpha(self.alpha_zeta)
        _optional_positive_int("--fallback-n", self.fallback_n, 0)

    @property
    def labels_path(self) -> Path | None:
        if (self.float_labels or "").lower() == "none":
            return None
        return Path(self.float_labels or f"{self.float_log}.labels")


@dataclass(frozen=True)
class RayConfig(StageConfig):
    """Shard the inputs over a Ray cluster ("auto", "local" or HOST:PORT)."""

    STAGE: ClassVar[str] = "ray"
    address: str
    workers: int | None = None
    cpus_per_worker: int = 1

    def __post_init__(self):
        _require(bool(self.address), "--ray needs an address: auto, local or HOST:PORT")
        if self.address not in ("auto", "local"):
            _address("--ray", self.address)
        _optional_positive_int("--ray-workers", self.workers)
        _positive_int("--ray-cpus-per-worker", self.cpus_per_worker)


@dataclass(frozen=True)
class CertifyConfig(StageConfig):
    """Randomized-smoothing CERTIFY of a deployed model on test images, on a target, optionally with IRS or Ray.

    sigma/n0/n/alpha/seed are None only with `irs`, whose float log supplies them."""

    STAGE: ClassVar[str] = "certify"
    out: str
    model_path: str | None = None  # an .onnx file or an artifact directory; None: the torch model of `model`
    model: ModelSource = field(default_factory=ModelSource)
    data: str = "digits"
    preprocess: Preprocess = field(default_factory=Preprocess)  # --resize / --center-crop of image data
    target: str | None = None
    backend: str = "auto"
    remote: str | None = None
    sigma: float | None = None
    n0: int | None = None
    n: int | None = None
    alpha: float | None = None
    seed: int | None = None
    skip: int = 1
    max_images: int | None = None
    batch_size: int = 500
    irs: IrsConfig | None = None
    ray: RayConfig | None = None
    # anytime-valid sequential certification (certify/sequential.py): decide at `radii`, or estimate the radius with
    # `adaptive`, drawing looks of first_n, 2·first_n, … samples up to the cap max_n; n is not used then
    radii: tuple[float, ...] | None = None
    adaptive: bool = False
    max_n: int | None = None
    first_n: int | None = None
    tolerance: float | None = None  # adaptive: stop when the radius is within this of what max_n could give
    randomized_cp: bool = False  # fixed-N CERTIFY with the randomized Clopper-Pearson bound

    DEFAULTS: ClassVar[dict] = {"n0": 100, "n": 10000, "alpha": 0.001, "seed": 0}
    SEQUENTIAL_DEFAULTS: ClassVar[dict] = {"max_n": 100000, "first_n": 500}
    # --adaptive's default tolerance: replayed on the fixed-N rates of 100 CIFAR-10 inputs per σ, 0.015 keeps the
    # expected ACR within about 0.008 of fixed N = 100,000 at σ = 0.25 and 0.5 with more than 3x fewer evaluations
    # (0.02: 0.011 at σ = 0.25); benchmarks/sequential_schedule_sim.py --adaptive
    DEFAULT_TOLERANCE: ClassVar[float] = 0.015

    @property
    def mode(self) -> str:
        """fixed, randomized-cp, sequential, adaptive or irs: what the log's meta records (a log is resumed only in
        its own mode)."""
        if self.irs is not None:
            return "irs"
        if self.radii is not None:
            return "sequential"
        if self.adaptive:
            return "adaptive"
        return "randomized-cp" if self.randomized_cp else "fixed"

    def __post_init__(self):
        _choice("--backend", self.backend, BACKENDS)
        _address("--remote", self.remote)
        _positive_int("--skip", self.skip)
        _optional_positive_int("--max", self.max_images)
        _positive_int("--batch-size", self.batch_size)
        self._check_sequential()
        if self.irs is None:
            if self.sigma is None:
                raise ConfigError("give --sigma (the noise level the model was trained for)")
            for k, v in self.DEFAULTS.items():  # the defaults are filled in, so the written config is complete
                if getattr(self, k) is None and not (k == "n" and self.mode in ("sequential", "adaptive")):
                    object.__setattr__(self, k, v)
        # with IRS the float log supplies σ, N0, N, α and the seed: any given here must match it (checked there)
        if self.sigma is not None:
            check_sigma(self.sigma)
        for k in ("n0", "n"):
            if getattr(self, k) is not None:
                check_count(k, getattr(self, k))
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.seed is not None:
            check_seed(self.seed)
        _require(not (self.remote and self.ray), "--remote and --ray cannot be combined")
        _require(not (self.irs and self.ray), "--ray and --incremental-from cannot be combined yet")
        _require(not (self.ray and self.model_path is None),
                 "--ray certifies an ONNX model or a TVM artifact: give MODEL_PATH (export the model first)")
        _require(not (self.ray and self.backend in ("torch", "qemu")),
                 f"--ray runs an ONNX model or a TVM artifact on the workers, not the {self.backend} backend")
        _require(self.model_path is not None or self.backend in ("auto", "torch"),
                 f"backend {self.backend!r} runs a model file: give MODEL_PATH")

    def _check_sequential(self) -> None:
        """--radii / --adaptive / --max-n / --first-n / --tolerance / --randomized-cp: types, ranges and conflicts
        (whether the cap can certify the largest radius needs the statistics: certify_stage checks it first)."""
        _require(isinstance(self.adaptive, bool), f"adaptive must be true or false, got {self.adaptive!r}")
        _require(isinstance(self.randomized_cp, bool), f"randomized_cp must be true or false, got {self.randomized_cp!r}")
        if self.radii is not None:
            _require(isinstance(self.radii, tuple) and len(self.radii) > 0, "--radii needs at least one radius")
            for r in self.radii:
                _require(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0,
                         f"--radii: every radius must be a number > 0, got {r!r}")
            _require(len(set(self.radii)) == len(self.radii), f"--radii lists a radius twice: {self.radii}")
            object.__setattr__(self, "radii", tuple(sorted(float(r) for r in self.radii)))
        _require(not (self.radii is not None and self.adaptive),
                 "--radii (decide robustness at given radii) and --adaptive (estimate each input's radius) are two "
                 "modes: give one")
        sequential = self.radii is not None or self.adaptive
        if not sequential:
            for name, value in (("--max-n", self.max_n), ("--first-n", self.first_n), ("--tolerance", self.tolerance)):
                _require(value is None, f"{name} belongs to sequential certification: give --radii or --adaptive "
                                        "(fixed-N CERTIFY takes --n)")
            _require(not (self.randomized_cp and self.irs is not None),
                     "--randomized-cp and --incremental-from cannot be combined")
            _require(not (self.randomized_cp and self.ray is not None), "--randomized-cp and --ray cannot be combined yet")
            return
        flag = "--radii" if self.radii is not None else "--adaptive"
        _require(self.n is None, f"{flag} draws as many samples as each input needs, up to --max-n: leave out --n")
        _require(not self.randomized_cp, f"--randomized-cp is a bound for fixed-N CERTIFY, not for {flag}")
        _require(self.irs is None, f"{flag} and --incremental-from cannot be combined")
        _require(self.ray is None, f"{flag} and --ray cannot be combined yet")
        _require(self.adaptive or self.tolerance is None, "--tolerance belongs to --adaptive")
        for k, v in self.SEQUENTIAL_DEFAULTS.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if self.adaptive and self.tolerance is None:
            object.__setattr__(self, "tolerance", self.DEFAULT_TOLERANCE)
        _positive_int("--max-n", self.max_n)
        _positive_int("--first-n", self.first_n)
        _require(self.max_n >= self.first_n, f"--max-n {self.max_n} is below the first batch (--first-n "
                                             f"{self.first_n}): the cap must allow at least one look")
        if self.tolerance is not None:
            _require(isinstance(self.tolerance, (int, float)) and not isinstance(self.tolerance, bool)
                     and math.isfinite(self.tolerance) and self.tolerance > 0,
                     f"--tolerance must be a radius > 0, got {self.tolerance!r}")


# ---------------------------------------------------------------------------------------------------- bench
@dataclass(frozen=True)
class BenchConfig(StageConfig):
    """Latency, throughput, memory and energy of a model on a target."""

    STAGE: ClassVar[str] = "bench"
    model_path: str
    out: str
    target: str | None = None
    backend: str = "auto"
    remote: str | None = None
    batch: int = 256
    repeats: int = 50
    warmup: int = 5
    probe: str | None = None

    def __post_init__(self):
        _choice("--backend", self.backend, tuple(b for b in BACKENDS if b != "torch"))
        _address("--remote", self.remote)
        _positive_int("--batch", self.batch)
        _positive_int("--repeats", self.repeats)
        _positive_int("--warmup", self.warmup, 0)


# ---------------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class CheckConfig(StageConfig):
    """A robustness check (corruptions, systematic noise or attacks) of a deployed model on a target.

    names: the corruptions / variations / attacks to run (None: the check's default set)."""

    STAGE: ClassVar[str] = "check"
    check: str
    model_path: str
    out: str
    target: str | None = None
    backend: str = "auto"
    remote: str | None = None
    data: str = "digits"
    preprocess: Preprocess = field(default_factory=Preprocess)  # --resize / --center-crop of image data
    max_images: int | None = None
    seed: int = 0
    batch_size: int = 256
    names: tuple[str, ...] | None = None
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    eps: tuple[float, ...] = (2 / 255, 8 / 255)
    steps: int = 20
    square_queries: int = 1000
    masking_images: int = 100
    reference: str | None = None
    compare_torch: bool = False
    torch_model: str | None = None
    torch_arch: str | None = None

    def __post_init__(self):
        _choice("check", self.check, CHECKS)
        _choice("--backend", self.backend, tuple(b for b in BACKENDS if b != "torch"))
        _address("--remote", self.remote)
        _optional_positive_int("--max", self.max_images)
        check_seed(self.seed)
        _positive_int("--batch-size", self.batch_size)
        _require(bool(self.severities) and all(isinstance(s, int) and 1 <= s <= 5 for s in self.severities),
                 f"--severities must lie in 1..5, got {self.severities!r}")
        _require(bool(self.eps) and all(isinstance(e, (int, float)) and 0 <= e <= 1 for e in self.eps),
                 f"--eps radii must lie in [0, 1], got {self.eps!r}")
        _positive_int("--steps", self.steps)
        _positive_int("--square-queries", self.square_queries)
        _positive_int("--masking-images", self.masking_images)

    @property
    def config_path(self) -> Path:
        return Path(self.out) / f"{self.check}.config.json"


# ---------------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class SearchRunConfig(StageConfig):
    """`arq-deploy search`: the RL (or baseline) mixed-precision search of a float model under a BOPs or latency
    budget, rewarded by the ACR of the smoothed quantized model."""

    STAGE: ClassVar[str] = "search"
    model: ModelSource
    out: str
    data: str = "digits"
    preprocess: Preprocess = field(default_factory=Preprocess)  # --resize / --center-crop of image data
    sigma: float | None = None  # None: the checkpoint's training σ
    budget: float = 0.015
    latency_budget_ms: float | None = None
    target: str | None = None
    latency_table: str | None = None
    episodes: int = 200
    method: str = "ddpg"
    reward_kind: str = "irs"
    val_images: int = 50
    calib_images: int = 256
    n0: int = 100
    n: int = 2000
    n_p: int = 200
    alpha: float = 0.001
    alpha_zeta: float = 0.001
    warmup: int = 20
    min_bits: int = 2
    max_bits: int = 8
    warm_start: str | None = None  # a policy.json tried first
    seed: int = 0
    cache_dir: str | None = None
    ray_address: str | None = None
    ray_workers: int | None = None
    rerank_top: int = 0
    rerank_images: int = 100
    greedy_grid: tuple[int, ...] | None = None
    first_n: int = 25  # --reward adaptive: the first look of f_q samples per image (looks double up to the cap --n-p)
    tolerance: float = 0.05  # --reward adaptive: stop an image when the cap could add at most this much radius
    stop: str = "cap"  # --reward adaptive: "float" also stops an image within --tolerance of the float model's radius

    METHODS: ClassVar[tuple[str, ...]] = ("ddpg", "random", "greedy")
    REWARDS: ClassVar[tuple[str, ...]] = ("irs", "full", "accuracy", "adaptive")  # search.reward.KINDS
    STOPS: ClassVar[tuple[str, ...]] = ("cap", "float")  # search.reward.STOPS

    def __post_init__(self):
        _require(isinstance(self.budget, (int, float)) and 0 < self.budget <= 1,
                 f"--budget is a fraction of the W32A32 BOPs in (0, 1], got {self.budget!r}")
        if self.latency_budget_ms is not None:
            _require(self.latency_budget_ms > 0, f"--latency-budget-ms must be > 0, got {self.latency_budget_ms}")
        if self.sigma is not None:
            check_sigma(self.sigma)
        _positive_int("--episodes", self.episodes)
        _choice("--method", self.method, self.METHODS)
        _choice("--reward", self.reward_kind, self.REWARDS)
        for name in ("val_images", "calib_images"):
            _positive_int("--" + name.replace("_", "-"), getattr(self, name))
        check_count("--n0", self.n0)
        check_count("--n", self.n)
        check_count("--n-p", self.n_p)
        check_alpha(self.alpha)
        check_alpha(self.alpha_zeta)
        _positive_int("--warmup", self.warmup, 0)
        _require(2 <= self.min_bits <= self.max_bits <= 8,
                 f"--min-bits/--max-bits must satisfy 2 <= min <= max <= 8, got {self.min_bits}/{self.max_bits}")
        check_seed(self.seed)
        _optional_positive_int("--ray-workers", self.ray_workers)
        _positive_int("--rerank-top", self.rerank_top, 0)
        _positive_int("--rerank-images", self.rerank_images)
        _positive_int("--first-n", self.first_n)
        _require(self.reward_kind != "adaptive" or self.first_n <= self.n_p, f"--first-n {self.first_n} is above the adaptive reward's cap --n-p "
                                           f"{self.n_p}: the cap must allow at least one look")
        _require(isinstance(self.tolerance, (int, float)) and not isinstance(self.tolerance, bool)
                 and math.isfinite(self.tolerance) and self.tolerance > 0,
                 f"--tolerance must be a radius > 0, got {self.tolerance!r}")
        _choice("--stop", self.stop, self.STOPS)
        _require(not (self.ray_address and self.reward_kind == "adaptive"),
                 "--reward adaptive runs without --ray (its images stop at different looks; use irs or full with Ray)")

    @property
    def config_path(self) -> Path:
        return Path(self.out) / "search.config.json"
