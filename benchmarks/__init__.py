"""Benchmarks that measure the pipeline against peer libraries on the project's own data."""
