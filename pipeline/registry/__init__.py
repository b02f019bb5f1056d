"""The model registry: versions, aliases and the promotion gate; register; pull."""
