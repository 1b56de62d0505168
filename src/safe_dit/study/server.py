"""Serve a study's blinded rating page (on 127.0.0.1 unless --host says otherwise).

A rater enters an id, then sees each pair once, in an order of their own, each time with the prompt and the
two images side by side, left and right drawn at random per rater and pair; neither the page nor the image
URLs say which setting made which image. Keys: <- (left is better), -> (right is better), = (the same);
the buttons do the same. The progress bar counts the pairs rated; a rater who comes back resumes where they
stopped.

Votes go to DIR/votes.sqlite (--db elsewhere): SQLite in WAL mode, one transaction per vote, so a vote the
page has seen accepted survives the server being killed. Refused: a second vote of a rater on a pair (409),
unknown pairs and images (404), a missing or malformed rater id, choice or JSON body (400), bodies over
1 KiB (413), any image path that is not one of the study's images (404, traversal included).

  safe-dit study serve studies/dense-fp-vs-safe-core        # then open http://127.0.0.1:8000/
  safe-dit study serve studies/mine --port 0                 # any free port; the URL is printed
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
from pathlib import Path

from safe_dit.config import SafeDitError
from safe_dit.study.store import RATER, RATER_HINT, Study, Votes, default_db

logger = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "page"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_BODY = 1024  # bytes: a vote is {"rater": ..., "pair": ..., "choice": ...}
KEYS = ("left", "right", "same")


def _needs():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise SafeDitError(f"`safe-dit study serve` needs Starlette and uvicorn ({err.name} is missing): "
                           "pip install 'safe-dit[study]'") from None


def create_app(study: Study, votes: Votes):
    """The Starlette application of one study and its vote store."""
    _needs()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route

    total = len(study.pairs)
    page = (PAGE / "index.html").read_text()

    def rater_of(value) -> str:
        if not isinstance(value, str) or not value:
            raise HTTPException(400, "missing rater id")
        if not RATER.fullmatch(value):
            raise HTTPException(400, f"bad rater id: {RATER_HINT}")
        return value

    def progress(rater: str) -> dict:
        done = votes.voted(rater)
        left = [p for p in votes.order(rater) if p not in done]
        out = dict(rater=rater, voted=len(done), total=total, done=not left)
        if left:
            pair = study.pairs[left[0]]
            first = votes.left(rater, pair["id"])
            second = "b" if first == "a" else "a"
            out.update(pair=pair["id"], prompt=pair["prompt"], left=f"/images/{pair[first]['image']}",
                       right=f"/images/{pair[second]['image']}")
        return out

    async def index(request: Request):
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def asset(request: Request):
        name = request.path_params["name"]
        if name not in ASSETS:
            raise HTTPException(404, "no such file")
        return FileResponse(PAGE / name, media_type=ASSETS[name])

    async def image(request: Request):
        path = study.image_path(request.path_params["name"])
        if path is None:
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def next_pair(request: Request):
        return JSONResponse(progress(rater_of(request.query_params.get("rater"))),
                            headers={"Cache-Control": "no-store"})

    async def vote(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit()):
            raise HTTPException(400, "bad Content-Length")
        if length is not None and int(length) > MAX_BODY:
            raise HTTPException(413, f"a vote is at most {MAX_BODY} bytes")
        body = b""
        async for chunk in request.stream():  # also bounds a body sent without a length
            body += chunk
            if len(body) > MAX_BODY:
                raise HTTPException(413, f"a vote is at most {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "the body must be a JSON object {rater, pair, choice}") from None
        if not isinstance(data, dict) or set(data) - {"rater", "pair", "choice"}:
            raise HTTPException(400, "the body must be a JSON object with exactly rater, pair and choice")
        rater = rater_of(data.get("rater"))
        pair, key = data.get("pair"), data.get("choice")
        if not isinstance(pair, str) or pair not in study.pairs:
            raise HTTPException(404, "unknown pair")
        if key not in KEYS:
            raise HTTPException(400, f"choice must be one of {', '.join(KEYS)}")
        if not votes.add(rater, pair, key):
            raise HTTPException(409, "this rater has already voted on this pair")
        return JSONResponse(progress(rater))

    async def error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [
        Route("/", index),
        Route("/static/{name}", asset),
        Route("/images/{name:path}", image),  # :path, so that a name with '/' reaches the check and is refused
        Route("/api/next", next_pair),
        Route("/api/vote", vote, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: error})


def configure_parser(p) -> None:
    p.add_argument("study", metavar="DIR", help="a study folder written by `safe-dit study make`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback lets other "
                                                       "machines rate (and vote)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 takes any free one (the URL is printed)")
    p.add_argument("--db", metavar="PATH", help="the votes database (None: DIR/votes.sqlite)")
    p.set_defaults(func=run)


def run(args) -> int:
    _needs()
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise SafeDitError(f"--port must be in 0..65535, got {args.port}")
    study = Study(args.study)
    db = Path(args.db) if args.db else default_db(args.study)
    if not db.parent.is_dir():
        raise SafeDitError(f"--db {str(db)!r}: the folder {str(db.parent)!r} does not exist")
    votes = Votes(db, study)
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(64)  # connections wait in the backlog until uvicorn accepts them
    except (OSError, UnicodeError) as err:
        raise SafeDitError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    try:
        if not _loopback(args.host):
            logger.warning("listening on %s: anyone who can reach this machine can open the page and vote", args.host)
        port = sock.getsockname()[1]
        host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
        print(f"serving {len(study.pairs)} pairs of {args.study} at http://{host}:{port}/  "
              f"(votes: {db}; Ctrl-C stops)",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(create_app(study, votes), log_level="warning", lifespan="off", access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        votes.close()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
