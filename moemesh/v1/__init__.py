"""Generated stubs of the moemesh v1 contract (protos/moemesh/v1). Do not edit."""
