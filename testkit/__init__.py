"""Fixtures shared by the tests (tests/conftest.py) and the benchmarks (bench/): real MNIST
from the mirror, params profiles under a scratch folder, a registered CNN, server processes
and a copy of the repo. Imports the project's public API only."""
