"""Recipe -> stage plan -> jobs (started here, or NeMo-Run's on Slurm and Docker); stage
manifests; the entry point inside a job."""
