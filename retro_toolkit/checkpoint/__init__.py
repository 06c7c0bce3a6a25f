"""Checkpoint packaging: .nemo archives (and, later, imports and exports)."""
