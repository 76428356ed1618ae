"""The benchmarks' shared plumbing, which lives in the library as :mod:`minicnn.benchmarking`."""
from minicnn.benchmarking import *  # noqa: F401,F403
from minicnn.benchmarking import __all__  # noqa: F401
