"""Redis access for moemesh: every Redis data structure, behind one timeout-and-breaker wrapper.

- `guard`: the circuit breaker and `RedisGuard`, the one way any module calls Redis
- `client`: connections with short timeouts, and the readiness probe
- `response`, `embeddings`: the response cache and the embedding cache (keys and entry formats)
- `kv_tier`: the shared prefix-KV tier
- `journal`: the stream journal of resumable requests
- `buckets`: the rate-limit token buckets
- `stats`: the counters the caches export
- `embedded`: the bundled redis-server launcher

Callers decide policy (what may be cached, who is charged what); nothing here imports the gateway.
"""
