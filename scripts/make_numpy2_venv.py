"""Builds .venv/numpy2: a virtualenv over ours that differs only by numpy 2 (requirements-numpy2.txt).

tests/test_numpy2_stub.py starts the bundled Triton from it, so the python-backend stubs run
numpy 2 as they do in a Triton container or a newer venv. The stub takes its packages from the
virtualenv of the python first on PATH (the launcher puts sys.executable's folder there), and
PYTHONPATH does not reach ahead of that virtualenv's own site-packages; hence a virtualenv.
Its site-packages holds numpy 2 and a .pth that adds ours after it (our .pth files included).

    .venv/bin/python scripts/make_numpy2_venv.py .venv/numpy2
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    target = Path(sys.argv[1]).resolve()
    venv.EnvBuilder(clear=True, with_pip=False).create(target)
    purelib = Path(subprocess.check_output([target / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), "-r", str(ROOT / "requirements-numpy2.txt")])
    # After numpy 2 on sys.path: every other package, and our editable installs' .pth files.
    (purelib / "zz_ragserve_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    check = subprocess.check_output([target / "bin" / "python", "-c", "import numpy, onnxruntime; print(numpy.__version__)"], text=True).strip()
    if not check.startswith("2."):
        raise SystemExit(f"{target}: numpy {check}, not 2")
    print(f"{target}: numpy {check} over {sysconfig.get_paths()['purelib']}")


if __name__ == "__main__":
    main()
