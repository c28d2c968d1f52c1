"""Model commands: `layers` (quantizable layers and BOPs), `train` (noise / adversarial / distillation training, QAT),
`export` (quantize, write QDQ ONNX, validate against torch)."""

from __future__ import annotations

import click

from arq_deploy.app.cli.options import (
    bits_opt,
    data_opt,
    model_opts,
    model_source,
    parse_policy,
    parse_preprocess,
    parse_shape,
    policy_opt,
    preprocess_opts,
)
from arq_deploy.core.errors import ArqError


@click.command()
@model_opts
@bits_opt
@policy_opt
def layers(model_name, weights, input_shape, bits, policy):
    """List the quantizable layers (MACs, params) and the BOPs of a policy."""
    from rich.console import Console
    from rich.table import Table

    from arq_deploy.export.pipeline import load
    from arq_deploy.export.quantize.layers import extract_layer_specs

    lm = load(model_name, weights, input_shape=parse_shape(input_shape))
    specs = extract_layer_specs(lm.model, lm.input_shape)
    pol = parse_policy(bits, policy)
    if pol is not None:
        pol.validate(specs)
    t = Table(title=f"{lm.name}: {len(specs)} quantizable layers, {sum(s.macs for s in specs) / 1e6:.2f} M MACs")
    for col in ("#", "name", "kind", "in", "out", "kernel", "stride", "MACs", "params", "bits"):
        t.add_column(col)
    for s in specs:
        b = pol.bits(s.name) if pol else None
        t.add_row(str(s.index), s.name, s.kind, str(s.in_channels), str(s.out_channels), "×".join(map(str, s.kernel)),
                  str(s.stride[0]), f"{s.macs:,}", f"{s.params:,}", str(b) if b else "float")
    Console().print(t)
    if pol is not None:
        click.echo(f"BOPs {pol.bops(specs):,} = {100 * pol.bops_fraction(specs):.3f}% of W32A32")


@click.command()
@model_opts
@data_opt
@preprocess_opts
@click.option("--mode", default="gaussian", show_default=True,
              help="vanilla, gaussian (noise σ), pgd (L∞ PGD adversarial training) or distill (robust distillation "
              "from --teacher: the student on PGD examples matched to the teacher's clean soft labels)")
@click.option("--sigma", type=float, default=None, help="Gaussian noise std, pixel scale (--mode gaussian) [0.25]")
@click.option("--eps", default="8/255", show_default=True,
              help="L∞ PGD radius, pixel scale: 8/255 or 0.03 (pgd, distill)")
@click.option("--pgd-steps", type=int, default=7, show_default=True, help="PGD steps per training batch")
@click.option("--pgd-step-size", default=None, help="PGD step, pixel scale, e.g. 2/255 [2.5·eps/steps]")
@click.option("--teacher", default=None, type=click.Path(dir_okay=False), help="teacher checkpoint (--mode distill)")
@click.option("--teacher-model", default=None, help="teacher architecture [the teacher checkpoint's arch]")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="distillation temperature T")
@click.option("--clean-weight", type=float, default=0.0, show_default=True,
              help="distill: weight w of the clean cross-entropy (the T²·KL term gets 1 - w)")
@click.option("--init", default=None, help="random or weights [weights when --weights is given, else random]")
@click.option("--quantizer", default=None, help="QAT quantization method (with --bits/--policy)")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=None,
              help="peak learning rate [0.05; 0.001 for quantization-aware training: the BN-folded fake-quant model "
                   "collapses at 0.003 and above on ResNet-20]")
