"""Statistics of the lake's token vectors: mergeable float64 moments (`moments`), the aligned
layer reader (`stream`), `tourray stats` as Ray tasks per tile of layers (`tasks`), and the same
accumulators inside the capture actor (`inline`). Solves over the merged moments: `tourray.stats.linalg`.
"""
