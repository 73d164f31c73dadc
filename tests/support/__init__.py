"""What the test suites share: tiny checkpoints, the model contract, a redis-server launcher."""
