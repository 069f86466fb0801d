"""Test stub of timm.models."""
