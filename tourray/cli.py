"""The `tourray` command: one subcommand list, assembled from the packages in pipeline order. Each
package registers its own subcommands (`<package>/commands.py: add_commands`); config-backed ones
take `--config FILE.yaml` plus one flag per config field (flags win), so YAML and flags are one thing.

User mistakes print one clear `error:` message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from tourray.config import guarded

#: Packages whose `commands.add_commands` the CLI calls, in the order a user meets them.
PACKAGES = ("model", "corpus", "capture", "lake", "stats", "prune", "surgery", "qa", "heal", "serve")


def parser() -> argparse.ArgumentParser:
    import importlib

    from tourray import __version__

    top = argparse.ArgumentParser(prog="tourray", description="A streaming data lake for the insides of language models.")
    top.add_argument("--version", action="version", version=f"tourray {__version__}")
    top.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors on stderr.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help, epilog=None):
        p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    for package in PACKAGES:
        importlib.import_module(f"tourray.{package}.commands").add_commands(command)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return guarded(args.fn, args, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
