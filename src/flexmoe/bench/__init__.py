"""Benchmarks: each prints a table and writes JSON with the environment (`flexmoe bench NAME`)."""
