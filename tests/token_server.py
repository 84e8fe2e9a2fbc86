#!/usr/bin/env python3
"""A Docker token server for tests: issues RS256 JWTs that Debian's docker-registry (token auth,
`rootcertbundle`) accepts, signed with `openssl`. Two ways in, as real token servers have:
  GET  /token   with HTTP basic auth USER:PASSWORD          (docker/skopeo login flow)
  POST /token   grant_type=refresh_token&refresh_token=ID    (Docker identity tokens)
Every request is appended to LOG as one JSON line.
  token_server.py PORT KEY.pem CERT.pem SERVICE USER PASSWORD IDENTITY LOG [LIFETIME]
LIFETIME: seconds the tokens given for the identity token live (the registry allows 60 s of
clock leeway, so -55 makes a token that is refused about 5 s after it was issued).
"""
import base64, http.server, json, os, subprocess, sys, time, urllib.parse

port, key, cert, service, user, password, identity, log = sys.argv[1:9]
identity_lifetime = int(sys.argv[9]) if len(sys.argv) > 9 else 600
der = subprocess.run(["openssl", "x509", "-in", cert, "-outform", "DER"], check=True,
                     capture_output=True).stdout


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(scope, lifetime=600):
    access = []
    if scope:
        kind, name, actions = scope.split(":", 2)
        access.append({"type": kind, "name": name, "actions": actions.split(",")})
    now = int(time.time())
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
    claims = {"iss": "bux-test-issuer", "sub": user, "aud": service, "exp": now + lifetime,
              "nbf": now - 60, "iat": now, "jti": os.urandom(8).hex(), "access": access}
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing.encode(),
                         check=True, capture_output=True).stdout
    return signing + "." + b64url(sig)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, ok, scope, how, lifetime=600):
        with open(log, "a") as f:
            f.write(json.dumps({"how": how, "ok": ok, "scope": scope}) + "\n")
        if not ok:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        t = jwt(scope, lifetime)
        body = json.dumps({"token": t, "access_token": t, "expires_in": max(lifetime, 1)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        auth = self.headers.get("Authorization", "")
        want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.answer(auth == want, q.get("scope", [""])[0], "basic")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode())
        ok = (form.get("grant_type") == ["refresh_token"]
              and form.get("refresh_token") == [identity]
              and form.get("service") == [service])
        self.answer(ok, form.get("scope", [""])[0], "refresh_token", identity_lifetime)


http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
