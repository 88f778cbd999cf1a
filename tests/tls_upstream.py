"""An HTTPS upstream for the end-to-end tests: serves with the given certificate and
appends each request it receives (method, path, headers) as a JSON line to a file."""

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cert, key, port, record = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


class Handler(BaseHTTPRequestHandler):
    def answer(self):
        with open(record, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "headers": [[k.lower(), v] for k, v in self.headers.items()]}) + "\n")
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, fmt, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
