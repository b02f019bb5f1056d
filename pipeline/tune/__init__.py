"""Hyperparameter search with Ray Tune, tracked as MLflow parent and child runs."""
