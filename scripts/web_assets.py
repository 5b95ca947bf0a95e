#!/usr/bin/env python3
"""Put the web console's browser libraries (xterm.js, noVNC) in place from their npm registry
packages, pinned by entrypoints/web/vendor.lock.json (name, version, tarball URL, sha512 integrity).

    python3 scripts/web_assets.py              fetch, verify and extract what is missing (idempotent)
    python3 scripts/web_assets.py --check      exit 1 unless every locked package is in place
    python3 scripts/web_assets.py lock NAME@VERSION ...   (maintainers) pin packages from the registry

Standard library only (it runs before the virtual environment exists, from scripts/install.sh and
scripts/test.sh). A tarball whose sha512 differs from the lock is refused, nothing is extracted. Files
land in entrypoints/web/static/vendor/<name>/ (git-ignored), only the paths the lock lists, never
outside that directory; no Node is needed at run time or to install.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "entrypoints" / "web" / "vendor.lock.json"
VENDOR = REPO / "entrypoints" / "web" / "static" / "vendor"
REGISTRY = "https://registry.npmjs.org/"
MARKER = ".integrity"
MAX_TARBALL = 32 * 1024 * 1024


def fetch(url: str) -> bytes:
    if not url.startswith(REGISTRY):
        raise SystemExit(f"error: {url} is not on {REGISTRY}")
    request = urllib.request.Request(url, headers={"User-Agent": "manage-playrservers web_assets"})  # noqa: S310 - https registry only
    with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - https registry only
        data: bytes = answer.read(MAX_TARBALL + 1)
    if len(data) > MAX_TARBALL:
        raise SystemExit(f"error: {url} is over {MAX_TARBALL} bytes")
    return data


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def target_of(name: str) -> Path:
    return VENDOR / name.lstrip("@").replace("/", "__")


def in_place(entry: dict[str, object]) -> bool:
    marker = target_of(str(entry["name"])) / MARKER
    return marker.is_file() and marker.read_text().strip() == entry["integrity"]


def install(entry: dict[str, object]) -> None:
    name, integrity = str(entry["name"]), str(entry["integrity"])
    data = fetch(str(entry["tarball"]))
    if integrity_of(data) != integrity:
        raise SystemExit(f"error: {name} {entry['version']}: the tarball's sha512 is not the locked one; refusing it")
    wanted = [PurePosixPath(str(p)) for p in entry["files"]]  # type: ignore[attr-defined]
    target = target_of(name)
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            path = PurePosixPath(member.name)
            if not member.isfile() or path.parts[:1] != ("package",) or ".." in path.parts:
                continue
            inside = PurePosixPath(*path.parts[1:])
            if not any(inside == w or w in inside.parents for w in wanted):
                continue
            destination = staging.joinpath(*inside.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            destination.write_bytes(source.read())
            os.chmod(destination, 0o644)
    (staging / MARKER).write_text(integrity + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"web asset {name} {entry['version']} in place ({target.relative_to(REPO)})")


def lock(specs: list[str]) -> None:
    entries = {e["name"]: e for e in json.loads(LOCK.read_text())["packages"]} if LOCK.exists() else {}
    for spec in specs:
        name, _, version = spec.rpartition("@")
        meta = json.loads(fetch(f"{REGISTRY}{name.replace('/', '%2f')}/{version}"))
        old = entries.get(name, {})
        entries[name] = {"name": name, "version": version, "tarball": meta["dist"]["tarball"],
                         "integrity": meta["dist"]["integrity"], "files": old.get("files", ["LICENSE"])}
    LOCK.write_text(json.dumps({"packages": sorted(entries.values(), key=lambda e: e["name"])}, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["lock"]:
        lock(argv[1:])
        return 0
    entries = json.loads(LOCK.read_text())["packages"]
    missing = [e for e in entries if not in_place(e)]
    if argv[:1] == ["--check"]:
        for entry in missing:
            print(f"missing web asset {entry['name']} {entry['version']}: run python3 scripts/web_assets.py",
                  file=sys.stderr)
        return 1 if missing else 0
    for entry in missing:
        install(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
