"""The robustness checks' stages (`arq-deploy check corruptions|systematic|attacks ARTIFACT`) on the deployed model.

ARTIFACT is a QDQ ONNX file (run by onnxruntime) or a compiled TVM artifact directory (hashes verified on load). The
checks run on that deployed Runner; attacks also need the paired torch fake-quant model (white-box gradients), which
`export` writes beside the ONNX as NAME.qmodel.pt (and `compile` copies into the artifact): its metadata holds the
ONNX file's sha256, so a model that does not belong to the artifact is refused.

Every check writes into --out: CHECK.jsonl (append-only, resumable result log, see arq_deploy.core.resultlog), CHECK.json
(summary) and PNGs. Each stage takes a `CheckConfig`; the algorithms are in arq_deploy.certify.checks.{corruptions,
systematic,attacks,robust_metrics}, the commands in arq_deploy.app.cli.checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from arq_deploy.core.config import CheckConfig
from arq_deploy.core.errors import ArqError, ArtifactIntegrityError
from arq_deploy.core.fileio import write_json

QMODEL_SUFFIX = ".qmodel.pt"
ARTIFACT_QMODEL = "model.qmodel.pt"


@dataclass
class Deployed:
    """The model under test: its Runner, where it came from, and the files that identify it."""

    runner: object
    path: Path
    onnx_path: Path  # the ONNX file the runner executes (or was compiled from)
    onnx_sha256: str
    backend: str  # the runner's name
    target: str
    meta: dict  # the model's arq.* metadata (policy, bops, sigma, ...)

    def describe(self) -> dict:
        return {"artifact": str(self.path), "onnx_sha256": self.onnx_sha256, "backend": self.backend,
                "target": self.target, "policy": self.meta.get("policy_summary"), "bops": self.meta.get("bops")}


def open_deployed(path: str | Path, target: str | None = None, remote: str | None = None,
                  backend: str = "auto") -> Deployed:
    """A Runner for an ONNX file or a compiled artifact directory (hashes verified), on --target / --remote
    (arq_deploy.targets.backends.open_runner), with the sha256 of the ONNX model it runs or was compiled from."""
    from arq_deploy.core.fileio import sha256_file
    from arq_deploy.targets.backends import open_runner

    runner, t = open_runner(path, target, remote, backend)
    p = Path(path)
    if p.is_dir():
        from arq_deploy.core.artifact import load_artifact

        art = load_artifact(p)
        onnx_path, sha, meta = art.onnx_path, art.files[art.onnx_path.name], dict(art.arq)
    else:
        from arq_deploy.export.qdq import load_onnx, read_metadata

        onnx_path, sha, meta = p, sha256_file(p), read_metadata(load_onnx(p))
    return Deployed(runner, p, onnx_path, sha, runner.name, t.name, meta)


def paired_qmodel_path(deployed: Deployed) -> Path:
    """Where the paired torch fake-quant checkpoint of a deployed model is expected."""
    if deployed.path.is_dir():
        return deployed.path / ARTIFACT_QMODEL
    return deployed.path.with_suffix(QMODEL_SUFFIX)


def load_paired_torch(deployed: Deployed, torch_model: str | None = None, model_name: str | None = None):
    """The torch model for white-box attacks: --torch-model CKPT, else the checkpoint paired with the artifact.

    A paired checkpoint (written by export) records the sha256 of its ONNX file; it must equal the artifact's."""
    from arq_deploy.export.pipeline import load

    path = Path(torch_model) if torch_model else paired_qmodel_path(deployed)
    if not path.is_file():
        raise ArqError(f"no torch model for {deployed.path}: expected {path} (written by arq-deploy export); give "
                       "--torch-model CKPT (a checkpoint of the same model)")
    lm = load(model_name, str(path), input_shape=tuple(deployed.runner.input_shape))
    want = lm.meta.get("onnx_sha256")
    if want is not None and want != deployed.onnx_sha256:
        raise ArtifactIntegrityError(f"{path} belongs to another ONNX model (sha256 {want[:12]}… ≠ "
                                     f"{deployed.onnx_sha256[:12]}…): re-export, or give the matching --torch-model")
    return lm


def load_check_data(data: str, deployed: Deployed, max_images: int | None, seed: int, preprocess=None):
    """(dataset name, x N×C×H×W float32 in [0, 1], labels, indices): a seeded subset of the test split, its images
    put through `preprocess` (a `Preprocess`; image files given none are fitted to the model's size)."""
    import numpy as np

    from arq_deploy.core.data import SIZE_HINT, image_size, load_dataset
    from arq_deploy.export.pipeline import pick

    ds = load_dataset(data, "test", preprocess, model_size=image_size(deployed.runner.input_shape))
    if tuple(ds.input_shape) != tuple(deployed.runner.input_shape):
        raise ArqError(f"data images are {ds.input_shape}, the model expects {tuple(deployed.runner.input_shape)}"
                       f"{SIZE_HINT}")
    if max_images is not None and max_images < 1:
        raise ArqError("--max must be >= 1")
    idx = pick(len(ds), max_images or len(ds), seed)
    x = ds.x(idx)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ArqError(f"data {ds.name}: images must be finite and inside [0, 1]")
    return ds.name, x, ds.labels[idx].astype(np.int64), idx


