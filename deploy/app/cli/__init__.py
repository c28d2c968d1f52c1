"""The `arq-deploy` command line: one module per command group. Each command turns its options into a stage config
(`arq_deploy.core.config`) and calls a stage function (`arq_deploy.app.stages`); heavy libraries (torch,
onnxruntime, TVM) are imported inside the commands only, so `arq-deploy --help` starts fast."""

from __future__ import annotations

import sys

import click

from arq_deploy import __version__
from arq_deploy.app.cli import bench, build, certify, checks, model, predict, report, search
from arq_deploy.core.errors import ArqError


class _Group(click.Group):
    """Turns every user error into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ArqError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted (results written so far are kept)", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arq-deploy")
def main():
    """arq-deploy: quantize, export, compile and certify CNNs for edge hardware with certified robustness."""


for _module in (model, build, certify, predict, bench, search, checks, report):
    for _command in _module.COMMANDS:
        main.add_command(_command)

if __name__ == "__main__":
    main()
