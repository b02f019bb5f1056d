"""Training benchmark: `loops` (the reference loop, Lightning), `run` (the runner), `report`."""
