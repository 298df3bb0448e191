"""Benchmarks, the evaluation substrate and the accuracy harness (``prhs-bench``)."""
