"""Capture a corpus into the lake: the job `ray job submit` runs on a cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/capture.py --config jobs/configs/capture.yaml --model /ckpt/Qwen3-32B --lake s3://bucket/lake

Embedded (no RAY_ADDRESS): starts a local Ray. Same flags as `tourray capture`.
"""

import sys

from tourray.cli import main

if __name__ == "__main__":
    sys.exit(main(["capture", *sys.argv[1:]]))
