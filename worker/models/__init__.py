"""worker/models."""
