"""Distribution concerns applied from outside the model: environment, checkpointing, parallel wrappers."""
