"""`arq-deploy predict`: the deployed smoothed classifier's answer for new images (see `predict_stage`)."""

from __future__ import annotations

import click

from arq_deploy.app.cli.options import backend_opt, parse_preprocess, preprocess_opts, remote_opt, target_opt


@click.command()
@click.argument("model_path", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@target_opt
@backend_opt()
@remote_opt
@preprocess_opts
@click.option("--sigma", type=float, default=None, help="noise std in pixel units, the model's training σ (required)")
@click.option("--n", "n", type=int, default=1000, show_default=True, help="noise samples per input")
@click.option("--alpha", type=float, default=0.001, show_default=True,
              help="bound on the probability of a wrong (non-abstained) answer")
@click.option("--seed", type=int, default=0, show_default=True, help="noise seed (input i uses input_seed(SEED, i))")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="write the JSON lines to this .jsonl file (and the config to OUT.config.json) instead of stdout")
def predict(model_path, inputs, target, backend, remote, resize, center_crop, sigma, n, alpha, seed, batch_size, out):
    """Classify new images with the smoothed model (PREDICT of Cohen et al., with abstention): one JSON line per input
    with the class, or "abstain": true where the top two classes cannot be told apart at level ALPHA.

    MODEL_PATH is an .onnx file or a compiled artifact directory. INPUTS are image files (PNG, JPEG, ...; any size
    and mode), folders of images (searched recursively, sorted) and .npy arrays (one C×H×W image or a batch
    N×C×H×W; floats in [0, 1] or uint8 0..255). Images are converted to the model's channels (grayscale or RGB) and
    preprocessed as the data of export and certify are: --resize N (shorter side to N, bilinear) then --center-crop
    H,W when given, else fitted to the model's H×W (shorter side to max(H, W), then the center H×W)."""
    import json

    from arq_deploy.app.predict import PredictConfig, predict_stage, summary_line

    cfg = PredictConfig(model_path=model_path, inputs=tuple(inputs), out=out, target=target, backend=backend,
                        remote=remote, sigma=sigma, n=n, alpha=alpha, seed=seed, batch_size=batch_size,
                        preprocess=parse_preprocess(resize, center_crop))
    emit = None if out else (lambda row: click.echo(json.dumps(row)))
    rows = predict_stage(cfg, emit=emit)
    if out:
        click.echo(f"{summary_line(rows)} -> {out}")


COMMANDS = (predict,)
