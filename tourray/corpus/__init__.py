"""The corpus: texts and their index (`texts`: samples, splits, categories, sha256) and the rule that
classes each token (`token_class`). Knows nothing of models or the lake."""
