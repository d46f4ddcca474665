#!/usr/bin/env bash
# Regenerates sovra/v1/*_pb2*.py(i) from proto/sovra/v1/*.proto.
# `scripts/gen_proto.sh --check` fails when the committed code is not current.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" proto/sovra/v1/*.proto
if [ "${1:-}" = "--check" ]; then
  for f in "$out"/sovra/v1/*; do
    if ! cmp -s "$f" "sovra/v1/$(basename "$f")"; then
      echo "generated code is stale: sovra/v1/$(basename "$f") (run scripts/gen_proto.sh)" >&2
      exit 1
    fi
  done
  echo "generated protobuf code is current"
else
  cp "$out"/sovra/v1/* sovra/v1/
fi