@click.option("--batch-size", type=int, default=128, show_default=True)
@bits_opt
@policy_opt
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint to write")
def train(model_name, weights, input_shape, data, resize, center_crop, mode, sigma, eps, pgd_steps, pgd_step_size,
          teacher, teacher_model, temperature, clean_weight, init, quantizer, epochs, lr, batch_size, bits, policy, seed,
          out):
    """Train or fine-tune in a --mode (vanilla, gaussian noise, PGD adversarial training, robust distillation),
    from random weights or a checkpoint; with --bits/--policy, quantization-aware (QAT) in the same mode."""
    import torch

    from arq_deploy.core.data import image_size, load_dataset
    from arq_deploy.core.fileio import sha256_file
    from arq_deploy.export.pipeline import load, save_checkpoint
    from arq_deploy.export.pipeline import train as run_train
    from arq_deploy.export.quantize.finetune import training_options
    from arq_deploy.export.quantize.layers import extract_layer_specs

    if epochs < 1:
        raise ArqError("--epochs must be >= 1")
    cfg, init = training_options(mode, sigma, eps, pgd_steps, pgd_step_size, temperature, clean_weight, quantizer,
                                 teacher, init, weights, quantized=bool(bits or policy))
    pol = parse_policy(bits, policy)
    torch.manual_seed(seed)  # a random init is seeded too
    lm = load(model_name or ("digits_cnn" if data == "digits" and not weights else None), weights,
              input_shape=parse_shape(input_shape))
    tlm = load(teacher_model, teacher, input_shape=lm.input_shape) if teacher else None
    ds = load_dataset(data, "train", parse_preprocess(resize, center_crop), model_size=image_size(lm.input_shape))
    if ds.num_classes != lm.num_classes:
        if weights:
            raise ArqError(f"the data {data} has {ds.num_classes} classes, the model {lm.name} from {weights} "
                           f"{lm.num_classes} outputs")
        torch.manual_seed(seed)  # a fresh model with one output per class of the data, seeded as before
        lm = load(lm.name, None, num_classes=ds.num_classes, input_shape=lm.input_shape)
    if lr is None:
        lr = 0.001 if pol is not None else 0.05
    if not lr > 0:
        raise ArqError("--lr must be > 0")
    model, history = run_train(lm, ds, cfg.sigma, epochs, lr=lr, batch_size=batch_size, seed=seed, policy=pol,
                               mode=cfg.mode, eps=cfg.eps, pgd_steps=cfg.pgd_steps, pgd_step_size=cfg.pgd_step_size,
                               teacher=tlm, temperature=cfg.temperature, clean_weight=cfg.clean_weight,
                               quantizer=cfg.quantizer)

    def source(path, m) -> dict | None:  # where a checkpoint came from, and its own training mode
        return None if path is None else {"from": "weights", "path": str(path), "sha256": sha256_file(path),
                                          "arch": m.name, "mode": m.meta.get("mode")}

    record = {**cfg.to_dict(), "teacher": source(teacher, tlm), "init": source(weights, lm) if init == "weights"
              else {"from": "random", "seed": seed}}
    record.update(quantizer=history[-1]["quantizer"])  # the method used (the default one under QAT), else None
    record.pop("sigma")
    resolved = pol.resolve(extract_layer_specs(lm.model, lm.input_shape)) if pol else None
    save_checkpoint(out, model, lm, cfg.sigma, epochs, policy=resolved,
                    history=history, training=record)
    h = history[-1]
    click.echo(f"wrote {out}: mode {cfg.mode}, epoch {h['epoch']} loss {h['loss']:.4f}, accuracy on the "
               f"{cfg.mode} training inputs {h['train_acc']:.4f}")


@click.command()
@model_opts
@bits_opt
@policy_opt
@data_opt
@preprocess_opts
@click.option("--sigma", type=float, default=None,
              help="calibrate on x + σ·ε (default: the checkpoint's training σ, else 0)")
@click.option("--calib-images", type=int, default=512, show_default=True)
@click.option("--validate-images", type=int, default=1000, show_default=True)
@click.option("--min-agreement", type=float, default=0.99, show_default=True)
@click.option("--int4-weights", is_flag=True, help="store ≤4-bit weights as native ONNX INT4 (onnxruntime only)")
@click.option("--quantizer", default=None,
              help="quantization method: percentile, minmax, pwlq (PTQ) or dorefa, pact, lsq (their QAT quantizers at "
              "calibration) [percentile, or a QAT checkpoint's own]")
@click.option("--skip-unsupported", is_flag=True,
              help="leave layers the quantizer cannot take in float (each named in a warning and in export.json) "
                   "instead of refusing the model")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.qdq.onnx to write")
def export(model_name, weights, input_shape, bits, policy, data, resize, center_crop, sigma, calib_images,
           validate_images, min_agreement, int4_weights, quantizer, skip_unsupported, seed, out):
    """Quantize (policy + calibration), export a QDQ ONNX model, and validate it against torch (export.json)."""
    from arq_deploy.app.stages import export_stage
    from arq_deploy.core.config import ExportConfig

    cfg = ExportConfig(model=model_source(model_name, weights, input_shape), out=out,
                       policy=parse_policy(bits, policy), data=data,
                       preprocess=parse_preprocess(resize, center_crop), sigma=sigma, calib_images=calib_images,
                       validate_images=validate_images, min_agreement=min_agreement, int4_weights=int4_weights,
                       quantizer=quantizer, skip_unsupported=skip_unsupported, seed=seed)
    res = export_stage(cfg)
    v = res["validation"]
    click.echo(f"wrote {out} ({res['policy_summary']} {res['quantizer']}, "
               f"BOPs {100 * res['bops_fraction']:.3f}% of W32A32); "
               f"onnxruntime top-1 {v['accuracy_candidate']:.4f} vs torch {v['accuracy_reference']:.4f}, "
               f"agreement {v['top1_agreement']:.4f} on {v['images']} images"
               + (f"; left in float: {', '.join(res['float_layers'])}" if res.get("float_layers") else ""))


COMMANDS = (layers, train, export)
