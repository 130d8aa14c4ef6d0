"""GPGPU-Sim harness for the CUDA kernels: ``python3 -m bench.gpusim`` (see run.py and README.md)."""
