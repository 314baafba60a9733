#!/usr/bin/env python3
"""An AI-agent receiver for Hookwarden, with nothing but the Python standard library.

It shows the two things every agent endpoint must do:

1. Verify the Standard Webhooks signature (`webhook-id`, `webhook-timestamp`,
   `webhook-signature`) before trusting a request, and refuse old timestamps.
2. De-duplicate by `webhook-id`. Delivery is at least once: after a crash, a lost answer
   or an operator's replay, the same action can arrive again, with the same `webhook-id`.
   Record the id in the same transaction as the action's effect, and answer a repeat with
   2xx without acting again. (After a SIGKILL of the server in the middle of a batch we
   have seen 52 requests for 50 actions: every one of the two extra had a `webhook-id`
   the agent had already seen.)

Run:  AGENT_SECRET=whsec_... python3 agent.py [--port 0] [--db agent.db]
It prints `listening on 127.0.0.1:PORT`, then one line per request: `performed <id> ...`
or `duplicate <id>`. The official `standardwebhooks` package (PyPI) verifies the same
way; this file spells it out so that nothing is hidden.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sqlite3
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECONDS = 5 * 60


def verify(secret: str, headers, body: bytes) -> str:
    """Returns the webhook-id when the signature holds; raises ValueError otherwise."""
    webhook_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (webhook_id and timestamp and signatures):
        raise ValueError("missing webhook headers")
    if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
        raise ValueError("timestamp outside the tolerance")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # During a secret rotation there is one `v1,<signature>` per secret; any may match.
    for candidate in signatures.split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return webhook_id
    raise ValueError("no signature matches")


class Agent:
    def __init__(self, secret: str, db_path: str):
        self.secret = secret
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS processed ("
            " webhook_id TEXT PRIMARY KEY, type TEXT NOT NULL, data TEXT NOT NULL, done_at REAL NOT NULL)"
        )

    def handle(self, webhook_id: str, payload: dict) -> bool:
        """Performs the action once per webhook-id; False for a repeat."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            # The de-duplication record and the action's effect commit together: a crash
            # between them can neither lose the action nor do it twice.
            inserted = self.db.execute(
                "INSERT INTO processed (webhook_id, type, data, done_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (webhook_id) DO NOTHING",
                (webhook_id, payload.get("type", ""), json.dumps(payload.get("data")), time.time()),
            ).rowcount
            if inserted:
                self.perform(payload)
            self.db.execute("COMMIT")
            return bool(inserted)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def perform(self, payload: dict) -> None:
        """The agent's real work goes here (issue the refund, call the tool, ...)."""


def serve(agent: Agent, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                webhook_id = verify(agent.secret, self.headers, body)
            except ValueError as e:
                return self.answer(401, {"error": str(e)})
            payload = json.loads(body)
            if agent.handle(webhook_id, payload):
                print(f"performed {webhook_id} {payload.get('type')}", flush=True)
                return self.answer(200, {"performed": True})
            print(f"duplicate {webhook_id}", flush=True)
            # A repeat is a success: the action was done; answering an error would only
            # make the sender retry it again.
            return self.answer(200, {"performed": False, "duplicate": True})

        def answer(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", default="agent.db")
    args = parser.parse_args()
    secret = os.environ.get("AGENT_SECRET")
    if not secret:
        print("set AGENT_SECRET to the endpoint's whsec_ secret", file=sys.stderr)
        return 2
    serve(Agent(secret, args.db), args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
