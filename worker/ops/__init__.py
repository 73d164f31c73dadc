"""Operations the model layers call, each on the backend it picks once, at load.

One module per operation, each with its table of backends in order of
preference and a `choose_*` function that builds the first one serving the
model's `backends.Target` (device, dtype, whether weights may be re-laid out):

| operation | module | backends, first choice first |
|---|---|---|
| dense projections | `linear` | `NativeLinear` (small batches; larger ones go to the next entry), `OneDNNLinear`, `TorchLinear` |
| routed SwiGLU experts | `experts` | `NativeExperts`, `OneDNNExperts`, `TritonExperts`, `TorchExperts` |
| rotary + KV write, attention over the paged cache | `attention` | `NativeAttention`, `TritonAttention`, `TorchAttention` |
| RMSNorm, with the residual add | `norm` | `NativeRMSNorm`, `TorchRMSNorm` |
| router softmax + top-k | `router` | `NativeRouter`, `TorchRouter` |

Native backends run the float32 CPU kernels of `native` (where a C compiler
builds them; `MOEMESH_NATIVE_KERNELS=0` turns them off); oneDNN backends read
weights packed by `packing` (CPU); Triton backends run the CUDA kernels of
`gpu` (the fused MoE layer, decode attention reading the paged cache in
place; `MOEMESH_TRITON_KERNELS=0` turns them off), tested on the CPU under
Triton's interpreter; PyTorch backends run anywhere and are the reference
every other backend is tested against.

The model chooses at load (`DecoderForCausalLM.choose_backends`) and stores
each built backend on its module; model classes call operations and never
test for backends. Backends to come are one class plus one table entry each:
Triton kernels for chunked-prefill attention and the fused small ops on
CUDA; and `RemoteExperts` for expert parallelism, first in the experts
table, serving targets whose experts live on other ranks (see `experts`).
"""
