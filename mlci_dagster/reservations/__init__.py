"""Reservations: leases on reserved capacity, daytime holds for people, and the guard that
cleans a reservation before a batch (Dagster-free)."""
