"""Serving benchmark: the service against its in-process ceiling, its own batching-off mode, a hand-written
PyTorch server and an existing serving framework, on the same bundles and machine, in one run.

`python -m bench.serving` writes `docs/benchmarks/serving.md` and `docs/benchmarks/serving.json`
(see `bench/serving/__main__.py` for the flags); `python -m bench.serving.gpu` runs the GPU tables.
"""
