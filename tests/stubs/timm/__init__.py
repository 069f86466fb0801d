"""Test stub of timm: only what torchscale 0.3.0 imports (see tests/stubs/README.md)."""
