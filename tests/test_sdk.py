"""The SDK's public surface and packaging, and that its generated stubs match the protos."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import ragserve

ROOT = Path(__file__).resolve().parents[1]


def test_exported_members():
    assert sorted(ragserve.__all__) == sorted(
        [
            "AsyncClient",
            "CancelledError",
            "Client",
            "DeadlineExceededError",
            "EmbedResult",
            "InvalidArgumentError",
            "ModelInfo",
            "ModelNotFoundError",
            "OverloadedError",
            "RagserveError",
            "RankedDocument",
            "RerankResult",
            "GenerateResult",
            "ServerError",
            "TextDelta",
            "UnavailableError",
            "Usage",
        ]
    )
    for name in ragserve.__all__:
        assert hasattr(ragserve, name)


def test_sdk_does_not_import_server_dependencies():
    code = "import sys, ragserve; bad = [m for m in ('ragserve_server', 'tritonclient', 'torch', 'tokenizers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_sdk_declares_only_its_own_dependencies():
    text = (ROOT / "client" / "pyproject.toml").read_text()
    assert 'dependencies = ["grpcio>=1.76", "protobuf>=6.31,<7", "numpy>=1.21"]' in text


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    fresh, committed = tmp_path / "ragserve" / "v1", ROOT / "client" / "ragserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"run `make proto`: {mismatch + errors} differ"
