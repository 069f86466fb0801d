"""Custom ops, autograd, form planning, reference and aten implementations."""
