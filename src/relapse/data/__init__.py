"""Benchmarks: the one folder format, its loader and the built-in synthetic benchmark."""

from relapse.data.benchmark import Benchmark, QAPair, benchmark_files, load_benchmark
from relapse.data.synth import synth_benchmark

__all__ = ["Benchmark", "QAPair", "benchmark_files", "load_benchmark", "synth_benchmark"]
