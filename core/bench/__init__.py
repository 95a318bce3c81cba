"""Benchmarks: `kvyard bench offline | one-batch | serving`."""
