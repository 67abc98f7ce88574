"""Statistics of the lake's token vectors: mergeable float64 moments (`moments`), the aligned
layer reader (`stream`), `tourray stats` as Ray tasks per tile of layers (`tasks`), and the same
accumulators inside the capture actor (`inline`). The linear algebra over merged moments (PCA, Procrustes, CKA, least squares): `linalg`;
`tourray solve` (`solves`) and teacher-to-student transport (`transport`) on top of it.
"""
