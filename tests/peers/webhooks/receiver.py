"""A webhook receiver for tests/webhooks.rs: verifies every delivery with the
Standard Webhooks reference library (PyPI standardwebhooks) and appends one
JSON line per delivery to a file (so a restarted receiver keeps its history).

Usage: receiver.py SECRET LOG_FILE [PORT] [STATUS]
  PORT 0 picks a free one; STATUS is what it answers to valid deliveries
  (200, or e.g. 503 to make credproxy retry). Prints "LISTENING <port>".
A delivery whose signature does not verify is answered 400 and logged with
"verified": false: the test fails on any such line.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET, LOG = sys.argv[1], sys.argv[2]
PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 0
STATUS = int(sys.argv[4]) if len(sys.argv) > 4 else 200
hook = Webhook(SECRET)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = {"webhook_id": headers.get("webhook-id"), "status": STATUS}
        try:
            payload = hook.verify(body, headers)
            record.update(verified=True, id=payload.get("id"), type=payload.get("type"), data=payload.get("data"))
            status = STATUS
        except WebhookVerificationError as e:
            record.update(verified=False, error=str(e))
            status = 400
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    # The default backlog of 5 overflows when three instances deliver at
    # once: Linux then drops handshakes, a delivery lands late, credproxy's
    # attempt times out after the receiver has logged it, and the retry is
    # a duplicate. Real receivers listen with a deeper queue.
    request_queue_size = 1024
    daemon_threads = True


server = Server(("127.0.0.1", PORT), Handler)
print(f"LISTENING {server.server_address[1]}", flush=True)
server.serve_forever()
