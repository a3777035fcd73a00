"""What tests and benchmarks both use to drive the real parts: manager processes, HAProxy."""
