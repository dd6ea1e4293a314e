"""Tools for this repository, not for users' code: the loopback RunPod
endpoint (`local_endpoint`), the offline models (`tiny_model`), the
verification protocol (`verify`, run as `test_local.py`) and the relaunch
of a checkout's scripts in `.venv` (`relaunch`)."""
