"""Launchers. Every path (embedded Ray, Ray cluster, Slurm) ends in `worker.run_worker`."""
