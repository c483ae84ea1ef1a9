#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/.

Run it again after editing it (`python3 fuzz/seeds.py`); the files it
writes are committed, and fuzz/run.sh reads them as each target's starting
corpus (with every input a fuzz run ever failed on, under
fuzz/seeds/<target>/regress-*, which this script never touches).

Request vectors: the framing cases of tests/http1.rs, the header
obfuscations that request-smuggling scanners try (the gadget families of
defparam/smuggler's configs: a byte before, inside or after the
Transfer-Encoding name and value, for every control and high byte), and
the desync classes the HTTP Garden project reported (bare CR/LF in chunk
lines, oversized or signed sizes, obs-fold, NUL, HTTP/1.0 with chunked).
Written from those lists' descriptions, not copied.
"""

import hashlib
import os
import shutil

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, data, keep=None):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def reset(target):
    d = os.path.join(ROOT, target)
    if os.path.isdir(d):
        for n in os.listdir(d):
            if not n.startswith("regress-"):
                os.remove(os.path.join(d, n))


TARGETS = ["request_stream", "head", "chunked", "response", "authority", "placements", "ssrf", "config_files", "run_token", "openapi_import"]
for t in TARGETS:
    reset(t)

# ---- requests -------------------------------------------------------------

HEAD = b"POST http://api.test/p HTTP/1.1\r\nHost: api.test\r\nX-Connection-Id: conn_a\r\n"
CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"
NEXT = b"GET http://api.test/next HTTP/1.1\r\nHost: api.test\r\n\r\n"


def request(extra, body=b"", version=b"HTTP/1.1"):
    head = HEAD.replace(b"HTTP/1.1", version, 1)
    return head + extra + b"\r\n" + body


requests = [
    request(b"Content-Length: 5\r\n", b"hello") + NEXT,
    request(b"Transfer-Encoding: chunked\r\n", CHUNKED) + NEXT,
    request(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", CHUNKED),
    request(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", CHUNKED),
    request(b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED),
    request(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED),
    request(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED),
    request(b"Transfer-Encoding: ,chunked\r\n", CHUNKED),
    request(b"Transfer-Encoding: chunked,\r\n", CHUNKED),
    request(b"Transfer-Encoding: chunked,\r\nContent-Length: 5\r\n", b"0\r\n\r\nX"),
    request(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    request(b"Content-Length: 5, 5\r\n", b"hello"),
    request(b"Content-Length: +5\r\n", b"hello"),
    request(b"Content-Length: 0x5\r\n", b"hello"),
    request(b"Content-Length: 5 \r\n", b"hello"),
    request(b"Content-Length : 5\r\n", b"hello"),
    request(b"Content_Length: 5\r\n", b"hello"),
    request(b"Content-Length: 99999999999999999999\r\n", b"hello"),
    request(b"X-Folded: a\r\n b\r\nContent-Length: 5\r\n", b"hello"),
    request(b"Transfer-Encoding: chunked\r\n", CHUNKED, b"HTTP/1.0"),
    request(b"Connection: close\r\nContent-Length: 5\r\n", b"hello") + NEXT,
    request(b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nContent-Length: 0\r\n") + NEXT,
    request(b"Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello"),
    request(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"5\rhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"5;a=\"b\r\nc\"\r\nhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"5 ;x\r\nhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"+5\r\nhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"),
    request(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n") + NEXT,
    request(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\n\n"),
    request(b"X-Null: a\x00b\r\nContent-Length: 0\r\n"),
    b"GET http://api.test/ HTTP/1.1\nHost: api.test\n\n" + NEXT,
    b"\r\n\r\nGET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
    b"GET /origin HTTP/1.1\r\nHost: api.test\r\n\r\n",
    b"GET http://api.test?q=1 HTTP/1.1\r\nHost: api.test\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: api.test\r\n\r\n",
    b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n\x16\x03\x01",
    b"GET http://api.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET http://user@api.test/ HTTP/1.1\r\n\r\n",
    b"GET http://api.test/ HTTP/1.1\r\nX-Connection-Id: a\r\nX_Connection_Id: b\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 130 + b"\r\n",
]
# Transfer-Encoding obfuscations: a byte before or inside the name, around
# the value; every control byte and the high half.
gadgets = [
    b" Transfer-Encoding: chunked", b"Transfer-Encoding:\tchunked", b"Transfer-Encoding\t:\tchunked",
    b"Transfer Encoding: chunked", b"Transfer_Encoding: chunked", b"Transfer-Encoding:  chunked",
    b"Transfer-Encoding: chunked, cow", b"Transfer-Encoding: cow, chunked", b"Transfer-Encoding:\n chunked",
    b"Transfer-Encoding: \"chunked\"", b"Transfer-Encoding: chunk", b"TrAnSFer-EnCODinG: cHuNkeD",
    b"Transfer-Encoding: chunked\r", b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
    b"Transfer\r-Encoding: chunked", b"X: X\rTransfer-Encoding: chunked", b"X: X\nTransfer-Encoding: chunked",
]
for i in list(range(0x01, 0x20)) + list(range(0x7F, 0x100)):
    c = bytes([i])
    gadgets += [
        b"Transfer-Encoding:" + c + b"chunked",
        b"Transfer-Encoding" + c + b": chunked",
        c + b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: chunked" + c,
    ]
for g in gadgets:
    requests.append(request(g + b"\r\nContent-Length: 5\r\n", b"0\r\n\r\nX"))

for i, r in enumerate(requests):
    # [max head size selector][read-size seed] then the stream.
    put("request_stream", bytes([255, i % 256]) + r)
    put("request_stream", bytes([1, i % 256]) + r)

# ---- heads (the tokenizer against httparse) ---------------------------------------
# The request vectors' heads and the responses below, each with room for 16
# fields and for 1 (too many fields), and heads of the load bench's shape.

def head_of(message):
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


heads = [head_of(r) for r in requests[:40]] + [
    b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nx-connection-id: conn_01\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: Fri, 04 Dec 2026 07:00:00 GMT\r\n\r\n",
    b"\r\nPATCH * HTTP/1.0\nA:\tb \t\nEmpty:\r\nObs: \x80\xff\r\n\n",
    b"HTTP/1.0 500 \xe9t\xe9\r\nX: \"q\\\" v\"\r\n\r\n",
]
for h in heads:
    put("head", bytes([16]) + h)
    put("head", bytes([1]) + h)

# ---- chunked bodies -----------------------------------------------------------

bodies = [
    CHUNKED, b"0\r\n\r\n", b"1;ext=1\r\na\r\n0\r\n\r\n", b"5 \r\nhello\r\n0\r\n\r\n", b"5\t;x\r\nhello\r\n0\r\n\r\n",
    b"5\nhello\r\n0\r\n\r\n", b"5\r\nhello\n0\r\n\r\n", b"ffffffffffffffff\r\n", b"00000000000000005\r\nhello\r\n0\r\n\r\n",
    b"0\r\nA: b\r\nC: d\r\n\r\n", b"0\r\nA: b\n\r\n", b"5;\x00\r\nhello\r\n0\r\n\r\n", b"5;\rhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n", b"A\r\n0123456789\r\n0\r\n\r\n",
]
for i, b in enumerate(bodies):
    put("chunked", bytes([i]) + b)

# ---- responses --------------------------------------------------------------

responses = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED,
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED,
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED,
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent_Length: 3\r\nProxy-Authenticate: x\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 302 Found\r\nLocation: https://x.test/?key=abc\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 999 Custom\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
]
for i, r in enumerate(responses):
    put("response", bytes([0, i]) + r)
    put("response", bytes([3, i]) + r)

# ---- request targets and allowed_hosts --------------------------------------------

pairs = [
    (b"api.test", b"http://api.test/p"), (b"*.test", b"https://a.api.test:8443/p?q"), (b"api.test:80", b"http://api.test:80/"),
    (b"[::1]:8080", b"http://[::1]:8080/"), (b"127.0.0.1", b"http://127.0.0.1/"), (b"api.test", b"http://API.test./"),
    (b"api.test", b"http://user:pw@api.test/"), (b"api.test", b"http://api.test@evil.test/"),
    (b"api.test", b"http://evil.test#@api.test/"), (b"api.test", b"http://api.test%2eevil.test/"),
    (b"*.api.test", b"http://api.test/"), (b"api.test", b"http://api.test:99999/"), (b"api.test", b"http://api.test?x"),
    (b"api.test", b"api.test:443"), (b"api.test", b"/relative"), (b"api.test", b"ftp://api.test/"),
]
for i, (p, t) in enumerate(pairs):
    put("authority", bytes([i % 2, len(p)]) + p + t)

# ---- placements ---------------------------------------------------------------------

for i, (place, name, template, a, b) in enumerate([
    ("h", "Authorization", "Token {a}", "k1", "x"), ("qq", "api_key", "{a}", "k&=+ %", "x"),
    ("ccc", "session", "{a}.{b}", "k1", "k2"), ("jjjj", "secret", "{{{a}}}", "k\"1", "x"),
    ("fffff", "client_secret", "{a}", "a b&c", "x"), ("h", "X-Sig", "v1:{a}:{b}", "a", "b"),
]):
    put("placements", "\x01".join([place, name, template, a, b]).encode())

# ---- SSRF -------------------------------------------------------------------------

for ip in ["127.0.0.1", "10.1.2.3", "169.254.169.254", "100.64.0.1", "192.0.0.9", "198.18.0.1", "8.8.8.8",
           "::1", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "2001::1", "2001:db8::1", "fd00::1",
           "fe80::1", "ff02::1", "2606:4700::1111", "3fff::1", "5f00::1", "100::1"]:
    put("ssrf", ip.encode())
put("ssrf", bytes([172, 16, 0, 1]))
put("ssrf", bytes(16))

# ---- config and integration files -------------------------------------------------------

conf = os.path.join(os.path.dirname(ROOT), "..", "config")
with open(os.path.join(conf, "credproxy.toml"), "rb") as f:
    put("config_files", b"\x00" + f.read())
put("config_files", b"\x00[store]\nurl = \"${DATABASE_URL}\"\n")
put("config_files", b"\x00[proxy]\nlisten = \"${FUZZ_SECRET}\"\n")
for n in sorted(os.listdir(os.path.join(conf, "integrations"))):
    with open(os.path.join(conf, "integrations", n), "rb") as f:
        put("config_files", b"\x01" + f.read())
put("config_files", b"\x01id = \"x\"\nallowed_hosts = [\"${FUZZ_SECRET}\"]\n")

# ---- run tokens -----------------------------------------------------------------------

put("run_token", b"\x00cprt1.k.e30.AAAA")
put("run_token", b"\x01rt_1\x01org_a\x01user\x01conn_a,conn_b")
put("run_token", b"\x07\x01\x01\x01")

# ---- OpenAPI documents ------------------------------------------------------------------

docs = [
    b'{"openapi":"3.0.3","info":{"title":"T","version":"1"},"servers":[{"url":"https://api.t.test/v1"}],'
    b'"components":{"securitySchemes":{"k":{"type":"apiKey","in":"header","name":"X-Key"}}},"security":[{"k":[]}],"paths":{}}',
    b'openapi: 3.1.0\ninfo: {title: O, version: "1"}\nservers:\n  - url: https://{region}.o.test\n    variables:\n'
    b'      region: {default: eu, enum: [eu, us]}\ncomponents:\n  securitySchemes:\n    o:\n      type: oauth2\n'
    b'      flows:\n        authorizationCode:\n          authorizationUrl: /auth\n          tokenUrl: /token\n'
    b'          scopes: {read: r}\nsecurity: [{o: [read]}]\npaths: {}\n',
    b'{"openapi":"3.0.0","info":{"title":"B","version":"1"},"servers":[{"url":"http://localhost:8080"}],'
    b'"components":{"securitySchemes":{"b":{"type":"http","scheme":"basic"}}},"paths":{"/x":{"get":{"security":[{"b":[]}]}}}}',
    b'{"openapi":"3.0.0","info":{"title":"R","version":"1"},"paths":{"/a":{"$ref":"#/nope"}}}',
    b'swagger: "2.0"\ninfo: {title: S, version: "1"}\n',
]
for d in docs:
    put("openapi_import", d)

print("seeds written under", ROOT)
