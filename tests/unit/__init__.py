"""Unit tests: one class or function at a time, no model checkpoint, no server processes (fakes allowed)."""
