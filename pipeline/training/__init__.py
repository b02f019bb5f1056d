"""Training on Ray Train: the driver, what each worker runs, the Ray session and trainer."""
