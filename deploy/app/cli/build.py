"""Build commands: `compile` (an ONNX model into a TVM artifact for a target) and `targets` (the registry)."""

from __future__ import annotations

import click

from arq_deploy.core.config import INT_KERNELS


@click.command(name="compile")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--target", default="x86", show_default=True, help="registered target (see `arq-deploy targets`)")
@click.option("--batch-size", type=int, default=100, show_default=True, help="batch compiled into the library")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="artifact directory to write")
@click.option("--tune-trials", type=int, default=0, show_default=True,
              help="MetaSchedule tuning trials (host CPU targets), starting from the built-in schedules")
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None,
              help="tuning database directory: records are applied and new ones added; reuse it across builds")
@click.option("--integer", is_flag=True, help="compute QDQ conv/dense layers in integer arithmetic (int32 accumulate)")
@click.option("--int-kernel", type=click.Choice(list(INT_KERNELS)), default="auto", show_default=True,
              help="SIMD conv kernel of --integer builds (auto: x86 vpdpbusd with VNNI, else vpmaddubsw per layer "
                   "where its int16 sums cannot overflow, else vpmaddwd; AArch64 sdot "
                   "with the dot product, else smlal_narrow per layer where its int16 sums cannot overflow, else smlal)")
def compile_cmd(onnx_path, target, batch_size, out, tune_trials, tuning_db, integer, int_kernel):
    """Compile an ONNX model with TVM into an artifact directory (model library + manifest.json with hashes)."""
    from arq_deploy.app.stages import compile_stage
    from arq_deploy.core.artifact import load_artifact
    from arq_deploy.core.config import CompileConfig

    cfg = CompileConfig(onnx=onnx_path, out=out, target=target, batch_size=batch_size, tune_trials=tune_trials,
                        tuning_db=tuning_db, integer=integer, int_kernel=int_kernel)
    path = compile_stage(cfg)
    click.echo(f"wrote {path}")
    click.echo(size_summary(load_artifact(path).manifest))


def _kb(n: int) -> str:
    return f"{n / 1000:,.1f} kB"


def size_summary(manifest: dict) -> str:
    """One line: the model's BOPs next to the artifact's sizes (manifest `storage`) and, with external weights, the
    packed weights beside the bytes the same tensors take at their 8-bit-or-wider compiled types."""
    arq, st = manifest.get("arq") or {}, manifest.get("storage") or {}
    parts = []
    if arq.get("bops") is not None:
        frac = arq.get("bops_fraction")
        parts.append(f"{arq.get('policy_summary') or 'model'}: BOPs {int(arq['bops']):,}"
                     + (f" ({100 * frac:.3f}% of W32A32)" if frac is not None else ""))
    if st:
        libs = sum((st.get("library_bytes") or {}).values())
        line = f"artifact {_kb(st['artifact_bytes'])}, runtime {_kb(st['runtime_bytes'])} (libraries {_kb(libs)}"
        if "weights_packed_bytes" in st:
            line += (f", weights {_kb(st['weights_packed_bytes'])} packed vs {_kb(st['weights_container_bytes'])} "
                     f"at 8-bit-or-wider containers)")
        else:
            line += ", weights inside the libraries)"
        parts.append(line)
    return "; ".join(parts) or "no size information in the manifest"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print every field of every target as JSON")
def targets(as_json):
    """List the registered compilation targets (cuda-smNN also names the cuda target for architecture sm_NN)."""
    import json

    from arq_deploy.targets.registry import list_targets, summary

    if as_json:
        click.echo(json.dumps([t.to_json() for t in list_targets()], indent=2))
        return
    rows = [summary(t) for t in list_targets()]
    cols = ["name", "kind", "device", "host", "cross_compiler", "onnxruntime", "energy"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:-1]}
    click.echo("  ".join(c.ljust(width[c]) for c in cols[:-1]) + "  energy")
    for r in rows:
        click.echo("  ".join(r[c].ljust(width[c]) for c in cols[:-1]) + "  " + r["energy"])
    click.echo("\ncuda-smNN (e.g. cuda-sm75, cuda-sm90) is the cuda target for another GPU architecture; "
               "--json shows every field.")


COMMANDS = (compile_cmd, targets)
