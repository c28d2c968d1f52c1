"""`arq-deploy check corruptions|systematic|attacks ARTIFACT`: robustness checks on the deployed model.

ARTIFACT is a QDQ ONNX file (run by onnxruntime) or a compiled TVM artifact directory (hashes verified on load). The
checks run on that deployed Runner; attacks also need the paired torch fake-quant model (white-box gradients), which
`export` writes beside the ONNX as NAME.qmodel.pt (and `compile` copies into the artifact): its metadata holds the
ONNX file's sha256, so a model that does not belong to the artifact is refused.

Every check writes into --out: CHECK.jsonl (append-only, resumable result log, see arq_deploy.resultlog), CHECK.json
(summary) and PNGs. Shared plumbing lives here; the algorithms are in arq_deploy.certify.{corruptions,systematic,
attacks,robust_metrics}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from arq_deploy.errors import ArqError, ArtifactIntegrityError

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


def open_deployed(path: str | Path, target: str | None = None, remote: str | None = None) -> Deployed:
    """A Runner for an ONNX file or a compiled artifact directory (hashes verified), on --target / --remote
    (arq_deploy.bench.open_runner), with the sha256 of the ONNX model it runs or was compiled from."""
    from arq_deploy.bench import open_runner
    from arq_deploy.fileio import sha256_file

    runner, t = open_runner(path, target, remote)
    p = Path(path)
    if p.is_dir():
        from arq_deploy.artifact import load_artifact

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
    from arq_deploy.pipeline import load

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


def load_check_data(data: str, deployed: Deployed, max_images: int | None, seed: int):
    """(dataset name, x N×C×H×W float32 in [0, 1], labels, indices): a seeded subset of the test split."""
    import numpy as np

    from arq_deploy.data import load_dataset
    from arq_deploy.pipeline import pick

    ds = load_dataset(data, "test")
    if tuple(ds.input_shape) != tuple(deployed.runner.input_shape):
        raise ArqError(f"data images are {ds.input_shape}, the model expects {tuple(deployed.runner.input_shape)}")
    if max_images is not None and max_images < 1:
        raise ArqError("--max must be >= 1")
    idx = pick(len(ds), max_images or len(ds), seed)
    x = ds.x(idx)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ArqError(f"data {ds.name}: images must be finite and inside [0, 1]")
    return ds.name, x, ds.labels[idx].astype(np.int64), idx


def parse_list(text: str | None, known, what: str) -> list[str]:
    """'a,b,c' or 'all' -> names, each checked against `known`."""
    from arq_deploy.errors import UnknownNameError

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
# CLI

def common_opts(f):
    opts = [
        click.argument("artifact", type=click.Path()),
        click.option("--target", default=None, help="the target the artifact was compiled for (checked)"),
        click.option("--remote", default=None, metavar="HOST:PORT", help="run a compiled artifact through TVM RPC"),
        click.option("--data", default="digits", show_default=True, help="digits, or a CIFAR-10 / image directory"),
        click.option("--max", "max_images", type=int, default=None, help="a seeded subset of this many test images"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=int, default=256, show_default=True),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="directory for JSONL, JSON, PNGs"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group()
def check():
    """Robustness checks on a deployed model: corruptions, systematic noise, attacks."""


def _begin(artifact, target, remote, data, max_images, seed, out):
    """Open the deployed model and the data; create --out. Returns (deployed, data name, x, labels, meta)."""
    deployed = open_deployed(artifact, target, remote)
    name, x, labels, idx = load_check_data(data, deployed, max_images, seed)
    Path(out).mkdir(parents=True, exist_ok=True)
    meta = {**deployed.describe(), "data": name, "images": int(len(x)), "seed": int(seed)}
    return deployed, x, labels, idx, meta


def _torch_runner(deployed: Deployed, torch_model, model_name, batch_size):
    from arq_deploy.runners import TorchRunner

    lm = load_paired_torch(deployed, torch_model, model_name)
    return lm, TorchRunner(lm.model, lm.input_shape, lm.num_classes, batch_size=batch_size)


def _compare_rows(rows, torch_rows, key_fields) -> dict:
    """Per-row |accuracy(deployed) - accuracy(torch)|: the deployed-vs-torch agreement of a check."""
    tr = {tuple(r[k] for k in key_fields): r["accuracy"] for r in torch_rows}
    diffs = [abs(r["accuracy"] - tr[tuple(r[k] for k in key_fields)]) for r in rows]
    return {"max_abs_accuracy_diff": max(diffs), "mean_abs_accuracy_diff": sum(diffs) / len(diffs),
            "rows": len(diffs)}


torch_opts = [
    click.option("--torch-model", default=None, type=click.Path(dir_okay=False),
                 help="torch checkpoint of the deployed model [the one export wrote beside it: NAME.qmodel.pt]"),
    click.option("--model", "model_name", default=None, help="architecture of --torch-model when it does not say"),
]


def _with(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@check.command()
@common_opts
@click.option("--corruptions", "names", default="all", show_default=True, help="comma-separated names, or all")
@click.option("--severities", default="1-5", show_default=True)
@click.option("--reference", default=None, type=click.Path(),
              help="float reference for mCE: its corruptions.json, or a model (ONNX / artifact) to run")
@click.option("--compare-torch", is_flag=True, help="also run the check on the paired torch model and report the gap")
@_with(torch_opts)
def corruptions(artifact, target, remote, data, max_images, seed, batch_size, out, names, severities, reference,
                compare_torch, torch_model, model_name):
    """ImageNet-C corruptions (15 + 4 extra, severities 1-5): accuracy per corruption, mCE, mNR, heat map."""
    from arq_deploy.certify import robust_metrics as rm
    from arq_deploy.certify.corruptions import CORRUPTIONS, run_corruptions

    names, sev = parse_list(names, CORRUPTIONS, "corruption"), parse_severities(severities)
    deployed, x, labels, idx, meta = _begin(artifact, target, remote, data, max_images, seed, out)
    out = Path(out)
    res = run_corruptions(deployed.runner, x, labels, names, sev, seed, out / "corruptions.jsonl", batch_size,
                          progress=True, ids=idx)
    clean = res["clean"]["accuracy"]
    summary = {"clean_accuracy": clean, "mean_corruption_accuracy": sum(r["accuracy"] for r in res["rows"])
               / len(res["rows"]), "mnr": rm.mnr(res["rows"], clean) if clean > 0 else None}
    worst = min(res["rows"], key=lambda r: r["accuracy"])
    summary["worst"] = f"{worst['corruption']} s{worst['severity']}: {worst['accuracy']:.3f}"
    if reference:
        ref = _reference_corruptions(reference, target, x, labels, names, sev, seed, out, batch_size, idx)
        summary.update(mce=rm.mce(res["rows"], ref["rows"]),
                       relative_mce=rm.relative_mce(res["rows"], ref["rows"], clean, ref["clean"]["accuracy"]),
                       reference_clean_accuracy=ref["clean"]["accuracy"], reference=str(reference))
    result = {"check": "corruptions", "meta": {**meta, "severities": sev}, "summary": summary, "clean": res["clean"],
              "rows": res["rows"]}
    if compare_torch:
        _, trun = _torch_runner(deployed, torch_model, model_name, batch_size)
        tres = run_corruptions(trun, x, labels, names, sev, seed, out / "corruptions-torch.jsonl", batch_size,
                               progress=True, ids=idx)
        result["torch"] = _compare_rows(res["rows"] + [res["clean"]], tres["rows"] + [tres["clean"]],
                                        ("corruption", "severity"))
    _write_result(out / "corruptions.json", result)
    rm.plot_heatmap(res["rows"], out / "corruptions.png", clean_acc=clean,
                    title=f"{Path(artifact).name}: accuracy under corruption")
    _echo_summary("corruptions", summary, result.get("torch"))


def _reference_corruptions(reference, target, x, labels, names, sev, seed, out, batch_size, idx) -> dict:
    """The reference model's corruption rows: read from a corruptions.json, or run (logged in --out)."""
    import json

    from arq_deploy.certify.corruptions import run_corruptions

    p = Path(reference)
    if p.suffix == ".json":
        try:
            ref = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ArqError(f"--reference {p}: not readable JSON ({e})") from None
        if ref.get("check") != "corruptions":
            raise ArqError(f"--reference {p} is not the corruptions.json of a check")
        return ref
    runner = open_deployed(p, target).runner
    return run_corruptions(runner, x, labels, names, sev, seed, Path(out) / "corruptions-reference.jsonl",
                           batch_size, progress=True, ids=idx)


