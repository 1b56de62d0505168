"""The live server (`safe-dit study serve` under uvicorn, in a subprocess): votes survive SIGKILL, and raw
requests that no client library would normalise are refused."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx

from conftest import Server
from safe_dit.study.store import Study, Votes


def raw_get(url: str, target: str) -> bytes:
    """One HTTP/1.1 GET of ``target`` exactly as written (no path normalisation on the way)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_no_answered_vote_is_lost_when_the_server_is_killed(study_dir, tmp_path):
    db = tmp_path / "votes.sqlite"
    server = Server(study_dir, db).start()
    answered = []
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for rater in ("kim", "lee"):
                for _ in range(3):
                    pair = client.get("/api/next", params=dict(rater=rater)).json()["pair"]
                    r = client.post("/api/vote", json=dict(rater=rater, pair=pair, choice="left"))
                    assert r.status_code == 200
                    answered.append((rater, pair))
        server.kill()  # SIGKILL: no shutdown handler, no checkpoint
        assert server.proc.returncode == -9
        restarted = Server(study_dir, db).start()
        try:
            with httpx.Client(base_url=restarted.url, timeout=30) as client:
                for rater in ("kim", "lee"):
                    state = client.get("/api/next", params=dict(rater=rater)).json()
                    assert state["voted"] == 3 and state["pair"] not in {p for r, p in answered if r == rater}
                again = client.post("/api/vote", json=dict(rater="kim", pair=answered[0][1], choice="right"))
                assert again.status_code == 409  # the refusal of a second vote survives the restart too
        finally:
            restarted.stop()
    finally:
        server.stop()
    store = Votes(db, Study(study_dir, verify=False), read_only=True)
    try:
        assert sorted((v["rater"], v["pair"]) for v in store.all()) == sorted(answered)
    finally:
        store.close()


def test_raw_traversal_requests_are_refused(server, study_dir):
    name = Study(study_dir).manifest["pairs"][0]["a"]["image"]
    assert raw_get(server.url, f"/images/{name}").startswith(b"HTTP/1.1 200")
    for target in ("/images/../manifest.json", "/images/../../../../etc/passwd", f"/images/{name}/../../manifest.json",
                   "/images/..%2fmanifest.json", "/images/%2e%2e%2fmanifest.json", "/static/../server.py",
                   "/images//etc/passwd", "/../manifest.json"):
        reply = raw_get(server.url, target)
        assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 404 Not Found",
                                             b"HTTP/1.1 400 Bad Request"), (target, reply[:80])
        assert b'"sha256"' not in reply and b"root:" not in reply
