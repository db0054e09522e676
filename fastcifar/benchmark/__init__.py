"""Benchmarks with results files: loader throughput (`loader`) and time to a target test
accuracy (`time_to_accuracy`)."""
