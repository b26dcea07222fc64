"""Running bioplaus on several machines: the loopback multi-node cluster (``python -m bioplaus.cluster.local``).
The deployment files beside it (ray-cluster.yaml, kuberay.yaml, slurm.sbatch, Dockerfile) are not package code."""
