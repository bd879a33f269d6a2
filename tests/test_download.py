"""download_file against a real local HTTP server; safe_extract_tar against hand-built tarballs."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from d2v.data import download as dl
from d2v.data.download import download_file, safe_extract_tar

GOOD = bytes(range(256)) * 1200  # 300 KiB: several read() chunks on the client side
OTHER = b"x" * 5000


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Routes: /good (Range-capable), /corrupt (other bytes), /flaky (cut on the first request,
    then Range-capable), /flaky-norange (cut first, then always 200), /always-cut, /missing (404)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            n = sum(1 for p, _ in srv.requests if p == path)
        if path == "/good":
            return self._send(GOOD, ranged=True)
        if path == "/corrupt":
            return self._send(OTHER, ranged=True)
        if path == "/flaky":
            return self._cut(GOOD) if n == 1 else self._send(GOOD, ranged=True)
        if path == "/flaky-norange":
            return self._cut(GOOD) if n == 1 else self._send(GOOD, ranged=False)
        if path == "/always-cut":
            return self._cut(GOOD, ranged=True)
        self.send_error(404, "Not Found")

    def _send(self, data: bytes, ranged: bool):
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if ranged and m:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        if ranged:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _cut(self, data: bytes, ranged: bool = False):
        """Announce the full length, send about 40 % of it, then drop the connection."""
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(m.group(1)) if ranged and m else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: max(1, len(body) * 2 // 5)])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests = []
    srv.lock = threading.Lock()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _fast(monkeypatch, server):
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    server.requests.clear()


def requests_for(server, path):
    return [r for p, r in server.requests if p == path]


def test_good_file(server, tmp_path):
    dest = tmp_path / "sub" / "good.bin"
    out = download_file(f"{server.url}/good", dest, sha256=sha(GOOD), md5=hashlib.md5(GOOD).hexdigest(),
                        progress=False)
    assert out == dest and dest.read_bytes() == GOOD
    assert not dest.with_suffix(".bin.part").exists()
    # Present with the right checksum: no request at all.
    server.requests.clear()
    assert download_file(f"{server.url}/good", dest, sha256=sha(GOOD).upper(), progress=False) == dest
    assert server.requests == []


def test_existing_dest_with_wrong_checksum_is_replaced(server, tmp_path):
    dest = tmp_path / "good.bin"
    dest.write_bytes(b"stale")
    download_file(f"{server.url}/good", dest, sha256=sha(GOOD), progress=False)
    assert dest.read_bytes() == GOOD


def test_checksum_mismatch_deletes_part_and_names_digests(server, tmp_path):
    dest = tmp_path / "corrupt.bin"
    with pytest.raises(ValueError) as ei:
        download_file(f"{server.url}/corrupt", dest, sha256=sha(GOOD), progress=False)
    msg = str(ei.value)
    assert f"{server.url}/corrupt" in msg and sha(GOOD) in msg and sha(OTHER) in msg
    assert not dest.exists() and not (tmp_path / "corrupt.bin.part").exists()


def test_md5_mismatch(server, tmp_path):
    with pytest.raises(ValueError, match="md5"):
        download_file(f"{server.url}/good", tmp_path / "g.bin", md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cut_connection_is_resumed_with_range(server, tmp_path):
    dest = tmp_path / "flaky.tar.gz"
    download_file(f"{server.url}/flaky", dest, sha256=sha(GOOD), progress=False, retries=2)
    assert dest.read_bytes() == GOOD
    ranges = requests_for(server, "/flaky")
    assert len(ranges) == 2 and ranges[0] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < start < len(GOOD)  # resumed where the cut happened, not restarted
    assert not (tmp_path / "flaky.tar.gz.part").exists()


def test_resume_falls_back_to_restart_on_200(server, tmp_path):
    dest = tmp_path / "nr.bin"
    download_file(f"{server.url}/flaky-norange", dest, sha256=sha(GOOD), progress=False, retries=1)
    assert dest.read_bytes() == GOOD
    ranges = requests_for(server, "/flaky-norange")
    assert len(ranges) == 2 and ranges[1] is not None  # asked to resume, got 200, wrote from zero


def test_existing_part_file_is_resumed(server, tmp_path):
    dest = tmp_path / "good.bin"
    (tmp_path / "good.bin.part").write_bytes(GOOD[:1000])
    download_file(f"{server.url}/good", dest, sha256=sha(GOOD), progress=False)
    assert dest.read_bytes() == GOOD
    assert requests_for(server, "/good") == ["bytes=1000-"]


def test_complete_part_file_gets_416_and_is_accepted(server, tmp_path):
    dest = tmp_path / "good.bin"
    (tmp_path / "good.bin.part").write_bytes(GOOD)
    download_file(f"{server.url}/good", dest, sha256=sha(GOOD), progress=False)
    assert dest.read_bytes() == GOOD


def test_truncated_every_time_is_never_accepted(server, tmp_path):
    dest = tmp_path / "cut.bin"
    with pytest.raises(RuntimeError) as ei:
        download_file(f"{server.url}/always-cut", dest, progress=False, retries=1)
    assert f"{server.url}/always-cut" in str(ei.value) and "truncated" in str(ei.value)
    assert not dest.exists()
    # The second attempt resumed from what the first one got; partial data is kept for a later run.
    ranges = requests_for(server, "/always-cut")
    assert ranges[0] is None and ranges[1] is not None
    assert 0 < (tmp_path / "cut.bin.part").stat().st_size < len(GOOD)


def test_404_is_a_clear_error_without_retries(server, tmp_path):
    with pytest.raises(RuntimeError, match=r"missing.*HTTP 404"):
        download_file(f"{server.url}/missing", tmp_path / "m.bin", progress=False, retries=3)
    assert len(requests_for(server, "/missing")) == 1
    assert not (tmp_path / "m.bin").exists()


def test_connection_refused_after_retries(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/x"
    with pytest.raises(RuntimeError) as ei:
        download_file(url, tmp_path / "x.bin", progress=False, retries=1, timeout=2)
    assert url in str(ei.value) and "2 attempt" in str(ei.value)
    assert "refused" in str(ei.value).lower() or "URLError" in str(ei.value)


# ----------------------------------------------------------------------------- safe_extract_tar


def _tar(path: Path, members: list[tuple[str, str, bytes | str]]) -> Path:
    """members: (kind, name, data) with kind 'file', 'dir', 'sym', 'hard' or 'chr'."""
    with tarfile.open(path, "w:gz") as tf:
        for kind, name, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                       "chr": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "hard"):
                ti.linkname = data
            tf.addfile(ti)
    return path


def test_safe_extract_good(tmp_path):
    tar = _tar(tmp_path / "ok.tar.gz", [("dir", "pkg", b""), ("file", "pkg/a.txt", b"hello"),
                                        ("file", "./pkg/sub/b.bin", b"\x00\x01"), ("file", "pkg/x/../c", b"c")])
    out = tmp_path / "out"
    files = safe_extract_tar(tar, out)
    assert sorted(p.relative_to(out.resolve()).as_posix() for p in files) == ["pkg/a.txt", "pkg/c", "pkg/sub/b.bin"]
    assert (out / "pkg/a.txt").read_bytes() == b"hello"
    assert (out / "pkg/sub/b.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("bad,why", [
    (("file", "../evil", b"x"), "escapes"),
    (("file", "pkg/../../evil", b"x"), "escapes"),
    (("file", "/tmp/d2v-abs-evil", b"x"), "absolute"),
    (("sym", "pkg/link", "/etc/passwd"), "symlink"),
    (("hard", "pkg/hl", "pkg/a.txt"), "hardlink"),
    (("chr", "pkg/dev", b""), "device"),
])
def test_safe_extract_refuses(tmp_path, bad, why):
    # The bad member comes last: the good ones before it must not be written either.
    tar = _tar(tmp_path / "bad.tar.gz", [("dir", "pkg", b""), ("file", "pkg/a.txt", b"ok"), bad])
    out = tmp_path / "out"
    with pytest.raises(ValueError) as ei:
        safe_extract_tar(tar, out)
    msg = str(ei.value)
    assert why in msg and bad[1] in msg and "bad.tar.gz" in msg
    assert not out.exists()
    assert not (tmp_path / "evil").exists() and not Path("/tmp/d2v-abs-evil").exists()
