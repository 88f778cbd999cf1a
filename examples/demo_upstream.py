"""A stand-in vendor API for `make run`: answers 200 only to requests carrying the
real credential, so the demo shows the swap without printing the secret."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ["DEMO_SECRET"]
PORT = int(os.environ.get("DEMO_PORT", "8088"))


class Handler(BaseHTTPRequestHandler):
    def answer(self):
        ok = self.headers.get("Authorization") == f"Bearer {SECRET}"
        body = json.dumps(
            {
                "vendor": "demo",
                "method": self.command,
                "path": self.path,
                "authenticated_with_real_credential": ok,
            }
        ).encode()
        self.send_response(200 if ok else 401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer

    def log_message(self, fmt, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
