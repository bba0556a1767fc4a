"""Benchmarks (``hina-kohya bench``) and the helpers they share with the tests."""
