"""``inspect3d review``: a small local web page where QA marks flagged layers.

Standard library only (``http.server``): one thread per connection, each request with its own
connection to the store, so the watchers can keep writing while QA reviews (SQLite WAL, or
PostgreSQL: one queue for the plant). Bound
to 127.0.0.1 by default. Every POST carries the page's token and, from a browser, our own
``Origin`` (a web page elsewhere cannot post decisions for the reviewer); bound to another
address, every request needs the token.

Bounded: at most ``MAX_CONNECTIONS`` connections are served at once (more wait briefly, then
get 503), an idle or slow connection is dropped after ``TIMEOUT_S``, and at most
``RENDER_SLOTS`` pages are rendered together (each holds a job's layers in memory).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from inspect3d.errors import InspectError
from inspect3d.review import decisions, shop
from inspect3d.review.report import environment, flagged_view, when

log = logging.getLogger(__name__)
MAX_BODY = 16_384
MAX_CARDS = 80
MAX_CONNECTIONS = 16
TIMEOUT_S = 10.0
RENDER_SLOTS = 2
ACCEPT_WAIT_S = 0.5
MAX_ID = 2**63 - 1  # the largest id of SQLite and PostgreSQL (BIGINT)
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'self'"
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReviewServer(ThreadingHTTPServer):
    """The HTTP server plus what every request needs: state folder, reviewer, token."""

    daemon_threads = True

    def __init__(
        self, state: Path | shop.Source, host: str, port: int, token: str | None, reviewer: str
    ) -> None:
        self.state, self.reviewer = shop.Source.of(state), reviewer
        self.loopback = is_loopback(host)
        self.token = token or secrets.token_urlsafe(18)
        self.env = environment()
        self._thumbs: dict[tuple, str | None] = {}
        self._lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.render_slots = threading.BoundedSemaphore(RENDER_SLOTS)
        super().__init__((host, port), Handler)

    def process_request(self, request, client_address) -> None:
        """A thread per connection, at most ``MAX_CONNECTIONS`` at once; beyond, 503."""
        if not self.slots.acquire(timeout=ACCEPT_WAIT_S):
            log.warning("%d connections open: refusing %s", MAX_CONNECTIONS, client_address)
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request) -> None:
        try:
            request.settimeout(1.0)
            request.sendall(BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
        return base if self.loopback else f"{base}?token={self.token}"

    def thumb(self, key: tuple, make) -> str | None:
        """Thumbnails are cached for the server's life: layer images do not change."""
        with self._lock:
            if key in self._thumbs:
                return self._thumbs[key]
        uri = make()
        with self._lock:
            self._thumbs[key] = uri
        return uri


class Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "inspect3d-review"
    timeout = TIMEOUT_S  # socket timeout: a half-open or slow connection does not stay

    def log_message(self, fmt: str, *args) -> None:  # requests go to the log, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    # --- guards ----------------------------------------------------------------------------------
    def _host_ok(self) -> bool:
        """On loopback, only our own host names (a rebound DNS name is refused)."""
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return host in ("127.0.0.1", "localhost", "::1")

    def _origin_ok(self) -> bool:
        """A browser's POST names its page's origin: it must be this server's own."""
        origin = self.headers.get("Origin")
        if origin is None:  # not a browser (or an old one): the token still guards
            return self.headers.get("Sec-Fetch-Site") in (None, "same-origin", "none")
        return origin == f"http://{self.headers.get('Host', '')}"

    def _token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.server.token)

    # --- GET: the page ---------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._host_ok():
            return self._text(HTTPStatus.FORBIDDEN, "unexpected Host header")
        if not self.server.loopback and not self._token_ok(_one(query, "token")):
            return self._text(
                HTTPStatus.FORBIDDEN, "token missing or wrong: open the URL printed at start"
            )
        if url.path != "/":
            return self._text(HTTPStatus.NOT_FOUND, "not found")
        try:
            with self.server.render_slots:
                html = self._page(_one(query, "job"))
        except InspectError as exc:
            return self._text(HTTPStatus.BAD_REQUEST, str(exc))
        self._send(HTTPStatus.OK, html.encode(), "text/html; charset=utf-8")

    def _page(self, job_arg: str | None) -> str:
        store = shop.open_store(self.server.state)
        try:
            s = shop.load(store)
            flagged = [j for j in s.jobs if j.flagged]
            job = _pick(flagged, job_arg)
            history = _history(store, job) if job else {}
        finally:
            store.close()
        cards = (
            [self._card(job, x, history.get(x.id, [])) for x in job.flagged[:MAX_CARDS]]
            if job
            else []
        )
        return self.server.env.get_template("review.html").render(
            jobs=flagged, job=job, cards=cards, token=self.server.token,
            token_q="" if self.server.loopback else f"&token={self.server.token}",
            reviewer=self.server.reviewer, reasons=decisions.REASONS,
            confirmed_codes=[c for c, _ in decisions.REASONS["confirmed_defect"]],
            more=len(job.flagged) - MAX_CARDS if job else 0,
        )  # fmt: skip

    def _card(self, job: shop.Job, x: shop.Layer, history: list[dict]) -> dict:
        return {**flagged_view(job, x, self.server.thumb), "history": history}

    # --- POST: a decision ----------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        if not self._origin_ok():
            return self._json(
                HTTPStatus.FORBIDDEN, {"error": "foreign Origin: post from the review page"}
            )
        if urlsplit(self.path).path != "/review":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        form = self._form()
        if form is None:
            return self._json(
                HTTPStatus.BAD_REQUEST, {"error": f"body missing or over {MAX_BODY} bytes"}
            )
        if not self._token_ok(form.get("token")):
            return self._json(
                HTTPStatus.FORBIDDEN, {"error": "token missing or wrong: reload the page"}
            )
        try:
            check_id(form.get("layer_id"))
            review = decisions.check(
                form.get("layer_id"), form.get("decision"), form.get("reason"),
                form.get("note"), self.server.reviewer,
            )  # fmt: skip
            self._json(HTTPStatus.OK, self._record(review))
        except InspectError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

    def _form(self) -> dict[str, str] | None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if n <= 0 or n > MAX_BODY:
            return None
        body = self.rfile.read(n).decode("utf-8", errors="replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def _record(self, review: decisions.Review) -> dict:
        store = shop.open_store(self.server.state)
        try:
            rid = decisions.record(store, review)
            rows = [_plain(r) for r in store.review_history(review.layer_id)]
        finally:
            store.close()
        log.info("review %d: layer %d %s (%s) by %s", rid, review.layer_id, review.decision,
                 review.reason, review.reviewer)  # fmt: skip
        return {"id": rid, "current": rows[0], "history": rows}

    # --- responses -----------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")


def check_id(value: str | None) -> None:
    """A row id from a request: digits, 1 to ``MAX_ID`` (else 400, naming the value)."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_ID:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InspectError(f"layer_id {shown!r} is not valid: use a layer number 1 to {MAX_ID}")


def _one(query: dict, key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _pick(jobs: list[shop.Job], job_arg: str | None) -> shop.Job | None:
    """The job asked for, else the first with layers still to review, else the first."""
    if job_arg is not None:
        job = next((j for j in jobs if str(j.id) == job_arg), None)
        if job is None:
            raise InspectError(f"job {job_arg!r} is not a flagged job of this store")
        return job
    return next((j for j in jobs if j.open_reviews), jobs[0] if jobs else None)


def _history(store, job: shop.Job) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in store.job_reviews(job.id):
        out.setdefault(r["layer_id"], []).append(_plain(r))
    return out


def _plain(row) -> dict:
    d = dict(row)
    d["when"] = when(d["at"])
    d["decision_text"] = decisions.DECISIONS.get(d["decision"], d["decision"])
    return d


def open_server(state: str | Path | None, host: str = "127.0.0.1", port: int = 8765,
                token: str | None = None, reviewer: str | None = None, db: str | None = None,
                cell: str | None = None) -> ReviewServer:  # fmt: skip
    """The review server of a state folder, or of a plant database's queue (``db``: every
    cell, or ``cell``), listening; ``serve`` runs it."""
    src = shop.Source.of(state, db, cell)
    shop.open_store(src).close()  # a clear error now, not on the first request
    if not is_loopback(host) and token is not None and len(token) < 12:
        raise InspectError(f"token of {len(token)} characters is too short: use 12 or more")
    try:
        return ReviewServer(src, host, port, token,
                            reviewer or decisions.default_reviewer())  # fmt: skip
    except OSError as exc:
        raise InspectError(
            f"cannot listen on {host}:{port}: {exc.strerror}; try another port="
        ) from exc


def ready_line(server: ReviewServer) -> str:
    """Where the page is, for the person who started it."""
    return (
        f"review page for {server.state.shown} at {server.url} (reviewer {server.reviewer}); "
        "Ctrl-C stops"
    )


def serve(server: ReviewServer) -> None:
    """Serve until Ctrl-C (SIGINT), then close the server."""
    # a process started in the background by a shell inherits SIGINT ignored: stop on it anyway
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
