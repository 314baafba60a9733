"""Sends CloudEvents built by the official CloudEvents SDK for Python to Hookwarden, in
structured, binary and batched content mode, and prints one JSON line per request:
{"mode", "status", "body"}.

Run by tests/cloudevents.rs with HOOKWARDEN_URL (the server's base URL) and
HOOKWARDEN_TOKEN (a bearer token) in the environment. Only the standard library besides
the SDK; every request goes to HOOKWARDEN_URL (loopback).
"""

import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

BASE = os.environ["HOOKWARDEN_URL"]
TOKEN = os.environ["HOOKWARDEN_TOKEN"]
FORMAT = JSONFormat()
# Straight to the server on loopback, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
AT = datetime(2026, 12, 4, 10, 30, 0, 250000, tzinfo=timezone.utc)


def post(mode, path, headers, body):
    request = urllib.request.Request(BASE + path, data=body, method="POST")
    for name, value in headers.items():
        request.add_header(name, value)
    request.add_header("Authorization", "Bearer " + TOKEN)
    try:
        with OPENER.open(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    print(json.dumps({"mode": mode, "status": status, "body": json.loads(text)}), flush=True)


def event(id, subject, data, **extensions):
    attributes = {
        "id": id,
        "source": "/sdk/python",
        "type": "com.example.order.created",
        "subject": subject,
        "time": AT,
        **extensions,
    }
    return CloudEvent(attributes=attributes, data=data)


# Structured mode: the namespace as the event's extension attribute.
structured = to_structured(
    event("sdk-structured-1", "orders/1", {"order_id": 1, "total": 4200}, namespace="shop", tenant="acme"), FORMAT
)
post("structured", "/v1/events", structured.headers, structured.body)

# Binary mode: the namespace from the query; a subject that needs percent-encoding.
binary = to_binary(
    event("sdk-binary-1", "orders/2 für Jürgen", {"order_id": 2, "total": 99}, tenant="acme", priority="high"),
    FORMAT,
)
headers = dict(binary.headers)
# The SDK sets no Content-Type without a `datacontenttype` (JSON then, which Hookwarden
# assumes too), but urllib would send application/x-www-form-urlencoded in its place.
headers.setdefault("content-type", "application/json")
post("binary", "/v1/events?namespace=shop", headers, binary.body)

# Batched mode: a JSON array of events in the JSON format (the SDK has no batch helper).
batch = [
    event("sdk-batch-1", "orders/3", {"order_id": 3, "total": 1}, namespace="shop"),
    event("sdk-batch-2", "orders/4", {"order_id": 4, "total": 2}, namespace="shop"),
]
body = b"[" + b",".join(FORMAT.write(e) for e in batch) + b"]"
post("batch", "/v1/events/batch", {"content-type": "application/cloudevents-batch+json"}, body)
sys.exit(0)