def _write_result(path: Path, result: dict) -> None:
    from arq_deploy.fileio import write_json

    write_json(path, result)


def _echo_summary(check_name: str, summary: dict, torch_cmp: dict | None) -> None:
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
             if not isinstance(v, (dict, list))]
    click.echo(f"{check_name}: " + ", ".join(parts))
    if torch_cmp:
        click.echo(f"deployed vs torch: max |accuracy difference| {torch_cmp['max_abs_accuracy_diff']:.4f} over "
                   f"{torch_cmp['rows']} rows")


@check.command()
@common_opts
@click.option("--attacks", "names", default=None, help="comma-separated attacks [fgsm,pgd,pgd-l2,autoattack-apgd,"
                                                       "square]; also: autoattack (the full standard ensemble)")
@click.option("--eps", "eps_text", default="2/255,8/255", show_default=True, help="L∞ radii (L2 attacks scale them)")
@click.option("--steps", type=int, default=20, show_default=True, help="PGD iterations")
@click.option("--square-queries", type=int, default=1000, show_default=True)
@click.option("--masking-images", type=int, default=100, show_default=True,
              help="images for the gradient-masking check")
@_with(torch_opts)
def attacks(artifact, target, remote, data, max_images, seed, batch_size, out, names, eps_text, steps,
            square_queries, masking_images, torch_model, model_name):
    """FGSM, PGD (L∞, L2), AutoAttack on the torch model, transferred to the deployed model; Square on the deployed
    model; gradient-masking check; WCAR."""
    from arq_deploy.certify.attacks import ATTACKS, DEFAULT_ATTACKS, AttackConfig, check_attacks, plot_attacks

    attack_names = parse_list(names, list(ATTACKS), "attack") if names else list(DEFAULT_ATTACKS)
    eps_list = parse_eps(eps_text)
    cfg = AttackConfig(steps=steps, square_queries=square_queries)
    deployed, x, labels, idx, meta = _begin(artifact, target, remote, data, max_images, seed, out)
    lm = load_paired_torch(deployed, torch_model, model_name)
    out = Path(out)
    result = check_attacks(lm.model, deployed.runner, x, labels, attack_names, eps_list, seed, out / "attacks.jsonl",
                           min(batch_size, 100), progress=True, cfg=cfg, masking_images=masking_images,
                           extra_meta=meta)
    _write_result(out / "attacks.json", result)
    plot_attacks(result, out / "attacks.png")
    s = result["summary"]
    click.echo(f"attacks: clean {s['clean']['runner_accuracy']:.4f} (deployed), "
               + ", ".join(f"WCAR@{k} {v['runner']:.4f}" for k, v in s["wcar"].items())
               + f"; gradient-masking check {'passed' if s['trusted'] else 'FAILED: numbers not trusted'}")
    if not s["trusted"]:
        for why in (s["masking"] or {}).get("reasons", []):
            click.echo(f"  masking: {why}")


