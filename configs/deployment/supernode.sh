#!/usr/bin/env bash
# One hospital's SuperNode: TLS to the coordinator, its own key for SuperNode authentication, its own data.
#
#   SUPERLINK=coordinator.example.org:8000 CA_CERT=/etc/flwr-nnunet/ca.crt NODE_KEY=/etc/flwr-nnunet/hospital-a \
#   PREPROCESSED=/data/nnUNet_preprocessed RESULTS=/data/flwr_nnunet_results SITE_NAME=hospital-a \
#   RAW=/data/nnUNet_raw DATASET=Dataset517_Liver configs/deployment/supernode.sh [extra flower-supernode flags]
#
# SUPERLINK     host:port of the coordinator's SuperLink (the name must be in its certificate)
# CA_CERT       the CA certificate that signed the SuperLink's certificate (without it, no connection)
# NODE_KEY      this hospital's private key (ssh-keygen -t ecdsa -b 384 -N "" -f hospital-a); NODE_KEY.pub is
#               what the coordinator registers (`flwr supernode register`); the private key never leaves the site
#               (Flower 1.42 derives the public key from it: --auth-supernode-public-key is deprecated)
# PREPROCESSED  the site's nnUNet_preprocessed root: <DATASET>/ with the federation's plans and the preprocessed
#               cases (federated planning writes them there)
# RESULTS       where the site's nnU-Net trainer keeps its logs and per-round state
# SITE_NAME     the name in logs and errors
# RAW           optional: the site's nnUNet_raw root, holding <DATASET>/ (read by run-config planning='federated')
# DATASET       optional: this hospital's own dataset folder name, e.g. Dataset517_Liver where another hospital
#               has Dataset003_Liver (default: the run config's `dataset`, the federation's name)
# WARM_SITE     optional: false trains every message in its own ClientApp process (default true: the site's warm
#               worker starts here, keeps the trainer across a run's rounds behind a 0600 Unix socket in RESULTS,
#               and exits with this SuperNode; and each message's ClientApp is forked from a process that has
#               imported Flower once, `flwr-nnunet clientapp-exec`, instead of starting Python and Flower again;
#               see documentation/deployment.md "The warm site")
# PYTHON        optional: the Python of the project's environment (default: python3 on PATH)
# The SuperNode keeps retrying while the SuperLink is away (no --max-retries): after a coordinator restart it
# reconnects by itself. Two SuperNodes on one machine need their own --port (default 9094).
set -euo pipefail
for name in SUPERLINK CA_CERT NODE_KEY PREPROCESSED RESULTS SITE_NAME; do
    [[ -n "${!name:-}" ]] || { echo "supernode.sh: set $name (see the comments at the top of $0)" >&2; exit 2; }
done
for file in "$CA_CERT" "$NODE_KEY"; do
    [[ -f "$file" ]] || { echo "supernode.sh: $file not found" >&2; exit 2; }
done
node_config="nnunet-preprocessed='$PREPROCESSED' nnunet-results='$RESULTS' site-name='$SITE_NAME'"
[[ -z "${RAW:-}" ]] || node_config+=" nnunet-raw='$RAW'"
[[ -z "${DATASET:-}" ]] || node_config+=" dataset='$DATASET'"
if [[ "${WARM_SITE:-true}" != false ]]; then
    mkdir -p "$RESULTS"
    # $$ stays this process's id through `exec`: the worker watches the SuperNode itself
    "${PYTHON:-python3}" -m flwr_nnunet.cli warm-site --results "$RESULTS" --parent $$ &   # logs with the SuperNode
    # the SuperNode's Runtime API: its --host and --port among the extra flags, else Flower's 127.0.0.1:9094
    runtime_host=127.0.0.1 runtime_port=9094 previous=
    for argument in "$@"; do
        case "$previous" in
            --host) [[ "$argument" == 0.0.0.0 || "$argument" == :: ]] || runtime_host=$argument ;;
            --port) runtime_port=$argument ;;
        esac
        previous=$argument
    done
    "${PYTHON:-python3}" -m flwr_nnunet.cli clientapp-exec --runtime-api-address "$runtime_host:$runtime_port" \
        --parent $$ &
fi
exec flower-supernode \
    --superlink "$SUPERLINK" \
    --root-certificates "$CA_CERT" \
    --auth-supernode-private-key "$NODE_KEY" \
    --node-config "$node_config" \
    "$@"
