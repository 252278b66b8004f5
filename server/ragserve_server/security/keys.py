"""API keys: the keys file, the store that re-reads it on change, and a helper that makes keys.

The keys file holds one JSON object per line (blank lines and `#` comments are skipped):

    {"name": "search-backend", "sha256": "<64 hex>", "services": ["ragserve.v1.Embed", "ragserve.v1.Rerank"]}
    {"name": "ops", "sha256": "<64 hex>"}
    {"name": "tenant-a", "sha256": "<64 hex>", "max_concurrent": 8, "rate": 20, "burst": 40}

`name` is what the access log and metrics show; `services` (optional, default all) lists the
full gRPC service names the key may call (KEYED_SERVICES). Per-key quotas (optional, see
quotas.py): `max_concurrent` calls of this key at once, and a token bucket of `rate` calls a
second holding at most `burst` (default: max(1, rate)); beyond either the call is refused
RESOURCE_EXHAUSTED with a retry hint. A deleted or emptied file fails closed: every keyed
call is then refused until the file is back (the keys are not kept from memory). Only the SHA-256 of each key is stored. A fast hash
is right here, not bcrypt or scrypt: keys are 256-bit random tokens made by this module, so no
guess can be checked faster than the key space allows, and a slow hash would cost
milliseconds of CPU on every call. The lookup is by digest: timing can only reveal facts about
the digest of a caller's own guess, never about a stored key (that would need a preimage).

Make a key (printed once; give the key to the caller, put the line in the file):

    python -m ragserve_server.security.keys new --name search-backend --services ragserve.v1.Embed ragserve.v1.Rerank
    python -m ragserve_server.security.keys new --name ops --append /etc/ragserve/keys.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from ragserve.v1 import embed_pb2, generate_pb2, models_pb2, rerank_pb2, tokenize_pb2

log = structlog.get_logger("ragserve.keys")

# The one list of service names: short name (the metrics' `service` label) -> full gRPC name.
SERVICES = {
    name: module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (embed_pb2, "Embed"), (rerank_pb2, "Rerank"), (generate_pb2, "Generate"), (models_pb2, "Models"), (tokenize_pb2, "Tokenize"),
    )
}
KEYED_SERVICES = frozenset(SERVICES.values())

KEY_PREFIX = "rs_"  # lets secret scanners and people recognise a ragserve key
_HEX = frozenset("0123456789abcdef")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    services: frozenset[str] | None  # None: every service
    max_concurrent: int | None = None  # calls at once; None: no share of its own
    rate: float | None = None  # calls a second (token bucket); None: no rate
    burst: float | None = None  # the bucket's size

    def may_call(self, service: str) -> bool:
        return self.services is None or service in self.services


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_line(name: str, key: str, services: Iterable[str] | None = None) -> str:
    entry: dict = {"name": name, "sha256": digest(key)}
    if services:
        entry["services"] = sorted(services)
    return json.dumps(entry)


def parse_keys(text: str, source: str = "keys file", known_services: Iterable[str] | None = None) -> dict[str, ApiKey]:
    """Keys by digest. Raises KeysFileError naming the line of the first problem."""
    known = frozenset(known_services) if known_services is not None else None
    keys: dict[str, ApiKey] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KeysFileError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: not a JSON object")
        unknown = set(entry) - _FIELDS
        if unknown:
            raise KeysFileError(f"{where}: unknown fields {sorted(unknown)} ({', '.join(sorted(_FIELDS))})")
        name, hexdigest, services = entry.get("name"), entry.get("sha256"), entry.get("services")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise KeysFileError(f"{where}: name {name!r} is used twice")
        if not isinstance(hexdigest, str) or len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
            raise KeysFileError(f"{where}: 'sha256' must be 64 lower-case hex digits (python -m ragserve_server.security.keys new)")
        if hexdigest in keys:
            raise KeysFileError(f"{where}: the same key as {keys[hexdigest].name!r}")
        if services is not None:
            if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
                raise KeysFileError(f"{where}: 'services' must be a list of service names")
            if known is not None and (bad := sorted(set(services) - known)):
                raise KeysFileError(f"{where}: unknown services {bad}; known: {sorted(known)}")
            services = frozenset(services)
        quota = _quota(entry, where)
        names.add(name)
        keys[hexdigest] = ApiKey(name, hexdigest, services, *quota)
    return keys


_FIELDS = frozenset({"name", "sha256", "services", "max_concurrent", "rate", "burst"})


def _quota(entry: dict, where: str) -> tuple[int | None, float | None, float | None]:
    concurrent, rate, burst = entry.get("max_concurrent"), entry.get("rate"), entry.get("burst")
    if concurrent is not None and (isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1):
        raise KeysFileError(f"{where}: 'max_concurrent' must be a whole number of calls, at least 1")
    for field, value in (("rate", rate), ("burst", burst)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9):
            raise KeysFileError(f"{where}: {field!r} must be a number of calls above 0")
    if burst is not None and rate is None:
        raise KeysFileError(f"{where}: 'burst' needs 'rate' (calls a second)")
    if rate is not None and burst is None:
        burst = max(1.0, float(rate))
    if burst is not None and burst < 1:
        raise KeysFileError(f"{where}: 'burst' must be at least 1 call")
    return concurrent, None if rate is None else float(rate), None if burst is None else float(burst)


class KeyStore:
    """The keys of a keys file, re-read when the file changes (checked at most once per
    `check_interval` seconds, on the calls themselves: no thread). A file that turns bad
    keeps the last good keys and is logged; a deleted or emptied file fails closed (no key is
    valid until it is back: removing the file is how an operator revokes every key at once);
    a bad file at start-up raises KeysFileError."""

    def __init__(self, path: Path | str, known_services: Iterable[str] | None = None, check_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.known_services = frozenset(known_services) if known_services is not None else None
        self.check_interval = check_interval
        self._signature = self._stat()
        if self._signature is None:
            raise KeysFileError(f"keys file {self.path} does not exist")
        self._keys = self._read()
        self._checked = time.monotonic()

    def __len__(self) -> int:
        return len(self._keys)

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> dict[str, ApiKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"keys file {self.path}: {exc}") from None
        return parse_keys(text, str(self.path), self.known_services)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return
        self._checked = now
        signature = self._stat()
        if signature == self._signature:
            return
        if signature is None:
            log.error("api_keys_file_missing", path=str(self.path), keeping=0)
            self._keys, self._signature = {}, None  # fail closed: no file, no keys
            return
        try:
            keys = self._read()
        except KeysFileError as exc:
            log.error("api_keys_reload_failed", path=str(self.path), error=str(exc), keeping=len(self._keys))
            return
        finally:
            self._signature = signature  # a bad file is reported once, not on every call
        self._keys = keys
        (log.info if keys else log.error)("api_keys_reloaded", path=str(self.path), keys=len(keys))

    def lookup(self, key: str) -> ApiKey | None:
        self._maybe_reload()
        return self._keys.get(digest(key))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ragserve_server.security.keys", description="ragserve API keys")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a key: prints the key (once) and its line for the keys file")
    new.add_argument("--name", required=True, help="the key's name, shown in access logs")
    new.add_argument("--services", nargs="*", default=None, help="services it may call, e.g. ragserve.v1.Embed (default: all)")
    new.add_argument("--append", type=Path, default=None, help="also append the line to this keys file")
    digest_cmd = commands.add_parser("hash", help="the keys-file line for an existing key read from stdin")
    digest_cmd.add_argument("--name", required=True)
    digest_cmd.add_argument("--services", nargs="*", default=None)
    args = parser.parse_args(argv)

    key = new_key() if args.command == "new" else sys.stdin.readline().strip()
    if not key:
        parser.error("no key on stdin")
    line = key_line(args.name, key, args.services)
    try:
        parse_keys(line, "the new line", KEYED_SERVICES)
    except KeysFileError as exc:
        parser.error(str(exc))
    if args.command == "new":
        print("the key is shown only now: give it to the caller (stdout, first line)", file=sys.stderr)
        print(key)
    if getattr(args, "append", None) is None:
        print(line)
        return
    existing = parse_keys(args.append.read_text(encoding="utf-8"), str(args.append)) if args.append.exists() else {}
    if any(k.name == args.name for k in existing.values()):
        raise SystemExit(f"{args.append}: a key named {args.name!r} exists already")
    with open(args.append, "a", encoding="utf-8") as out:
        out.write(line + "\n")
    print(f"appended to {args.append}: {line}", file=sys.stderr)

if __name__ == "__main__":
    main()
