"""Integration tests: real redis-server, gRPC servers on loopback, the Envoy binary, whole meshes."""
