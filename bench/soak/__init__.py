"""Load and soak tooling for the HTTP service.

`python -m bench.soak` drives a running `vlltr serve` (or one it starts) with many classification requests at a
fixed concurrency, samples the server process's resident memory and writes a JSON summary; it fails when any
request fails or memory grows past a bound. `python -m bench.soak.report` renders docs/reliability.md from the
reliability tests' summary and, optionally, a soak summary. `bench.soak.load` holds the pieces the tests reuse.
"""
