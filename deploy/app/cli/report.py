"""`arq-deploy report` (one HTML page of a run directory) and `arq-deploy demo` (the whole pipeline on digits)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file [RUN/report.html]")
def report(run, out):
    """Gather a run directory's results (search, export, certification, checks, benchmarks) into one HTML page."""
    from arq_deploy.app.report import build_report

    click.echo(f"wrote {build_report(run, out)}")


@click.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--fast", is_flag=True, help="fewer epochs and samples (for tests)")
def demo(out, fast):
    """End to end on scikit-learn's digits: train with noise, quantize, export, compile, run, certify, report."""
    from arq_deploy.app.demo import run_demo

    run_demo(Path(out), fast=fast)


COMMANDS = (report, demo)
