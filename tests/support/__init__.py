"""What the tests share besides fixtures (fixtures live in the conftest.py files).

Importable as `support` because pytest's `pythonpath` option (pyproject.toml) puts tests/ on the path:

- `support.paths`: the checkout, the tests folder and the committed fixtures;
- `support.programs`: system programs the tests run, or a failure naming the one-step install;
- `support.processes`: private `redis-server`s, real `vlltr serve` processes and nginx in front of them;
- `support.runs`: a small finished run without training (torch) and a torch-free interpreter;
- `support.export_check`: a bundle against its PyTorch model (torch);
- `support.deploy`: the scripts under deploy/tools/ as modules;
- `support.reliability`: the figures the reliability tests report;
- `support.batching`: a batch function that records when the micro-batcher dispatched what;
- `support.slow_clients`: uploads that stall on raw sockets, and waiting for the server to close them.

Only `support.export_check` imports torch when imported (`support.runs.make_run` imports it when called): the
torch-free unit tests use the rest in a venv without torch.
"""
