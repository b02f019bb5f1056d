"""The model server: the registry's champion behind a REST API, a drawing page, Ray Serve."""
