"""Operations the model layers call, each on the backend it picks once, at load.

One module per operation, each with its table of backends in order of
preference and a `choose_*` function that builds the first one serving the
model's `backends.Target` (device, dtype, whether weights may be re-laid out):

| operation | module | backends, first choice first |
|---|---|---|
| dense projections | `linear` | `NativeLinear` (small batches; larger ones go to the next entry), `OneDNNLinear`, `TorchLinear` |
| routed SwiGLU experts | `experts` | `NativeExperts`, `OneDNNExperts`, `TorchExperts` |
| rotary + KV write, attention over the paged cache | `attention` | `NativeAttention`, `TorchAttention` |
| RMSNorm, with the residual add | `norm` | `NativeRMSNorm`, `TorchRMSNorm` |
| router softmax + top-k | `router` | `NativeRouter`, `TorchRouter` |

Native backends run the float32 CPU kernels of `native` (where a C compiler
builds them; `MOEMESH_NATIVE_KERNELS=0` turns them off); oneDNN backends read
weights packed by `packing` (CPU); PyTorch backends run anywhere, are the
reference every other backend is tested against, and are the CUDA path today.

The model chooses at load (`DecoderForCausalLM.choose_backends`) and stores
each built backend on its module; model classes call operations and never
test for backends. Backends to come are one class plus one table entry each:
a Triton/CUDA backend per operation (a fused grouped MoE over expert-sorted
tokens, attention reading the paged KV in place), listed before the PyTorch
entry and serving CUDA targets; and `RemoteExperts` for expert parallelism,
first in the experts table, serving targets whose experts live on other
ranks (see `experts`).
"""
