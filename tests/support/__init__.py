"""Helpers shared by the tests and the benchmarks: real servers on loopback, a real Dagster
daemon and webserver."""
