"""The worker process: configuration, the gRPC service, membership, and the engine's thread."""
