"""Serving benchmark: `load` (the load generator), `run` (the runner), `report`."""
