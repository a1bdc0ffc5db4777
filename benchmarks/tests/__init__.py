"""Tests of the benchmark scripts and their model code."""
