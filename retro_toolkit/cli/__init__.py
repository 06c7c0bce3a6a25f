"""retro-run: run, check and explore Retro recipes.

Each subcommand is one module of this package with NAME, register(subparsers) and
run(args); COMMANDS below lists them once, in the order `retro-run --help` shows them.
`retro-run RECIPE ...` without a subcommand means `retro-run run RECIPE ...`.
Heavy imports (torch, megatron-core) stay inside the commands' run functions, so
`retro-run validate` works on a machine without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from retro_toolkit.cli import (export_hf, export_safetensors, generate, import_gpt, import_megatron, inspect, ls, run,
                               serve, show, show_model, status, validate)
from retro_toolkit.core.signals import Interrupted
from retro_toolkit.errors import RetroError

COMMANDS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (run, status, validate, show, ls, inspect, show_model, generate, serve, export_safetensors, export_hf,
              import_megatron, import_gpt)
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(
        prog="retro-run",
        description="Retro and InstructRetro end to end, from one YAML recipe.",
        epilog=run.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    return p, {name: command.register(sub) for name, command in COMMANDS.items()}


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["run", *argv]
    main_parser, parsers = _parser()
    if not argv or argv[0] not in parsers:
        main_parser.parse_args(argv)  # --help, or a usage error
        main_parser.print_help()
        return 2
    # Intermixed: `RECIPE --dry-run key=value` works as well as `RECIPE key=value --dry-run`.
    args = parsers[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return COMMANDS[argv[0]].run(args)


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except RetroError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"retro-run: {e}; every process of the run has ended. Rerun the same command to continue "
              "(finished stages are kept, training resumes from its last checkpoint).", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`retro-run ls | head`): stop quietly, as other Unix tools do,
        # and keep Python from failing again while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
