"""Test helpers shipped with the library (multi-process pools for gloo tests)."""
