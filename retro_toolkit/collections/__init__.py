"""The pipeline's components. Nothing here imports the runner or the CLI."""
