"""Configuration: the params.yaml schema, the search spaces, the environment settings."""
