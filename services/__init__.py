"""Services that run next to the pipeline (model serving)."""
