"""A heal driver that SIGKILLs itself (its Ray, the Train controller and worker with it) right after it
has committed the heal_log rows of its first persisted checkpoint (used by test_train.py).

    python _kill_heal.py CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import signal
import sys

from tourray.heal import train
from tourray.heal.config import HealConfig


def main(cfg: HealConfig) -> None:
    real = train.HealLog.commit

    def commit(self):
        had = any(s >= 1 for s in self.buf)
        real(self)
        if had:
            sys.stdout.flush()
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the test starts this script in its own session

    train.HealLog.commit = commit
    train.run_heal(cfg, progress=False)
    sys.exit(3)  # never reached: the kill comes first


if __name__ == "__main__":
    main(HealConfig(**json.loads(sys.argv[1])))
