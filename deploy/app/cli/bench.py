"""Measurement commands: `bench` (latency, throughput, memory, energy of a model on a target) and `latency-table`
(per-layer latency of every bit pair, for the search's latency budget)."""

from __future__ import annotations

import click

from arq_deploy.app.cli.options import backend_opt, model_opts, parse_shape, remote_opt
from arq_deploy.core.config import INT_KERNELS


@click.command(name="bench")
@click.argument("artifact", type=click.Path())
@click.option("--target", default=None, help="where it runs: x86, cuda, ... (default: the artifact's; x86 for ONNX)")
@backend_opt()
@remote_opt
@click.option("--batch", "batch_large", type=int, default=256, show_default=True, help="batch for the throughput")
@click.option("--repeats", type=int, default=50, show_default=True, help="timed calls at batch 1")
@click.option("--warmup", type=int, default=5, show_default=True, help="untimed calls first")
@click.option("--probe", default=None, help="energy probe instead of the target's: rapl, nvml, ina3221, vcgencmd, none")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="bench-TARGET.json to write")
def bench_cmd(artifact, target, backend, remote, batch_large, repeats, warmup, probe, out):
    """Latency p50/p90/p99 at batch 1, throughput at --batch, peak memory and joules per inference of an ONNX model
    (onnxruntime) or a compiled artifact (TVM, locally or on a --remote device)."""
    from arq_deploy.app.stages import bench_stage
    from arq_deploy.core.config import BenchConfig

    cfg = BenchConfig(model_path=artifact, out=out, target=target, backend=backend, remote=remote, batch=batch_large,
                      repeats=repeats, warmup=warmup, probe=probe)
    res = bench_stage(cfg)
    lat, thr, e = res["latency"], res["throughput"], res["energy_j_per_inference"]
    click.echo(f"wrote {out}: {res['runner']} on {res['target']}: batch 1 p50 {lat['p50_ms']:.3f} ms "
               f"(p99 {lat['p99_ms']:.3f}), {thr['images_per_s']:,.0f} img/s at batch {thr['batch']}, peak memory "
               f"+{res['memory']['peak_increase_mb']} MB, energy "
               + (f"{e * 1e3:.4f} mJ/inference" if isinstance(e, float) else e))


@click.command(name="latency-table")
@model_opts
@click.option("--target", required=True, help="registered target whose per-layer latency is measured")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tvm", "tvm-int"]), default="auto",
              show_default=True, help="auto: onnxruntime here, TVM with --remote or for another architecture; "
                                      "tvm-int: TVM integer builds (every kernel the (w, a) pairs run on, measured)")
@click.option("--int-kernel", type=click.Choice(list(INT_KERNELS)), default="auto", show_default=True,
              help="with --backend tvm-int: the integer builds' kernel (as `compile --int-kernel`)")
@click.option("--remote", default=None, metavar="HOST:PORT", help="time TVM builds on the device over TVM RPC")
@click.option("--repeats", type=int, default=50, show_default=True, help="timed calls per graph (median)")
@click.option("--warmup", type=int, default=5, show_default=True, help="untimed calls first")
@click.option("--sigma", type=float, default=None, help="calibration noise (default: the checkpoint's σ, else 0)")
@click.option("--no-end-to-end", "no_e2e", is_flag=True, help="skip the whole-model additivity check")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="latency table JSON to write")
def latency_table_cmd(model_name, weights, input_shape, target, backend, int_kernel, remote, repeats, warmup, sigma,
                      no_e2e, seed, out):
    """Per-layer latency of every (w, a) pair 2..8 on a target (for `search --latency-budget-ms`)."""
    from arq_deploy.core.fileio import write_json
    from arq_deploy.export.pipeline import load
    from arq_deploy.search.latency import check_setup, measure_table

    check_setup(target, backend, remote, int_kernel)  # before the model loads
    lm = load(model_name or (None if weights else "digits_cnn"), weights, input_shape=parse_shape(input_shape))
    sigma = float(lm.meta.get("sigma") or 0.0) if sigma is None else sigma
    table = measure_table(lm, target, backend, remote, repeats=repeats, warmup=warmup, seed=seed, sigma=sigma,
                          end_to_end=not no_e2e, int_kernel=int_kernel)
    write_json(out, table.to_dict())
    d = table.details
    variants = {v for row in table.source.values() for v in row.values()}
    click.echo(f"wrote {out}: {len(table.entries)} layers × 49 pairs on {table.target} ({d['backend']}), "
               f"{d['measured']} graphs measured ({len(variants)} variant kinds), overhead {d['overhead_ms']:.4f} ms")
    for k, v in (d["end_to_end"] or {}).items():
        click.echo(f"  {k:>6}: end to end {v['measured_ms']:.4f} ms, sum of layers {v['sum_of_layers_ms']:.4f} ms "
                   f"({v['sum_over_measured']:.2f}×)")


COMMANDS = (bench_cmd, latency_table_cmd)
