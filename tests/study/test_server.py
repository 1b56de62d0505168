"""The rating server through Starlette's test client: blinding, one vote per rater and pair, and every
request it must refuse."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from starlette.testclient import TestClient

from safe_dit.config import SafeDitError
from safe_dit.study.server import MAX_BODY, create_app
from safe_dit.study.store import Study, Votes


@pytest.fixture
def app(study_dir, tmp_path):
    study = Study(study_dir)
    votes = Votes(tmp_path / "votes.sqlite", study)
    with TestClient(create_app(study, votes)) as client:
        yield client, study, votes
    votes.close()


def vote(client, rater, pair, choice):
    return client.post("/api/vote", json=dict(rater=rater, pair=pair, choice=choice))


def test_the_page_and_its_assets_are_served(app):
    client, _, _ = app
    page = client.get("/")
    assert page.status_code == 200 and 'id="rater"' in page.text and "/static/app.js" in page.text
    assert "ArrowLeft" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_pairs_are_blinded_and_left_right_is_drawn_per_rater(app):
    client, study, _ = app
    sides = {}
    for rater in ("r1", "r2", "r3", "r4", "r5", "r6"):
        state = client.get("/api/next", params=dict(rater=rater)).json()
        assert set(state) == {"rater", "voted", "total", "done", "pair", "prompt", "left", "right"}  # no side names
        pair = study.pairs[state["pair"]]
        shown = {state["left"].removeprefix("/images/"), state["right"].removeprefix("/images/")}
        assert shown == {pair["a"]["image"], pair["b"]["image"]}
        sides[rater] = study.images[state["left"].removeprefix("/images/")]
        for name in shown:
            assert client.get(f"/images/{name}").content == (study.folder / "images" / name).read_bytes()
    # 6 raters, a fair coin each: all on one side has probability 1/32
    assert len(set(sides.values())) == 2 or pytest.skip("all six left sides fell on one setting (p = 1/32)")


def test_each_rater_sees_every_pair_once_and_then_is_done(app):
    client, study, votes = app
    seen = []
    state = client.get("/api/next", params=dict(rater="ann")).json()
    for i, key in enumerate(["left", "right", "same", "left", "left", "right"]):
        assert (state["voted"], state["total"], state["done"]) == (i, 6, False)
        seen.append(state["pair"])
        state = vote(client, "ann", state["pair"], key).json()
    assert state["done"] and state["voted"] == 6 and "pair" not in state
    assert sorted(seen) == sorted(study.pairs)
    rows = votes.all()
    assert [r["key"] for r in rows] == ["left", "right", "same", "left", "left", "right"]
    for r in rows:  # what was pressed, mapped through what was shown, is the setting stored
        expected = ("same" if r["key"] == "same" else r["left"] if r["key"] == "left"
                    else {"a": "b", "b": "a"}[r["left"]])
        assert r["choice"] == expected and r["left"] == votes.left("ann", r["pair"])


@pytest.mark.parametrize("body, status, message", [
    (dict(rater="eve", pair="p999", choice="left"), 404, "unknown pair"),
    (dict(rater="eve", pair="../p000", choice="left"), 404, "unknown pair"),
    (dict(pair="p000", choice="left"), 400, "missing rater"),
    (dict(rater="", pair="p000", choice="left"), 400, "missing rater"),
    (dict(rater="eve smith", pair="p000", choice="left"), 400, "bad rater id"),
    (dict(rater="x" * 65, pair="p000", choice="left"), 400, "bad rater id"),
    (dict(rater=7, pair="p000", choice="left"), 400, "missing rater"),
    (dict(rater="eve", pair="p000", choice="a"), 400, "choice must be one of"),
    (dict(rater="eve", pair="p000"), 400, "choice must be one of"),
    (dict(rater="eve", pair="p000", choice="left", left="a"), 400, "exactly rater, pair and choice"),
    (["eve", "p000", "left"], 400, "exactly rater, pair and choice"),
])
def test_malformed_votes_are_refused_and_not_stored(app, body, status, message):
    client, _, votes = app
    r = client.post("/api/vote", json=body)
    assert r.status_code == status and message in r.json()["error"]
    assert votes.all() == []


def test_non_json_oversized_and_duplicate_votes_are_refused(app):
    client, _, votes = app
    assert client.post("/api/vote", content=b"rater=eve").status_code == 400
    assert client.post("/api/vote", content=b"\xff\xfe").status_code == 400
    big = json.dumps(dict(rater="eve", pair="p000", choice="left", pad="x" * MAX_BODY)).encode()
    assert client.post("/api/vote", content=big).status_code == 413
    chunks = (b"x" * 512 for _ in range(4))  # no Content-Length: streamed, cut at the limit
    assert client.post("/api/vote", content=chunks).status_code == 413
    assert client.post("/api/vote", content=b"{}", headers={"content-length": "-1"}).status_code == 400
    assert vote(client, "eve", "p000", "left").status_code == 200
    again = vote(client, "eve", "p000", "right")
    assert again.status_code == 409 and "already voted" in again.json()["error"]
    assert vote(client, "zoe", "p000", "right").status_code == 200  # another rater may
    assert [(v["rater"], v["key"]) for v in votes.all()] == [("eve", "left"), ("zoe", "right")]
    assert client.get("/api/vote").status_code == 405
    assert client.get("/api/next").status_code == 400


@pytest.mark.parametrize("path", [
    "/images/manifest.json", "/images/../manifest.json", "/images/..%2fmanifest.json", "/images/%2e%2e/manifest.json",
    "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/images/0000000000000000.png",
    "/static/..%2fserver.py", "/static/index.html", "/votes.sqlite",
])
def test_nothing_but_the_study_images_and_page_assets_is_served(app, path):
    client, _, _ = app
    r = client.get(path)
    assert r.status_code == 404 and b"import" not in r.content and b"root:" not in r.content


def test_a_tampered_or_foreign_study_is_refused_at_start(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    first = Study(copy).manifest["pairs"][0]["a"]["image"]
    Votes(tmp_path / "votes.sqlite", Study(copy)).close()
    (copy / "images" / first).write_bytes(b"not the image")
    with pytest.raises(SafeDitError, match="does not match the sha256"):
        Study(copy)
    (copy / "images" / first).unlink()
    with pytest.raises(SafeDitError, match="is missing"):
        Study(copy)
    shutil.copy(study_dir / "images" / first, copy / "images" / first)
    m = json.loads((copy / "manifest.json").read_text())
    m["pairs"][0]["prompt"] = "another prompt"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SafeDitError, match="votes of another study"):
        Votes(tmp_path / "votes.sqlite", Study(copy))
    m["pairs"][0]["a"]["image"] = "../../x.png"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SafeDitError, match="outside images/"):
        Study(copy)


def test_votes_are_in_wal_mode_with_the_pair_key_enforced_by_sqlite(app, tmp_path):
    client, _, _ = app
    assert vote(client, "ann", "p001", "same").status_code == 200
    conn = sqlite3.connect(tmp_path / "votes.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO votes VALUES ('ann', 'p001', 'a', 'left', 'a', 0)")
    conn.close()
