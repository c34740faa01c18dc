"""Whole runs: storage claims, manifests, shard conversion, Ray Data, JAX multi-host, CLI commands."""
