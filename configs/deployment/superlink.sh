#!/usr/bin/env bash
# The coordinator's SuperLink: TLS, SuperNode authentication, state kept on disk.
#
#   CERTS=/etc/flwr-nnunet/certs STATE=/var/lib/flwr-nnunet configs/deployment/superlink.sh [extra flower-superlink flags]
#
# CERTS  holds ca.crt, server.pem (the SuperLink's certificate, valid for the name the hospitals connect to) and
#        server.key (scripts/make_test_certificates.sh makes throw-away ones).
# STATE  where the SQLite database goes: registered SuperNodes and runs survive a restart of this process, so the
#        SuperNodes reconnect by themselves and a run can be resumed (run-config resume=true).
# HOST / PORT  the one HTTP port of every API (default 0.0.0.0:8000): the hospitals' SuperNodes and the
#        researcher's `flwr` both connect to it.
# Run it from the project's virtual environment: the SuperLink starts `flower-superexec` by name.
set -euo pipefail
: "${CERTS:?set CERTS to the folder holding ca.crt, server.pem and server.key}"
: "${STATE:?set STATE to the folder for the SuperLink database (created if missing)}"
for file in ca.crt server.pem server.key; do
    [[ -f "$CERTS/$file" ]] || { echo "superlink.sh: $CERTS/$file not found (see scripts/make_test_certificates.sh)" >&2; exit 2; }
done
mkdir -p "$STATE"
exec flower-superlink \
    --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth \
    --database "$STATE/superlink.db" \
    --disable-runtime-dependency-installation \
    --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
    "$@"
