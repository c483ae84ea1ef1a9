#!/usr/bin/env bash
# Regenerates the TEST-ONLY TLS fixtures in certs/test/:
#   upstream-ca.pem / .key   a CA standing in for a private upstream CA
#   httpbin.pem / .key       server certificate for the TLS httpbin the tests run
#                            (SAN: IP 127.0.0.1, DNS localhost), signed by that CA
# Never use these outside tests: the keys are public in this repository.
# credproxy's own interception CA is made per test run with `credproxy ca init`
# (tests call the same code in-process), so it is not committed.
set -euo pipefail
cd "$(dirname "$0")/test"
days=3650
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/O=credproxy tests/CN=credproxy test upstream CA (TEST ONLY)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout upstream-ca.key -out upstream-ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/O=credproxy tests/CN=127.0.0.1" -keyout httpbin.key -out httpbin.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > httpbin.ext
openssl x509 -req -in httpbin.csr -CA upstream-ca.pem -CAkey upstream-ca.key -CAcreateserial \
  -days "$days" -extfile httpbin.ext -out httpbin.pem 2>/dev/null
rm -f httpbin.csr httpbin.ext upstream-ca.srl
chmod 0644 ./*.pem ./*.key
echo "wrote $(pwd)/{upstream-ca,httpbin}.{pem,key}"
