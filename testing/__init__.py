"""What tests and benchmarks both use to drive the real parts: manager processes, HAProxy."""

from testing import tls_context

tls_context.install()
