"""The Python prerequisites of `bash bench/gpu_check.sh` on a GPU machine, standard library only
(it runs before anything is unpacked, in whatever python3 the machine has). Prints one line
per missing prerequisite, with its fix; prints nothing when all are there. gpu_check.sh's
header lists every prerequisite; it checks the commands and files itself.

    DEVICE_PY=3.12 python3 bench/gpu_check_preflight.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

# Not carried (gpu_check.py CARRIED): the GPU machines have them.
DEVICE_PACKAGES = ("torch", "transformers", "tokenizers", "numpy")


def missing(device_py: str) -> list[str]:
    found = []
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if have != device_py:
        found.append(f"python3 {device_py}: python3 is {have} ({sys.executable}); the carry holds {device_py} wheels and "
                     f"the Triton python-backend stub for {device_py}")
    libpython = Path(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    if not libpython.is_file():
        found.append(f"a shared libpython{have}: {libpython} does not exist, and the python-backend stub links it "
                     f"(install Python's shared library, e.g. the libpython{have} package)")
    for name in DEVICE_PACKAGES:
        if importlib.util.find_spec(name) is None:
            found.append(f"{name}: not importable in {sys.executable} (pip install {name}{'; a CUDA build' if name == 'torch' else ''})")
    if importlib.util.find_spec("numpy") is not None:
        version = _run("import numpy; print(numpy.__version__)")
        if version and int(version.split(".")[0]) < 2:
            found.append(f"numpy >= 2: {sys.executable} has numpy {version} (pip install 'numpy>=2')")
    if importlib.util.find_spec("torch") is not None:
        out = _run("import torch; print(torch.__version__, torch.cuda.is_available())")
        if out is None:
            found.append(f"torch: `import torch` fails in {sys.executable}")
        elif not out.endswith("True"):
            found.append(f"torch with CUDA: torch {out.split()[0]} sees no CUDA device (a CPU build, or no driver)")
    return found


def _run(code: str) -> str | None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return result.stdout.strip() if result.returncode == 0 else None


if __name__ == "__main__":
    for line in missing(os.environ.get("DEVICE_PY", "3.12")):
        print(line)
