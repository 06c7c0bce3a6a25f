"""Research probes: what retrieval could give a small Retro, and what the model learns to use."""