# ---- check systematic (certify/systematic.py; section owned by the corruptions/systematic helper) -------------------

@check.command()
@common_opts
@click.option("--variations", "names", default="all", show_default=True,
              help="comma-separated systematic variations (jpeg-DECODER-qQ, jpeg444-pil-qQ, resize-LIB-INTERP), "
                   "or all; the identity 'reference' always runs")
@click.option("--compare-torch", is_flag=True, help="also run the check on the paired torch model and report the gap")
@_with(torch_opts)
def systematic(artifact, target, remote, data, max_images, seed, batch_size, out, names, compare_torch, torch_model,
               model_name):
    """Systematic noise (RobustMQ): JPEG decoders and qualities, resize libraries and interpolations: accuracy per
    variation, ACC_s, and whether the JPEG decoders differ on the same bytes."""
    from arq_deploy.certify import robust_metrics as rm
    from arq_deploy.certify.systematic import VARIATIONS, compare_decoders, run_systematic

    names = parse_list(names, VARIATIONS, "systematic variation")
    deployed, x, labels, idx, meta = _begin(artifact, target, remote, data, max_images, seed, out)
    out = Path(out)
    res = run_systematic(deployed.runner, x, labels, names, out / "systematic.jsonl", batch_size, progress=True)
    summary = rm.acc_s(res["accuracies"])
    result = {"check": "systematic", "meta": meta, "summary": summary, "rows": res["rows"],
              "decoders": compare_decoders(x[:64])}
    if compare_torch:
        _, trun = _torch_runner(deployed, torch_model, model_name, batch_size)
        tres = run_systematic(trun, x, labels, names, out / "systematic-torch.jsonl", batch_size, progress=True)
        result["torch"] = _compare_rows(res["rows"], tres["rows"], ("variation",))
    _write_result(out / "systematic.json", result)
    rm.plot_systematic(res["rows"], out / "systematic.png", title=f"{Path(artifact).name}: systematic noise")
    _echo_summary("systematic", summary, result.get("torch"))
