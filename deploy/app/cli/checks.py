"""`arq-deploy check corruptions|systematic|attacks ARTIFACT`: robustness checks on the deployed model (an ONNX file
or a compiled artifact), run where --target / --remote say. The stages are in arq_deploy.app.checks."""

from __future__ import annotations

import click

from arq_deploy.app.cli.options import apply, backend_opt, crop_opt, parse_preprocess, remote_opt, resize_opt

COMMON = [
    click.argument("artifact", type=click.Path()),
    click.option("--target", default=None, help="where it runs: x86, cuda, ... (default: the artifact's own target)"),
    backend_opt(),
    remote_opt,
    click.option("--data", default="digits", show_default=True,
                 help="'digits', a CIFAR-10 python-batch folder, an image folder or a .tar/.tar.gz of one"),
    resize_opt,
    crop_opt,
    click.option("--max", "max_images", type=int, default=None, help="a seeded subset of this many test images"),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--batch-size", type=int, default=256, show_default=True),
    click.option("--out", required=True, type=click.Path(file_okay=False), help="directory for JSONL, JSON, PNGs"),
]
TORCH = [
    click.option("--torch-model", default=None, type=click.Path(dir_okay=False),
                 help="torch checkpoint of the deployed model [the one export wrote beside it: NAME.qmodel.pt]"),
    click.option("--model", "torch_arch", default=None, help="architecture of --torch-model when it does not say"),
]


def _config(check: str, artifact, target, backend, remote, data, resize, center_crop, max_images, seed, batch_size, out,
            **extra):
    from arq_deploy.core.config import CheckConfig

    return CheckConfig(check=check, model_path=artifact, out=out, target=target, backend=backend, remote=remote,
                       data=data, preprocess=parse_preprocess(resize, center_crop), max_images=max_images, seed=seed, batch_size=batch_size, **extra)


def _echo_summary(check_name: str, summary: dict, torch_cmp: dict | None) -> None:
    parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
             if not isinstance(v, (dict, list))]
    click.echo(f"{check_name}: " + ", ".join(parts))
    if torch_cmp:
        click.echo(f"deployed vs torch: max |accuracy difference| {torch_cmp['max_abs_accuracy_diff']:.4f} over "
                   f"{torch_cmp['rows']} rows")


@click.group()
def check():
    """Robustness checks on a deployed model: corruptions, systematic noise, attacks."""


@check.command()
@apply(COMMON)
@click.option("--corruptions", "names", default="all", show_default=True, help="comma-separated names, or all")
@click.option("--severities", default="1-5", show_default=True)
@click.option("--reference", default=None, type=click.Path(),
              help="float reference for mCE: its corruptions.json, or a model (ONNX / artifact) to run")
@click.option("--compare-torch", is_flag=True, help="also run the check on the paired torch model and report the gap")
@apply(TORCH)
def corruptions(names, severities, **opts):
    """ImageNet-C corruptions (15 + 4 extra, severities 1-5): accuracy per corruption, mCE, mNR, heat map."""
    from arq_deploy.app.checks import corruptions_stage, parse_list, parse_severities
    from arq_deploy.certify.checks.corruptions import CORRUPTIONS

    cfg = _config("corruptions", names=tuple(parse_list(names, CORRUPTIONS, "corruption")),
                  severities=tuple(parse_severities(severities)), **opts)
    result = corruptions_stage(cfg)
    _echo_summary("corruptions", result["summary"], result.get("torch"))


@check.command()
@apply(COMMON)
@click.option("--attacks", "names", default=None, help="comma-separated attacks [fgsm,pgd,pgd-l2,autoattack-apgd,"
                                                       "square]; also: autoattack (the full standard ensemble)")
@click.option("--eps", "eps_text", default="2/255,8/255", show_default=True, help="L∞ radii (L2 attacks scale them)")
@click.option("--steps", type=int, default=20, show_default=True, help="PGD iterations")
@click.option("--square-queries", type=int, default=1000, show_default=True)
@click.option("--masking-images", type=int, default=100, show_default=True,
              help="images for the gradient-masking check")
@apply(TORCH)
def attacks(names, eps_text, **opts):
    """FGSM, PGD (L∞, L2), AutoAttack on the torch model, transferred to the deployed model; Square on the deployed
    model; gradient-masking check; WCAR."""
    from arq_deploy.app.checks import attacks_stage, parse_eps, parse_list
    from arq_deploy.certify.checks.attacks import ATTACKS

    picked = tuple(parse_list(names, list(ATTACKS), "attack")) if names else None
    result = attacks_stage(_config("attacks", names=picked, eps=tuple(parse_eps(eps_text)), **opts))
    s = result["summary"]
    click.echo(f"attacks: clean {s['clean']['runner_accuracy']:.4f} (deployed), "
               + ", ".join(f"WCAR@{k} {v['runner']:.4f}" for k, v in s["wcar"].items())
               + f"; gradient-masking check {'passed' if s['trusted'] else 'FAILED: numbers not trusted'}")
    if not s["trusted"]:
        for why in (s["masking"] or {}).get("reasons", []):
            click.echo(f"  masking: {why}")


@check.command()
@apply(COMMON)
@click.option("--variations", "names", default="all", show_default=True,
              help="comma-separated systematic variations (jpeg-DECODER-qQ, jpeg444-pil-qQ, resize-LIB-INTERP), "
                   "or all; the identity 'reference' always runs")
@click.option("--compare-torch", is_flag=True, help="also run the check on the paired torch model and report the gap")
@apply(TORCH)
def systematic(names, **opts):
    """Systematic noise (RobustMQ): JPEG decoders and qualities, resize libraries and interpolations: accuracy per
    variation, ACC_s, and whether the JPEG decoders differ on the same bytes."""
    from arq_deploy.app.checks import parse_list, systematic_stage
    from arq_deploy.certify.checks.systematic import VARIATIONS

    cfg = _config("systematic", names=tuple(parse_list(names, VARIATIONS, "systematic variation")), **opts)
    result = systematic_stage(cfg)
    _echo_summary("systematic", result["summary"], result.get("torch"))


COMMANDS = (check,)
