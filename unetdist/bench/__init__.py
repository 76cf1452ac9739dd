"""Benchmarks behind `unetdist bench`: ours against the reference trainer, levers, DDP, memory, MFU.

Submodules are imported by the command that needs them; ``peak.peak_flops`` is also what the
training loop divides by for ``train/mfu``.
"""
