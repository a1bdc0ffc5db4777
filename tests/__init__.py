"""Tests for optax_gc; bare ``pytest`` imports them as the ``tests`` package."""
