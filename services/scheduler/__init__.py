"""services/scheduler."""
