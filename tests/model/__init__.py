"""Model tests: the model families, their ops and the engine on tiny random checkpoints, in-process."""
