"""Adapter methods: shared targeting and model plumbing, and one module per method's math."""
