"""Training: `python -m unetdist.train --config FILE [key=value ...]` is what torchrun starts."""
