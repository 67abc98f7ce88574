"""The corpus's command: `index`."""

from __future__ import annotations


def cmd_index(args) -> int:
    from tourray.corpus.texts import check_index, write_index

    if args.check:
        problems = check_index(args.root)
        for p in problems:
            print(p)
        print(f"{args.root}/index.tsv: " + ("up to date" if not problems else f"{len(problems)} difference(s)"))
        return 1 if problems else 0
    print(f"wrote {write_index(args.root)}")
    return 0


def add_commands(command) -> None:
    p = command("index", cmd_index, "Write or check samples/index.tsv (path, split, category, city, language, sha256).",
                "examples:\n  tourray index samples/          # rewrite samples/index.tsv\n"
                "  tourray index samples/ --check  # exit 1 when it is stale")
    p.add_argument("root", nargs="?", default="samples", help="Corpus root (default: samples).")
    p.add_argument("--check", action="store_true", help="Compare instead of writing; exit 1 on differences.")
