"""Download public cell-image datasets with checksum verification and atomic unpacking.

``download_dataset("bloodmnist", root)`` streams the file into a temporary file inside ``root``,
verifies its checksum (SHA-256 or MD5, whichever the registry knows) and size, then unpacks
archives into a temporary folder that is renamed into place. Any failure removes the partial
files: either the finished dataset exists, or nothing does. See ``datasets/*.md`` for sources,
licences and citations.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cellssl.errors import DataError


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and how to verify it."""

    url: str
    filename: str  # name of the downloaded file
    target: str  # name of the final file/folder under root
    sha256: str | None = None
    md5: str | None = None
    min_bytes: int = 0  # sanity bound when no checksum is known
    archive: bool = False  # unpack (zip / tar) into the target folder
    citation: str = ""


REGISTRY: dict[str, DatasetSource] = {
    # Acevedo et al. 2020, Data in Brief 30:105474; Mendeley Data doi:10.17632/snkd93bnjr.1 (CC BY 4.0).
    # The file is PBC_dataset_normal_DIB.zip (~270 MB). No published checksum: size + zip format checked.
    "pbc": DatasetSource(
        url="https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded",
        filename="PBC_dataset_normal_DIB.zip",
        target="pbc",
        min_bytes=100_000_000,
        archive=True,
        citation="Acevedo et al., Data in Brief 30 (2020) 105474, doi:10.17632/snkd93bnjr.1",
    ),
    # MedMNIST v2 (Yang et al. 2023, Scientific Data 10:41), zenodo record 10519652 (CC BY 4.0);
    # MD5 as published in the medmnist package (INFO["bloodmnist"]["MD5"]).
    "bloodmnist": DatasetSource(
        url="https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1",
        filename="bloodmnist.npz",
        target="bloodmnist.npz",
        md5="7053d0359d879ad8a5505303e11de1dc",
        min_bytes=20_000_000,
        citation="Yang et al., MedMNIST v2, Scientific Data 10 (2023) 41",
    ),
}


def _stream(url: str, dest: Path, progress: bool) -> tuple[str, str, int]:
    """Download ``url`` to ``dest``; return (sha256, md5, size)."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    req = urllib.request.Request(url, headers={"User-Agent": "cellssl-downloader"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp, dest.open("wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
                if progress:
                    pct = f" {100 * size / total:5.1f}%" if total else ""
                    print(f"\r  {dest.name}: {size / 1e6:8.1f} MB{pct}", end="", file=sys.stderr, flush=True)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(f"download of {url} failed ({exc}); check the network or pass url= to a mirror") from None
    if progress:
        print(file=sys.stderr)
    return sha.hexdigest(), md5.hexdigest(), size


def _verify(name: str, src: DatasetSource, sha: str, md5: str, size: int) -> None:
    """Raise DataError when the downloaded bytes do not match what the registry expects."""
    if src.sha256 and sha.lower() != src.sha256.lower():
        raise DataError(f"download of {name} is corrupted: SHA-256 {sha} != expected {src.sha256}; try again")
    if src.md5 and md5.lower() != src.md5.lower():
        raise DataError(f"download of {name} is corrupted: MD5 {md5} != expected {src.md5}; try again")
    if size < src.min_bytes:
        raise DataError(f"download of {name} is too small ({size} bytes, expected at least {src.min_bytes}); try again")


def _unpack(archive: Path, dest: Path) -> None:
    """Extract a zip or tar archive into ``dest`` (refusing paths that escape it)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DataError(f"archive {archive.name} has an unsafe path {member!r}")
                z.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
        else:
            raise DataError(f"{archive.name} is not a zip or tar archive; the download is corrupted or the URL is wrong")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot unpack {archive.name} ({exc}); the download is corrupted") from None
    for junk in dest.rglob("__MACOSX"):
        shutil.rmtree(junk, ignore_errors=True)


def download_dataset(
    name: str,
    root: str | Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download dataset ``name`` (``pbc`` or ``bloodmnist``) under ``root``; return its path.

    Returns the existing path without downloading when it is already there. ``url`` / ``sha256``
    override the registry (a mirror, or tests); a given ``sha256`` replaces the registry's
    checksums. Raises DataError on network failure or checksum mismatch, leaving no files behind.
    """
    if name not in REGISTRY:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(sorted(REGISTRY))}")
    src = REGISTRY[name]
    if url is not None or sha256 is not None:
        src = DatasetSource(
            url=url or src.url, filename=src.filename, target=src.target,
            sha256=sha256 if sha256 is not None else src.sha256,
            md5=None if (sha256 is not None or url is not None) else src.md5,
            min_bytes=0 if url is not None else src.min_bytes,
            archive=src.archive, citation=src.citation,
        )
    root = Path(root)
    final = root / src.target
    if final.exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_file = root / f".{src.filename}.part-{tag}"
    tmp_dir = root / f".{src.target}.tmp-{tag}"
    try:
        sha, md5, size = _stream(src.url, tmp_file, progress)
        _verify(name, src, sha, md5, size)
        if src.archive:
            tmp_dir.mkdir()
            _unpack(tmp_file, tmp_dir)
            os.rename(tmp_dir, final)
        else:
            os.replace(tmp_file, final)
    finally:
        tmp_file.unlink(missing_ok=True)
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final
