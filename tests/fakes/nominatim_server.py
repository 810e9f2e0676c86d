"""A tiny Nominatim-compatible geocoding server (GET /search) for testing the built-in geocode tool."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FakeNominatim:
    def __init__(self, places: dict[str, tuple[float, float]]):
        self.places = {name.lower(): coords for name, coords in places.items()}
        self.queries: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query).get("q", [""])[0]
                fake.queries.append(query)
                coords = fake.places.get(query.lower())
                body = [] if url.path != "/search" or coords is None else [
                    {"lat": str(coords[0]), "lon": str(coords[1]), "display_name": f"{query}, Earth",
                     "place_id": 1, "osm_type": "node", "osm_id": 1, "boundingbox": []}]
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeNominatim":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
