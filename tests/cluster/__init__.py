"""Real clusters on one test machine: hosts as network namespaces, and a private SLURM on them."""
