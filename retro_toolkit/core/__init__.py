"""Shared plumbing: atomic files, hashing, distributed init, progress lines."""
