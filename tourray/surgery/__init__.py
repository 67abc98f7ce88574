"""Every change that writes a checkpoint: function-preserving folds, slicing and width surgery
(`fold`), block removal and patch folding (`blocks`). Reads only the model package below it."""
