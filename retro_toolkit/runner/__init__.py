"""Recipe -> stage plan -> NeMo-Run jobs; stage manifests; the entry point inside a job."""
