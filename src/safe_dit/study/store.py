"""A study folder as the server and the report read it, and its votes in SQLite.

The votes live in one SQLite file in WAL mode with ``synchronous=FULL``, one transaction per vote: a vote the
server has answered is on disk, whatever happens to the process afterwards. The primary key (rater, pair)
is what refuses a second vote of a rater on a pair, in the database itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from safe_dit.config import SafeDitError
from safe_dit.study import FORMAT, IMAGES, MANIFEST, VOTES

RATER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
RATER_HINT = "1-64 characters: letters, digits and _ . @ -, starting with a letter or digit"
_IMAGE_NAME = re.compile(r"[0-9a-f]{16}\.png")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    rater    TEXT NOT NULL,
    pair     TEXT NOT NULL,
    choice   TEXT NOT NULL CHECK (choice IN ('a', 'b', 'same')),  -- the setting preferred, unblinded
    key      TEXT NOT NULL CHECK (key IN ('left', 'right', 'same')),  -- what the rater pressed
    left     TEXT NOT NULL CHECK (left IN ('a', 'b')),  -- the setting shown on the left
    voted_at REAL NOT NULL,
    PRIMARY KEY (rater, pair)
);
"""


class Study:
    """A study folder: its manifest, pairs and image files, checked against the hashes the manifest records."""

    def __init__(self, folder: Path | str, verify: bool = True):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise SafeDitError(f"{str(self.folder)!r} holds no study ({MANIFEST} missing): make one with "
                               f"`safe-dit study make --a dense-fp --b safe-core --out {self.folder}`")
        try:
            self.manifest = json.loads(path.read_text())
            if self.manifest.get("format") != FORMAT:
                raise ValueError(f"format {self.manifest.get('format')!r}, expected {FORMAT!r}")
            self.pairs = {p["id"]: p for p in self.manifest["pairs"]}
            self.images = {p[k]["image"]: k for p in self.manifest["pairs"] for k in ("a", "b")}
            hashes = self.manifest["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise SafeDitError(f"{str(path)!r} is not a safe-dit study manifest "
                               f"({type(err).__name__}: {err})") from None
        if not self.pairs:
            raise SafeDitError(f"{str(path)!r} lists no pairs")
        for name in self.images:
            if not _IMAGE_NAME.fullmatch(name):
                raise SafeDitError(f"{str(path)!r} names an image {name!r} outside {IMAGES}/ (a study names them "
                                   f"by 16 hex digits)")
            if verify:
                file = self.folder / IMAGES / name
                if not file.is_file():
                    raise SafeDitError(f"image {IMAGES}/{name} of the study is missing: remake the study")
                digest = hashlib.sha256(file.read_bytes()).hexdigest()
                if digest != hashes.get(f"{IMAGES}/{name}"):
                    raise SafeDitError(f"image {IMAGES}/{name} does not match the sha256 in {MANIFEST}: the study "
                                       f"was changed or half-copied; remake or copy it again")

    @property
    def key(self) -> str:
        """Identifies the study's content (settings, prompts, images), not where its folder lies."""
        record = {k: self.manifest[k] for k in ("a", "b", "pairs", "sha256")}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def image_path(self, name: str) -> Path | None:
        """The file of an image the manifest lists; None for any other name (traversal included)."""
        if name not in self.images:
            return None
        path = (self.folder / IMAGES / name).resolve()
        return path if path.parent == (self.folder / IMAGES).resolve() and path.is_file() else None


class Votes:
    """The votes of one study. ``read_only`` for the report (it may run while the server does)."""

    def __init__(self, db: Path | str, study: Study, read_only: bool = False):
        self.path, self.lock = Path(db), threading.Lock()
        if read_only:
            if not self.path.is_file():
                raise SafeDitError(f"no votes yet: {str(self.path)!r} does not exist (serve the study first)")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                        check_same_thread=False)
        else:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise SafeDitError(f"{str(self.path)!r}: SQLite refused WAL mode here ({mode}); "
                                   "put --db on a local disk")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
        try:
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            raise SafeDitError(f"{str(self.path)!r} is not a votes database of a safe-dit study ({err})") from None
        if meta.get("study") not in (None, study.key):
            raise SafeDitError(f"{str(self.path)!r} holds the votes of another study (its settings, prompts or images "
                               f"differ): serve with another --db, or move the file away")
        if not read_only and "study" not in meta:
            with self.lock:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('study', ?)", (study.key,))
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(16),))
                self.conn.execute("COMMIT")
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        self.secret = meta.get("secret", "")
        self.study = study

    def close(self) -> None:
        self.conn.close()

    # -- the blinding: per rater, a fixed shuffled order of pairs and a fixed left side per pair ---------------
    def _digest(self, *parts: str) -> bytes:
        return hmac.new(self.secret.encode(), "\0".join(parts).encode(), hashlib.sha256).digest()

    def order(self, rater: str) -> list[str]:
        ids = sorted(self.study.pairs)
        random.Random(self._digest("order", rater)).shuffle(ids)
        return ids

    def left(self, rater: str, pair: str) -> str:
        """Which setting, 'a' or 'b', this rater sees on the left of this pair (unguessable without the secret)."""
        return "a" if self._digest("left", rater, pair)[0] & 1 else "b"

    # -- votes ------------------------------------------------------------------------------------------
    def voted(self, rater: str) -> set[str]:
        with self.lock:
            return {r[0] for r in self.conn.execute("SELECT pair FROM votes WHERE rater = ?", (rater,))}

    def add(self, rater: str, pair: str, key: str) -> bool:
        """Record one vote in its own transaction; False when this rater has already voted on this pair."""
        left = self.left(rater, pair)
        choice = "same" if key == "same" else left if key == "left" else ("b" if left == "a" else "a")
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?)",
                                  (rater, pair, choice, key, left, time.time()))
                self.conn.execute("COMMIT")
            except sqlite3.IntegrityError:
                self.conn.execute("ROLLBACK")
                return False
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        return True

    def all(self) -> list[dict]:
        with self.lock:
            rows = self.conn.execute("SELECT rater, pair, choice, key, left, voted_at FROM votes ORDER BY voted_at")
            return [dict(zip(("rater", "pair", "choice", "key", "left", "voted_at"), r)) for r in rows]


def default_db(folder: Path | str) -> Path:
    return Path(folder) / VOTES
