"""Surgery's command: `fold`."""

from __future__ import annotations

from tourray.config import add_config_flags, config_from_args

EXAMPLES = """examples:
  tourray fold --model .cache/smollm2-135m-instruct --spec transforms.json --out ckpt/smol-rotated
  python -c "import numpy as np; np.save('Q.npy', np.linalg.qr(np.random.randn(576, 576))[0])"   # a random rotation"""


def cmd_fold(args) -> int:
    from tourray.surgery.fold import FoldConfig, run_fold

    s = run_fold(config_from_args(FoldConfig, args), progress=not args.no_progress)
    print(f"{s['out']}: folded ({s['parameters'] / 1e6:.2f}M parameters; config changes: "
          f"{s['config_changes'] or 'none'}) in {s['seconds']:.1f} s")
    return 0


def add_commands(command) -> None:
    from tourray.surgery.fold import SPEC_HELP, FoldConfig

    p = command("fold", cmd_fold, "Fold function-preserving transforms (one residual rotation, FFN-neuron and head "
                "permutations) into a checkpoint, streamed shard by shard; logits are unchanged.",
                SPEC_HELP + "\n\n" + EXAMPLES)
    add_config_flags(p, FoldConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
