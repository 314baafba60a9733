#!/usr/bin/env python3
"""A receiver for approvers: Hookwarden's `hookwarden.approval.*` operational events,
printed for a person, with the commands that grant or deny the request.

Subscribe it with an Endpoint whose `eventTypes` are `["hookwarden.approval.*"]`
(`approvers.yaml` beside this file). Each request is verified as every Hookwarden delivery
is (Standard Webhooks, the same `verify` as the example agent's) and de-duplicated by
`webhook-id`, so a retried delivery prints nothing twice.

Run:  APPROVER_SECRET=whsec_... python3 approver.py [--port 0]
It prints `listening on 127.0.0.1:PORT`, then, for each request waiting:

    approval apr_… requested in payments: agent refund-agent (owner refunds-team), rule refunds
      reason:  spend would exceed 1000 USD in 24h
      action:  refund.requested from shop, 42 bytes: {"amount_cents": 1500, ...}
      spend:   refunds: 1500 USD, 200 of 1000 left in the window
      needs 1 grant(s) by 2026-12-04T14:00:00Z, else deny
      open:    https://console.example.com/approvals/apr_…
      grant:   hookwarden approvals grant apr_… --reason "…"
      deny:    hookwarden approvals deny apr_… --reason "…"

and one line when a request is decided, about to expire, or expired.
"""

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "agent"))
from agent import verify  # noqa: E402  (the example agent's Standard Webhooks check)


def describe(event: dict) -> list:
    """The lines an approver reads for one operational event."""
    kind, data = event.get("type", ""), event.get("data") or {}
    approval = data.get("approval", "?")
    if kind == "hookwarden.approval.requested":
        owner = f" (owner {data['owner']})" if data.get("owner") else ""
        lines = [
            f"approval {approval} requested in {data.get('namespace')}: agent {data.get('endpoint')}{owner}, "
            f"rule {data.get('rule') or '(none)'}",
            f"  reason:  {data.get('reason')}",
        ]
        action = data.get("action")
        if action:
            if action.get("data") is not None:  # the data inline, as JSON (up to 64 KiB)
                preview = json.dumps(action["data"], sort_keys=True)
            else:  # too large: a preview as text, and a note saying so
                preview = f"{action.get('data_preview') or ''} ({action.get('data_note') or 'cut'})"
            subject = f" about {action['subject']}" if action.get("subject") else ""
            lines.append(
                f"  action:  {action.get('type')} from {action.get('source')}{subject}, "
                f"{action.get('data_bytes')} bytes: {preview}"
            )
        for spend in data.get("spend") or []:
            lines.append(
                f"  spend:   {spend['rule']}: {spend['amount']} {spend['currency']}, "
                f"{spend['remaining']} of {spend['limit']} left in the window"
            )
        lines.append(f"  needs {data.get('quorum')} grant(s) by {data.get('expiresAt')}, else {data.get('onExpiry')}")
        if data.get("link"):
            lines.append(f"  open:    {data['link']}")
        lines.append(f'  grant:   hookwarden approvals grant {approval} --reason "…"')
        lines.append(f'  deny:    hookwarden approvals deny {approval} --reason "…"')
        return lines
    if kind.startswith("hookwarden.approval."):
        what = kind.removeprefix("hookwarden.approval.")
        keys = ("decision", "reason", "released", "expiresAt", "quorum")
        details = ", ".join(f"{k} {data[k]}" for k in keys if k in data)
        return [f"approval {approval} {what}: {details}"]
    return [f"ignored {kind}"]


class Approver:
    def __init__(self, secret: str):
        self.secret = secret
        self.seen = set()


def handler_for(approver: Approver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                webhook_id = verify(approver.secret, self.headers, body)
            except ValueError as e:
                self.send_response(401)
                self.end_headers()
                self.wfile.write(str(e).encode())
                return
            if webhook_id not in approver.seen:
                approver.seen.add(webhook_id)
                for line in describe(json.loads(body)):
                    print(line, flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()
    secret = os.environ.get("APPROVER_SECRET")
    if not secret:
        sys.exit("set APPROVER_SECRET to the Endpoint's secret (whsec_...)")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(Approver(secret)))
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
