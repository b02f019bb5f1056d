"""mnist-pipeline: versioned MNIST data, distributed training, tracking and serving."""
