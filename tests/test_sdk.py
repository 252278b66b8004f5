"""The SDK's public surface and packaging, and that its generated stubs match the protos."""

from __future__ import annotations

import ast
import filecmp
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

import ragserve
from ragserve import _channel, _errors, _protocol

ROOT = Path(__file__).resolve().parents[1]


def test_exported_members():
    assert sorted(ragserve.__all__) == sorted(
        [
            "AsyncClient",
            "CancelledError",
            "Client",
            "DeadlineExceededError",
            "EmbedBatch",
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
            "SparseEmbedding",
            "TextDelta",
            "TokenLogprob",
            "TopLogprob",
            "TokenizeResult",
            "TokenizedText",
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


def test_sdk_declares_only_its_own_dependencies_and_ships_py_typed():
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == ["grpcio>=1.76", "protobuf>=5.26,<7", "numpy>=1.21"]
    assert project["tool"]["setuptools"]["package-data"]["ragserve"] == ["py.typed"]
    assert (ROOT / "client" / "ragserve" / "py.typed").is_file()


# Top-level module -> the distribution that provides it.
DISTRIBUTIONS = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google": "protobuf",
    "tritonclient": "tritonclient",
    "numpy": "numpy",
    "tokenizers": "tokenizers",
    "transformers": "transformers",
    "structlog": "structlog",
    "prometheus_client": "prometheus-client",
    "ragserve": "ragserve",
    "torch": "torch",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "opentelemetry": "opentelemetry-api",
    "dnslib": "dnslib",
    "uvloop": "uvloop",
}


def test_server_declares_what_it_imports():
    """Every third-party module ragserve_server imports is a dependency (or an extra) of server/pyproject.toml."""
    project = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        declared |= {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() for d in extra}
    imported = set()
    for path in (ROOT / "server" / "ragserve_server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"ragserve_server", "__future__"}
    unknown = sorted(third_party - set(DISTRIBUTIONS))
    assert not unknown, f"add these imports to DISTRIBUTIONS (and their distributions to server/pyproject.toml): {unknown}"
    missing = sorted(DISTRIBUTIONS[m] for m in third_party if DISTRIBUTIONS[m] not in declared)
    assert not missing, f"server/pyproject.toml does not declare {missing}"


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
    assert _channel.call_metadata((("x-request-id", "r1"),), "rs_secret") == (
        ("x-request-id", "r1"),
        ("authorization", "Bearer rs_secret"),
    )
    assert _channel.call_metadata((), None) == ()
    for bad in ("", "two\nlines"):
        with pytest.raises(ValueError, match="api_key"):
            ragserve.Client(api_key=bad)


def test_certificates_as_bytes_or_paths(tmp_path):
    pem = b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"
    (tmp_path / "ca.pem").write_bytes(pem)
    assert _channel._pem(pem, "root_certificates") == pem
    assert _channel._pem(str(tmp_path / "ca.pem"), "root_certificates") == pem
    assert _channel._pem(tmp_path / "ca.pem", "root_certificates") == pem
    with pytest.raises(ValueError, match="root_certificates: cannot read"):
        ragserve.Client(root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="go together"):
        ragserve.Client(root_certificates=pem, private_key=pem)
    assert _channel.channel_credentials(False, None, None, None) is None
    assert isinstance(_channel.channel_credentials(True, None, None, None), grpc.ChannelCredentials)
