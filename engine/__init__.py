"""The training run: settings table, data and model set-up, the epoch loop and its step (gradient caching, the step
guard), run state and checkpoint assembly, the run folder's files, train.log and TensorBoard (train.py reads them)."""
