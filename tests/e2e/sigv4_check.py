"""Checks an AWS Signature Version 4 with botocore's signer: an implementation
independent of latchkey's. Reads one request, as the upstream received it, as JSON on
stdin; prints the verdict as JSON.

Input: {"method", "uri" (path and query as received), "headers": [[name, value], ...],
"body" (base64), "secret_access_key"}. The session token, if any, is read from the
request's signed x-amz-security-token header.
"""

import base64
import hashlib
import json
import sys

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def main():
    req = json.load(sys.stdin)
    headers = {}
    for name, value in req["headers"]:
        headers.setdefault(name.lower(), value)
    algorithm, _, fields = headers["authorization"].partition(" ")
    fields = dict(part.strip().split("=", 1) for part in fields.split(","))
    access_key_id, date, region, service, terminator = fields["Credential"].split("/")
    signed = fields["SignedHeaders"].split(";")
    body = base64.b64decode(req["body"])

    problems = []
    if algorithm != "AWS4-HMAC-SHA256" or terminator != "aws4_request":
        problems.append("not an AWS4-HMAC-SHA256 signature")
    if not headers.get("x-amz-date", "").startswith(date):
        problems.append("x-amz-date does not match the credential scope")
    claimed = headers.get("x-amz-content-sha256")
    if claimed is not None and claimed != "UNSIGNED-PAYLOAD":
        if claimed != hashlib.sha256(body).hexdigest():
            problems.append("x-amz-content-sha256 is not the body's hash")
    for name in ("host", "x-amz-date"):
        if name not in signed:
            problems.append(f"{name} is not signed")
    for name in headers:
        if name.startswith("x-amz-") and name not in signed:
            problems.append(f"{name} is sent unsigned")

    credentials = Credentials(
        access_key_id, req["secret_access_key"], headers.get("x-amz-security-token")
    )
    auth = (S3SigV4Auth if service == "s3" else SigV4Auth)(credentials, service, region)
    request = AWSRequest(
        method=req["method"],
        url="http://" + headers["host"] + req["uri"],
        headers={name: headers[name] for name in signed if name in headers},
        data=body,
    )
    request.context["timestamp"] = headers.get("x-amz-date", "")
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    if expected != fields.get("Signature"):
        problems.append("the signature does not match")
    json.dump(
        {
            "valid": not problems,
            "problems": problems,
            "access_key_id": access_key_id,
            "region": region,
            "service": service,
            "signed_headers": signed,
            "canonical_request": canonical,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
