"""Studio: the web page that tries and explains a model, served at `/studio` by the app that answers its calls.

`add_studio(app)` is the one line an app needs (`add_studio(app, server="hub")` on the hub, whose page then
shows the hub's views too): `GET /studio` is the page, `GET /studio/static/<name>` one of the files directly in
`static/` (looked up by name in a listing made when the routes are added, so no request can name a file outside
the folder). The page and its files are public and hold nothing secret;
everything they show comes from the app's own routes, which ask for the API key when the app has one.
The files are plain HTML, CSS and ES modules: no build step, no CDN, the page works offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response

from models.errors import ErrorCode

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# the page runs only its own scripts and talks only to its own server; images come from the user's files
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
SERVERS = ("serve", "hub")  # what the page is served by: index.html's <body data-server>, which its script reads


def static_files(folder: Path = STATIC) -> dict[str, Path]:
    """The files the page may load: name → path, for the files directly in `folder` of a known type."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in TYPES}


def _send(path: Path, server: str = "serve") -> Response:
    body = path.read_bytes()
    if server != "serve":
        body = body.replace(b'data-server="serve"', f'data-server="{server}"'.encode(), 1)
    return Response(body, media_type=TYPES[path.suffix], headers=HEADERS)


def add_studio(app: FastAPI, path: str = "/studio", server: str = "serve") -> None:
    """The page's routes on `app`: `path` (the page), `path/` (redirected to it), `path/static/<name>`; `server`
    ("serve" or "hub") tells the page which views to show."""
    if server not in SERVERS:
        raise ValueError(f"server={server!r}: one of {', '.join(SERVERS)}")
    files = static_files()

    @app.get(path, include_in_schema=False)
    async def studio_page() -> Response:
        return _send(files["index.html"], server)

    @app.get(path + "/", include_in_schema=False)
    async def studio_slash() -> Response:
        # relative, so that it holds under any route prefix: <prefix>/studio/ → <prefix>/studio
        return RedirectResponse("../" + path.rsplit("/", 1)[-1], status_code=308)

    @app.get(path + "/static/{name}", include_in_schema=False)
    async def studio_file(name: str) -> Response:
        found = files.get(name)
        if found is None:
            return JSONResponse({"error": {"code": ErrorCode.NOT_FOUND, "message": f"no studio file named {name!r}"}}, 404,
                                headers={"x-content-type-options": "nosniff"})
        return _send(found)
