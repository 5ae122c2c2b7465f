"""hpcconv: Docker/OCI images to HPC container images."""

__version__ = "0.1.0"
