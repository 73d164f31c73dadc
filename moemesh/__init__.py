"""moemesh: a mesh of gRPC microservices serving Mixture-of-Experts language models."""

__version__ = "0.1.0"