def parse_list(text: str | None, known, what: str) -> list[str]:
    """'a,b,c' or 'all' -> names, each checked against `known`."""
    from arq_deploy.core.errors import UnknownNameError

    if text is None or text == "all":
        return list(known)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UnknownNameError(f"unknown {what} {', '.join(bad) or repr(text)}; known: {', '.join(known)}")
    return names


def parse_eps(text: str) -> list[float]:
    """'2/255,8/255' or '0.03' -> floats; each must be >= 0."""
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            num, _, den = tok.partition("/")
            val = float(num) / (float(den) if den else 1.0)
        except (ValueError, ZeroDivisionError):
            raise ArqError(f"--eps: cannot read {tok!r} (write e.g. 8/255 or 0.031)") from None
        if not val >= 0:
            raise ArqError(f"--eps must be >= 0, got {tok}")
        out.append(val)
    return out


def parse_severities(text: str) -> list[int]:
    """'1-5', '3' or '1,3,5' -> severities in 1..5."""
    vals: list[int] = []
    try:
        for tok in text.split(","):
            lo, _, hi = tok.strip().partition("-")
            vals.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ArqError(f"--severities: cannot read {text!r} (write e.g. 1-5 or 1,3,5)") from None
    if not vals or any(v < 1 or v > 5 for v in vals):
        raise ArqError(f"--severities must lie in 1..5, got {text!r}")
    return sorted(set(vals))


# --------------------------------------------------------------------------------------------------------------------
# The stages

def _begin(cfg: CheckConfig):
    """Open the deployed model and the data; create the output directory and write the config there.
    Returns (deployed, x, labels, indices, meta)."""
    deployed = open_deployed(cfg.model_path, cfg.target, cfg.remote, cfg.backend)
    name, x, labels, idx = load_check_data(cfg.data, deployed, cfg.max_images, cfg.seed, cfg.preprocess)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    cfg.save(cfg.config_path)
    meta = {**deployed.describe(), "data": name, "images": int(len(x)), "seed": int(cfg.seed)}
    return deployed, x, labels, idx, meta


def _torch_runner(deployed: Deployed, cfg: CheckConfig):
    from arq_deploy.runtime.runners import TorchRunner

    lm = load_paired_torch(deployed, cfg.torch_model, cfg.torch_arch)
    return lm, TorchRunner(lm.model, lm.input_shape, lm.num_classes, batch_size=cfg.batch_size)


def _compare_rows(rows, torch_rows, key_fields) -> dict:
    """Per-row |accuracy(deployed) - accuracy(torch)|: the deployed-vs-torch agreement of a check."""
    tr = {tuple(r[k] for k in key_fields): r["accuracy"] for r in torch_rows}
    diffs = [abs(r["accuracy"] - tr[tuple(r[k] for k in key_fields)]) for r in rows]
    return {"max_abs_accuracy_diff": max(diffs), "mean_abs_accuracy_diff": sum(diffs) / len(diffs),
            "rows": len(diffs)}


