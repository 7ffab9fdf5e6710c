"""Entry point: ``lingraft`` click group. Each command lives in its own module and stays thin."""

from __future__ import annotations

import sys

import click

from lingraft import __version__
from lingraft.cli import certify, compare, export, graft, inspect_cmd, run, train, verify
from lingraft.errors import LingraftError


class LingraftGroup(click.Group):
    """A click group that turns library errors (raised anywhere, option callbacks included) into one line on
    stderr and the error's exit code, never a traceback: the one error handler of every command
    (Ctrl-C or SIGTERM -> one line, exit 130; out of memory -> a hint to lower --batch-size)."""

    def invoke(self, ctx):
        from lingraft import signals

        try:
            # SIGTERM (docker stop, Slurm, CI timeouts) is handled like Ctrl-C: state is saved, one line, exit 130
            with signals.InterruptGuard(), signals.cli_reports():
                return super().invoke(ctx)
        except LingraftError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt as e:
            signals.forget_unhandled_interrupt()  # else `python -m` may end by SIGINT (-2) instead of 130
            click.echo(signals.message_of(e), err=True)
            ctx.exit(130)
        except MemoryError:
            click.echo("error: out of memory; lower --batch-size", err=True)
            ctx.exit(1)
        except OSError as e:
            # a file problem the library did not anticipate: still one line, never a traceback
            from lingraft.io.files import describe_os_error

            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"error: cannot access{where}: {describe_os_error(e)}", err=True)
            ctx.exit(1)


@click.group(
    cls=LingraftGroup,
    # show_default: every option's --help shows its default (the commands inherit it from this group)
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True},
    epilog="Example:\n\n\b\n  lingraft certify                      # shipped MNIST CNN-B, 1000 test images\n"
    "  lingraft graft models/mnist-cnn-b-fgsm.pt --ratio 0.5 --eps 0.06 --out grafted.pt",
)
@click.version_option(__version__, prog_name="lingraft")
def cli():
    """lingraft: graft linearity into ReLU networks and certify their robustness.

    Exit codes: 0 ok, 1 error, 2 usage, 3 robustness gate failed, 130 interrupted.
    """


for _module in (certify, inspect_cmd, train, graft, export, verify, compare, run):
    cli.add_command(_module.command)


def main():  # pragma: no cover - console entry
    cli(prog_name="lingraft")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
