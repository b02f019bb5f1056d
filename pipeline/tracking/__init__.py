"""MLflow tracking: runs and their resume policy, per-epoch logging, model logging, lineage."""
