"""Recipe -> stage plan -> jobs (here, or NeMo-Run's on Slurm and Docker); stage manifests; the entry point inside a job."""
