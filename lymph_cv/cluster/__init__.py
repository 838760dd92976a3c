"""Job submission to PBS/Torque, Slurm and the local runner."""
