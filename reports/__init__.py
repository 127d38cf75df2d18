"""Metrics, per-configuration tables, plots and evaluation JSON."""
