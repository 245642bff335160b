"""download_dataset against a local http.server on 127.0.0.1 (never the network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellssl.data.download import REGISTRY, download_dataset
from cellssl.errors import DataError


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve ``tmp_path/www`` on 127.0.0.1 at a random port; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()


def _zip(path: Path) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("PBC_dataset_normal_DIB/neutrophil/a.jpg", b"fake-jpeg-a")
        z.writestr("PBC_dataset_normal_DIB/lymphocyte/b.jpg", b"fake-jpeg-b")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_and_unpack(server: tuple[str, Path], tmp_path: Path) -> None:
    base, www = server
    sha = _zip(www / "pbc.zip")
    root = tmp_path / "data"
    out = download_dataset("pbc", root, url=f"{base}/pbc.zip", sha256=sha, progress=False)
    assert out == root / "pbc"
    assert (out / "PBC_dataset_normal_DIB" / "neutrophil" / "a.jpg").read_bytes() == b"fake-jpeg-a"
    assert sorted(p.name for p in root.iterdir()) == ["pbc"]  # no temp files left
    # already there: returned without downloading (server content no longer matters)
    (www / "pbc.zip").unlink()
    assert download_dataset("pbc", root, url=f"{base}/pbc.zip", sha256=sha, progress=False) == out


def test_wrong_checksum_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    base, www = server
    _zip(www / "pbc.zip")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="corrupted"):
        download_dataset("pbc", root, url=f"{base}/pbc.zip", sha256="0" * 64, progress=False)
    assert list(root.iterdir()) == []


def test_corrupted_archive_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    base, www = server
    (www / "bad.zip").write_bytes(b"PK\x03\x04 this is a broken zip file")
    sha = hashlib.sha256((www / "bad.zip").read_bytes()).hexdigest()
    root = tmp_path / "data"
    with pytest.raises(DataError, match="bad.zip|PBC|not a zip|unpack"):
        download_dataset("pbc", root, url=f"{base}/bad.zip", sha256=sha, progress=False)
    assert list(root.iterdir()) == []


def test_plain_file_download_and_http_error(server: tuple[str, Path], tmp_path: Path) -> None:
    base, www = server
    (www / "b.npz").write_bytes(b"npz-bytes")
    sha = hashlib.sha256(b"npz-bytes").hexdigest()
    out = download_dataset("bloodmnist", tmp_path / "d", url=f"{base}/b.npz", sha256=sha, progress=False)
    assert out.name == "bloodmnist.npz" and out.read_bytes() == b"npz-bytes"
    with pytest.raises(DataError, match="failed"):
        download_dataset("bloodmnist", tmp_path / "e", url=f"{base}/missing.npz", progress=False)
    assert list((tmp_path / "e").iterdir()) == []


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert REGISTRY["bloodmnist"].md5 == "7053d0359d879ad8a5505303e11de1dc"
    assert "snkd93bnjr" in REGISTRY["pbc"].url and REGISTRY["pbc"].archive
    with pytest.raises(DataError, match="unknown dataset 'pcb'"):
        download_dataset("pcb", tmp_path)
