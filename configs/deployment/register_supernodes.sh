#!/usr/bin/env bash
# The coordinator registers each hospital's public key once; only registered SuperNodes may join.
#
#   configs/deployment/register_supernodes.sh CONNECTION hospital-a.pub hospital-b.pub ...
#
# CONNECTION names the SuperLink in $FLWR_HOME/config.toml (see configs/deployment/flwr-config.toml).
# The SuperLink keeps the keys in its database (superlink.sh's STATE): register again only after it was lost.
# `flwr supernode ls CONNECTION` lists the registered SuperNodes and their node ids.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 CONNECTION KEY.pub [KEY.pub ...]" >&2
    exit 2
fi
connection=$1
shift
for key in "$@"; do
    flwr supernode register "$key" "$connection" --name "$(basename "$key" .pub)"
done
