"""Benchmarks against qemu-img (a package: run its scripts as `python -m bench.<name>`)."""
