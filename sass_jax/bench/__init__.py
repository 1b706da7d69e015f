"""Benchmarks (BENCHMARKS.md).

- ``throughput``: ``--mode bench`` and ``--mode bench_input`` of ``sass_jax.main`` (step, input,
  loop and evaluation throughput of the product's own code paths).
- ``vs_pytorch``: sass_jax against the PyTorch reference, alternating in one process tree
  (``python -m sass_jax.bench.vs_pytorch``).
- ``scaling``: XLA flops and samples/s of the steps over scenario counts
  (``python -m sass_jax.bench.scaling``).
- ``torch_reference``: the PyTorch reimplementation of SASS that ``vs_pytorch`` times.

torch is imported only by ``torch_reference`` and inside ``vs_pytorch``'s torch child; nothing
here is imported by the rest of the package except ``throughput`` (by ``sass_jax.main``), and
this package's ``__init__`` imports nothing, so ``sass_jax`` imports without torch.
"""
