"""Parses HTTP requests a receiver was sent, with the official CloudEvents SDK for Python
(`from_http`, which takes binary mode for any `ce-` header), and prints their events.

Reads a JSON array of {"headers": {name: value}, "body": text} on standard input; prints
a JSON array of {"attributes": {...}, "data": ...}, `time` in ISO 8601.
"""

import json
import sys

from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat

out = []
for request in json.load(sys.stdin):
    message = HTTPMessage(headers=request["headers"], body=request["body"].encode())
    event = from_http(message, JSONFormat())
    attributes = {
        name: value.isoformat() if hasattr(value, "isoformat") else value
        for name, value in event.get_attributes().items()
    }
    out.append({"attributes": attributes, "data": event.get_data()})
print(json.dumps(out))
