"""The SDK's public surface and packaging, and that its generated stubs match the protos."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import ragserve
from ragserve import _errors, _protocol

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
            "PermissionDeniedError",
            "RagserveError",
            "RankedDocument",
            "RerankResult",
            "GenerateResult",
            "ServerError",
            "TextDelta",
            "UnauthenticatedError",
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


def test_auth_status_codes_map_to_their_errors():
    assert isinstance(_errors.error_for_code(grpc.StatusCode.UNAUTHENTICATED, "no key"), ragserve.UnauthenticatedError)
    assert isinstance(_errors.error_for_code(grpc.StatusCode.PERMISSION_DENIED, "not Embed"), ragserve.PermissionDeniedError)


def test_api_key_goes_as_a_bearer_token():
    assert _protocol.call_metadata((("x-request-id", "r1"),), "rs_secret") == (
        ("x-request-id", "r1"),
        ("authorization", "Bearer rs_secret"),
    )
    assert _protocol.call_metadata((), None) == ()
    for bad in ("", "two\nlines"):
        with pytest.raises(ValueError, match="api_key"):
            ragserve.Client(api_key=bad)


def test_certificates_as_bytes_or_paths(tmp_path):
    pem = b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"
    (tmp_path / "ca.pem").write_bytes(pem)
    assert _protocol._pem(pem, "root_certificates") == pem
    assert _protocol._pem(str(tmp_path / "ca.pem"), "root_certificates") == pem
    assert _protocol._pem(tmp_path / "ca.pem", "root_certificates") == pem
    with pytest.raises(ValueError, match="root_certificates: cannot read"):
        ragserve.Client(root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="go together"):
        ragserve.Client(root_certificates=pem, private_key=pem)
    assert _protocol.channel_credentials(False, None, None, None) is None
    assert isinstance(_protocol.channel_credentials(True, None, None, None), grpc.ChannelCredentials)
