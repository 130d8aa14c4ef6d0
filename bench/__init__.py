"""The rtdetrv2_kernels benchmark suite: ``python -m bench`` (the main job) and ``pytest bench/
--benchmark-only``. See cli.py for the run and cases.py for the shapes."""
