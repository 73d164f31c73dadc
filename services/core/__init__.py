"""Shared service plumbing: config, logging, errors, gRPC bootstrap, tensor codec."""
