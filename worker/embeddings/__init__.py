"""Embedding models a worker serves beside its generation model."""
