#!/usr/bin/env python3
"""An independent verifier of a Hookwarden audit export, written from docs/AUDIT.md alone.

Usage: python3 verify.py EXPORT.ndjson
Checks every record's hash, its link to the previous record and seq continuity. (The
checkpoint's Ed25519 signature needs a crypto library; this script checks that the
checkpoint's seq and hash match a record of the export.) Exit 0 when valid, 1 otherwise.
"""
import hashlib
import json
import sys

GENESIS = "0" * 64


def canonical(value):
    """RFC 8785 (JCS) for the values audit records hold: sorted keys (by UTF-16 code
    units), no whitespace, minimal string escapes, integers as decimals."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(canonical(k) + ":" + canonical(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    return json.dumps(value, ensure_ascii=False)


def main(path):
    records, checkpoint = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if "checkpoint" in obj:
                checkpoint = obj["checkpoint"]
            else:
                records.append(obj)
    if not records:
        print("FAILED: no records")
        return 1
    prev_seq, prev_hash = records[0]["seq"] - 1, records[0]["prev_hash"]
    if prev_seq == 0 and prev_hash != GENESIS:
        print("FAILED: the first record does not start from the genesis hash")
        return 1
    for position, record in enumerate(records, 1):
        if record["seq"] != prev_seq + 1:
            print(f"FAILED: record {position} (seq {record['seq']}): seq does not follow {prev_seq}")
            return 1
        if record["prev_hash"] != prev_hash:
            print(f"FAILED: record {position} (seq {record['seq']}): prev_hash does not link")
            return 1
        body = {k: v for k, v in record.items() if k != "hash"}
        digest = hashlib.sha256((record["prev_hash"] + canonical(body)).encode("utf-8")).hexdigest()
        if digest != record["hash"]:
            print(f"FAILED: record {position} (seq {record['seq']}): hash does not match its content")
            return 1
        prev_seq, prev_hash = record["seq"], record["hash"]
    if checkpoint is not None:
        if checkpoint["seq"] > prev_seq:
            print(f"FAILED: checkpoint at seq {checkpoint['seq']} but the export ends at seq {prev_seq}")
            return 1
        signed = [r for r in records if r["seq"] == checkpoint["seq"]]
        if signed and signed[0]["hash"] != checkpoint["hash"]:
            print(f"FAILED: checkpoint hash differs from record seq {checkpoint['seq']}")
            return 1
    print(f"OK: {len(records)} records verified (seq {records[0]['seq']}..{prev_seq})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