def corruptions_stage(cfg: CheckConfig) -> dict:
    """ImageNet-C corruptions: accuracy per corruption and severity, mCE against a reference, mNR, heat map."""
    from arq_deploy.certify.checks import robust_metrics as rm
    from arq_deploy.certify.checks.corruptions import CORRUPTIONS, run_corruptions

    names = list(cfg.names) if cfg.names else list(CORRUPTIONS)
    parse_list(",".join(names), CORRUPTIONS, "corruption")
    sev = sorted(set(cfg.severities))
    deployed, x, labels, idx, meta = _begin(cfg)
    out = Path(cfg.out)
    res = run_corruptions(deployed.runner, x, labels, names, sev, cfg.seed, out / "corruptions.jsonl",
                          cfg.batch_size, progress=True, ids=idx)
    clean = res["clean"]["accuracy"]
    summary = {"clean_accuracy": clean, "mean_corruption_accuracy": sum(r["accuracy"] for r in res["rows"])
               / len(res["rows"]), "mnr": rm.mnr(res["rows"], clean) if clean > 0 else None}
    worst = min(res["rows"], key=lambda r: r["accuracy"])
    summary["worst"] = f"{worst['corruption']} s{worst['severity']}: {worst['accuracy']:.3f}"
    if cfg.reference:
        ref = _reference_corruptions(cfg, x, labels, names, sev, idx)
        summary.update(mce=rm.mce(res["rows"], ref["rows"]),
                       relative_mce=rm.relative_mce(res["rows"], ref["rows"], clean, ref["clean"]["accuracy"]),
                       reference_clean_accuracy=ref["clean"]["accuracy"], reference=str(cfg.reference))
    result = {"check": "corruptions", "meta": {**meta, "severities": sev}, "summary": summary, "clean": res["clean"],
              "rows": res["rows"]}
    if cfg.compare_torch:
        _, trun = _torch_runner(deployed, cfg)
        tres = run_corruptions(trun, x, labels, names, sev, cfg.seed, out / "corruptions-torch.jsonl", cfg.batch_size,
                               progress=True, ids=idx)
        result["torch"] = _compare_rows(res["rows"] + [res["clean"]], tres["rows"] + [tres["clean"]],
                                        ("corruption", "severity"))
    write_json(out / "corruptions.json", result)
    rm.plot_heatmap(res["rows"], out / "corruptions.png", clean_acc=clean,
                    title=f"{Path(cfg.model_path).name}: accuracy under corruption")
    return result


def _reference_corruptions(cfg: CheckConfig, x, labels, names, sev, idx) -> dict:
    """The reference model's corruption rows: read from a corruptions.json, or run (logged in the output folder)."""
    from arq_deploy.certify.checks.corruptions import run_corruptions

    p = Path(cfg.reference)
    if p.suffix == ".json":
        try:
            ref = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ArqError(f"--reference {p}: not readable JSON ({e})") from None
        if ref.get("check") != "corruptions":
            raise ArqError(f"--reference {p} is not the corruptions.json of a check")
        return ref
    runner = open_deployed(p, cfg.target).runner
    return run_corruptions(runner, x, labels, names, sev, cfg.seed, Path(cfg.out) / "corruptions-reference.jsonl",
                           cfg.batch_size, progress=True, ids=idx)


def attacks_stage(cfg: CheckConfig) -> dict:
    """FGSM, PGD (L∞, L2), AutoAttack on the torch model, transferred to the deployed model; Square on the deployed
    model; gradient-masking check; WCAR."""
    from arq_deploy.certify.checks.attacks import ATTACKS, DEFAULT_ATTACKS, AttackConfig, check_attacks, plot_attacks

    names = parse_list(",".join(cfg.names), list(ATTACKS), "attack") if cfg.names else list(DEFAULT_ATTACKS)
    deployed, x, labels, idx, meta = _begin(cfg)
    lm = load_paired_torch(deployed, cfg.torch_model, cfg.torch_arch)
    out = Path(cfg.out)
    result = check_attacks(lm.model, deployed.runner, x, labels, names, list(cfg.eps), cfg.seed,
                           out / "attacks.jsonl", min(cfg.batch_size, 100), progress=True,
                           cfg=AttackConfig(steps=cfg.steps, square_queries=cfg.square_queries),
                           masking_images=cfg.masking_images, extra_meta=meta)
    write_json(out / "attacks.json", result)
    plot_attacks(result, out / "attacks.png")
    return result


def systematic_stage(cfg: CheckConfig) -> dict:
    """Systematic noise (RobustMQ): JPEG decoders and qualities, resize libraries and interpolations."""
    from arq_deploy.certify.checks import robust_metrics as rm
    from arq_deploy.certify.checks.systematic import VARIATIONS, compare_decoders, run_systematic

    names = parse_list(",".join(cfg.names), VARIATIONS, "systematic variation") if cfg.names else list(VARIATIONS)
    deployed, x, labels, idx, meta = _begin(cfg)
    out = Path(cfg.out)
    res = run_systematic(deployed.runner, x, labels, names, out / "systematic.jsonl", cfg.batch_size, progress=True)
    summary = rm.acc_s(res["accuracies"])
    result = {"check": "systematic", "meta": meta, "summary": summary, "rows": res["rows"],
              "decoders": compare_decoders(x[:64])}
    if cfg.compare_torch:
        _, trun = _torch_runner(deployed, cfg)
        tres = run_systematic(trun, x, labels, names, out / "systematic-torch.jsonl", cfg.batch_size, progress=True)
        result["torch"] = _compare_rows(res["rows"], tres["rows"], ("variation",))
    write_json(out / "systematic.json", result)
    rm.plot_systematic(res["rows"], out / "systematic.png",
                       title=f"{Path(cfg.model_path).name}: systematic noise")
    return result


STAGES = {"corruptions": corruptions_stage, "attacks": attacks_stage, "systematic": systematic_stage}
