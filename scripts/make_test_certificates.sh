#!/usr/bin/env bash
# Throw-away TLS certificates and SuperNode keys for trying a deployment (tests, a dry run on one machine).
#
#   scripts/make_test_certificates.sh OUT_DIR [NODE_NAME ...]
#
# Writes to OUT_DIR (created; existing files are overwritten):
#   ca.crt, ca.key            a self-signed certificate authority (give ca.crt to every SuperNode and to `flwr`)
#   server.pem, server.key    the SuperLink's certificate, signed by the CA, valid for the names in
#                             SUPERLINK_SAN (default "IP:127.0.0.1,DNS:localhost")
#   NODE_NAME, NODE_NAME.pub  one ECDSA P-384 key pair per SuperNode (ssh-keygen -t ecdsa -b 384), for
#                             --enable-supernode-auth; default node names: hospital-a hospital-b
#
# These are for testing only: the CA key sits unprotected next to the certificates and the certificates are
# valid for DAYS (default 30) days. A real deployment gets its server certificate from the hospital network's
# own CA (or a public one) for the coordinator's real host name, and each hospital makes its own key pair and
# sends only the .pub file to the coordinator.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [NODE_NAME ...]   (SUPERLINK_SAN='IP:127.0.0.1,DNS:localhost' DAYS=30)" >&2
    exit 2
fi
out=$1
shift
nodes=("$@")
if [[ ${#nodes[@]} -eq 0 ]]; then
    nodes=(hospital-a hospital-b)
fi
san=${SUPERLINK_SAN:-IP:127.0.0.1,DNS:localhost}
days=${DAYS:-30}

mkdir -p "$out"
cd "$out"

openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -keyout ca.key -out ca.crt -subj "/O=flwr-nnunet test CA/CN=flwr-nnunet test CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 \
    -keyout server.key -out server.csr -subj "/O=flwr-nnunet test/CN=superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key

for node in "${nodes[@]}"; do
    rm -f "$node" "$node.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$node" -f "$node"
done

echo "wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key} (SuperLink names: $san) and keys for: ${nodes[*]}"
