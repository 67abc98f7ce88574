"""QA's command: `qa`."""

from __future__ import annotations


def add_commands(command) -> None:
    from tourray.qa.job import add_parser

    add_parser(command)
