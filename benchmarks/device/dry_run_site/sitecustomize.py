"""Dry runs of the device suite only: make the packages that do not travel to the GPU machine unimportable.

``run.sh --dry-run`` puts this folder on ``PYTHONPATH``, so every process of the dry run (benchmarks, their
DataLoader workers, pytest) sees ``HISTOBENCH_SUITE_ABSENT`` (comma-separated top-level module names, by
default ``mlflow,sksurv``) as missing, as on the device, even though this machine's venv has them. A part that
still needs one of them fails the dry run instead of failing on the GPU.
"""

import importlib.abc
import os
import sys

_ABSENT = {n.strip() for n in os.environ.get("HISTOBENCH_SUITE_ABSENT", "mlflow,sksurv").split(",") if n.strip()}


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _ABSENT:
            raise ModuleNotFoundError(f"No module named {fullname!r} (absent on the GPU machine: device-suite dry run)",
                                      name=fullname)
        return None


if _ABSENT:
    sys.meta_path.insert(0, _Absent())
