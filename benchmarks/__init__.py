"""Real-data benchmarks of fxdeco (not imported by the library)."""
