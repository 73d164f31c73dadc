"""The demo checkpoint: a tiny Mixtral MoE trained on Python's own stdlib sources.

`python -m moemesh.worker.demo.build` rebuilds `demo-moe/` next to this file.
"""
