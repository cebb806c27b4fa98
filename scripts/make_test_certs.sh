#!/usr/bin/env bash
# Make a private CA and certificates for trying (and testing) cartosplit's TLS and mutual TLS.
#
#   bash scripts/make_test_certs.sh certs/          # DAYS=1 bash scripts/make_test_certs.sh certs/ for 1 day
#
# Writes into OUT_DIR (created if needed; private keys readable by you only):
#   ca.pem                    the CA certificate: what clients trust (--ca, --cloud-ca) and what a server
#                             checks client certificates against (--tls-client-ca)
#   ca.key                    the CA's private key: only needed to sign more certificates
#   server.pem, server.key    the server certificate for DNS:localhost and IP:127.0.0.1 (--tls-cert, --tls-key)
#   client.pem, client.key    a client certificate for mutual TLS (--cert/--key, --cloud-cert/--cloud-key)
#
# Keys are EC P-256; everything is valid for DAYS days (default 30). Each run makes a new CA, so
# certificates from two runs do not trust each other. For testing and trying things out on one machine:
# a real deployment's server certificate must name the host clients dial, and the CA key belongs offline.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "$0: openssl is not installed" >&2; exit 1; }

OUT=$1
DAYS=${DAYS:-30}
mkdir -p "$OUT"
cd "$OUT"
umask 077 # the private keys (and everything else written here) readable by this user only

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# 1. The CA: self-signed, allowed to sign certificates and nothing else.
new_key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=cartosplit test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem

# 2. A leaf certificate signed by the CA: sign NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAME]
sign() {
    local name=$1 cn=$2 usage=$3 san=${4:-}
    new_key "$name.key"
    openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$usage"
        if [[ -n $san ]]; then echo "subjectAltName=$san"; fi
    } >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days "$DAYS" \
        -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

# The server: clients check the name they dial against the subjectAltName (not the CN).
sign server localhost serverAuth "DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
# A client, for mutual TLS: any certificate this CA signed is let in, so keep one CA per deployment.
sign client "cartosplit client" clientAuth
rm -f ca.srl
chmod 644 ca.pem server.pem client.pem # certificates are public; keys stay 600

openssl verify -CAfile ca.pem server.pem client.pem >/dev/null
echo "certificates in $(pwd): ca.pem, server.pem/server.key, client.pem/client.key (valid $DAYS days)"
