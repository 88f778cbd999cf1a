"""An in-test token issuer: RSA and EC key pairs, their JWKS, and signed tokens.

Usage: issuer.py DIR ISSUER AUDIENCE SUBJECT
Writes DIR/jwks.json (rsa-1, ec-1) and DIR/jwks-rotated.json (rsa-1, ec-1, rsa-2), and
prints a JSON object of named tokens: valid ones and every way a token can be wrong.
"""
import base64
import hashlib
import hmac
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

out_dir, issuer, audience, subject = sys.argv[1:5]

rsa1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ec1 = ec.generate_private_key(ec.SECP256R1())


def jwk(key, kid, alg):
    algorithm = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
    doc = json.loads(algorithm.to_jwk(key.public_key()))
    doc.update({"kid": kid, "use": "sig", "alg": alg})
    return doc


first = [jwk(rsa1, "rsa-1", "RS256"), jwk(ec1, "ec-1", "ES256")]
with open(f"{out_dir}/jwks.json", "w") as f:
    json.dump({"keys": first}, f)
with open(f"{out_dir}/jwks-rotated.json", "w") as f:
    json.dump({"keys": first + [jwk(rsa2, "rsa-2", "RS256")]}, f)

now = int(time.time())


def claims(**over):
    c = {"iss": issuer, "aud": [audience, "other"], "sub": subject,
         "iat": now, "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header, body, key=None):
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    sig = b"" if key is None else hmac.new(key, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64(sig)}"


rsa1_public_pem = rsa1.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
valid = jwt.encode(claims(), rsa1, algorithm="RS256", headers={"kid": "rsa-1"})
header, _, signature = valid.split(".")
tokens = {
    "valid_rs256": valid,
    "valid_es256": jwt.encode(claims(), ec1, algorithm="ES256", headers={"kid": "ec-1"}),
    "expired": jwt.encode(claims(exp=now - 3600, iat=now - 7200), rsa1,
                          algorithm="RS256", headers={"kid": "rsa-1"}),
    "not_yet": jwt.encode(claims(nbf=now + 3600), rsa1, algorithm="RS256",
                          headers={"kid": "rsa-1"}),
    "no_exp": jwt.encode(claims(exp=None), rsa1, algorithm="RS256", headers={"kid": "rsa-1"}),
    "wrong_audience": jwt.encode(claims(aud="someone-else"), rsa1, algorithm="RS256",
                                 headers={"kid": "rsa-1"}),
    "wrong_issuer": jwt.encode(claims(iss="https://evil.example"), rsa1, algorithm="RS256",
                               headers={"kid": "rsa-1"}),
    "other_subject": jwt.encode(claims(sub="system:serviceaccount:other:intruder"), rsa1,
                                algorithm="RS256", headers={"kid": "rsa-1"}),
    "unknown_kid": jwt.encode(claims(), rsa2, algorithm="RS256", headers={"kid": "rsa-2"}),
    "alg_none": unsigned({"alg": "none", "kid": "rsa-1"}, claims()),
    # The classic confusion: HMAC keyed with the issuer's public key.
    "hs256_public_key": unsigned({"alg": "HS256", "kid": "rsa-1"}, claims(), rsa1_public_pem),
    # Claims swapped under a valid signature.
    "forged": f"{header}.{b64(json.dumps(claims(sub=subject + '-admin')).encode())}.{signature}",
    # Signed by a key the issuer never published, under a published kid.
    "wrong_key": jwt.encode(claims(), rsa2, algorithm="RS256", headers={"kid": "rsa-1"}),
}
json.dump(tokens, sys.stdout)
