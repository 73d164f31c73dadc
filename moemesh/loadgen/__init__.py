"""`moemesh bench`: a load generator for a deployed mesh or any OpenAI-compatible server.

The pieces, each usable without a server:

- `config`: the validated benchmark settings (targets, load levels, limits);
- `dataset`: seeded synthetic prompts (exact token counts with a tokenizer) or a prompt file;
- `schedule`: Poisson arrivals for open-loop load;
- `metrics`: one request's timings, and a level's figures (throughput, TTFT, TPOT, ITL, E2E, goodput);
- `clients`: the two protocols (gRPC `Generate`, HTTP `/v1/completions` streamed), each timing one request;
- `runner`: closed and open loops, warm-up, the sweep over levels and targets;
- `report` and `plot`: the summary table, the JSON file and the PNG figure.
"""
