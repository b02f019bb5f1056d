"""Data: fetch and prepare MNIST, the prepared-data format, atomic files, image -> digit."""
