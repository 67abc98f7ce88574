"""The tour guide's commands: `serve` (the page and API on Ray Serve) and `tours` (`generate`:
teacher-written tours into the lake, `examples`: the page's pre-generated examples)."""

from __future__ import annotations

import argparse
import json

from tourray.config import add_config_flags, config_from_args
from tourray.errors import UserError

SERVE_EXAMPLES = """examples:
  tourray serve --model .cache/smollm2-135m-instruct                                  # http://127.0.0.1:8000/
  tourray serve --model .cache/smol-bi2 --compare .cache/smollm2-135m-instruct        # compressed beside the original
  tourray serve --model ckpt/small --replicas 2 --host 0.0.0.0 --port 8080
  tourray serve --model ckpt/small --decoding-sample --decoding-seed 7                 # sampled answers by default
  serve run tourray.serve.deploy:app_builder model=/ckpt/small compare=/ckpt/original  # Ray Serve's own CLI (clusters)"""

TOURS_EXAMPLES = """examples:
  tourray tours generate --model .cache/smollm2-135m-instruct --styles brief,detailed --n 40 --run teacher-smol
  tourray tours generate --model Qwen/Qwen3-32B --engine vllm --gpus-per-actor 1 --actors 4 --run teacher-32b --export data/tours
  tourray tours generate --model M --tags my_tags.txt --include 'train/xian__*' --decoding-sample --decoding-seed 3
  tourray sql --lake lake "SELECT style, count(*), avg(new_tokens) FROM tours GROUP BY style"

tag list file: one tag set per line, comma-separated (history,people); # comments; a lone - means no tags."""


def cmd_serve(args) -> int:
    from tourray.serve.config import ServeConfig
    from tourray.serve.deploy import run_serve

    run_serve(config_from_args(ServeConfig, args))
    return 0


def cmd_tours_generate(args) -> int:
    from tourray.serve.config import ToursConfig
    from tourray.serve.tours import run_tours

    summary = run_tours(config_from_args(ToursConfig, args), progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_tours_examples(args) -> int:
    from pathlib import Path

    from tourray.corpus.texts import read_system_prompt
    from tourray.model.decoding import TOUR_DECODING
    from tourray.serve.app import EXAMPLES_FILE
    from tourray.serve.examples import write_examples

    models = {"main": args.model, **({"compare": args.compare} if args.compare else {})}
    for flag, path in (("--model", args.model), ("--compare", args.compare)):
        if path and not (Path(path) / "config.json").exists():
            raise UserError(f"{flag}: no checkpoint folder {path!r}")
    out = write_examples(models, args.out or EXAMPLES_FILE, read_system_prompt(args.system_prompt), TOUR_DECODING,
                         threads=args.threads)
    print(f"wrote {out}")
    return 0


def add_commands(command) -> None:
    from tourray.serve.config import ServeConfig, ToursConfig

    p = command("serve", cmd_serve, "The offline tour guide: a map page and its API (POST /api/tour, streamed) on Ray "
                                     "Serve, one deployment per model; --compare puts a second model beside the first.",
                SERVE_EXAMPLES)
    add_config_flags(p, ServeConfig)

    p = command("tours", None, "Teacher-written tours: (plus code, place, tags, style) -> text, into the lake table `tours`.")
    sub = p.add_subparsers(dest="tours_command", required=True, metavar="SUBCOMMAND")
    help_ = ("Write tours for the corpus's stops with a teacher model, as a Ray Data batch job (an actor per model copy, "
             "batched generate; hf or vLLM) into the lake table `tours`; re-running adds only what is missing; "
             "--export DIR also writes them as training texts.")
    g = sub.add_parser("generate", help=help_, description=help_, epilog=TOURS_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.set_defaults(fn=cmd_tours_generate)
    add_config_flags(g, ToursConfig)
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    help_ = ("Answer the page's example pins once with the served model(s) and write the examples JSON the page "
             "shows instantly (default: the one shipped in the package).")
    e = sub.add_parser("examples", help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.set_defaults(fn=cmd_tours_examples)
    e.add_argument("--model", required=True, metavar="DIR", help="The served model (the compressed one).")
    e.add_argument("--compare", metavar="DIR", help="The second model (the original).")
    e.add_argument("--system-prompt", default="samples/system_prompt.md", metavar="FILE",
                   help="System prompt file (default: samples/system_prompt.md).")
    e.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's).")
    e.add_argument("--out", metavar="FILE.json", help="Where to write (default: tourray/serve/static/examples.json).")
