#!/usr/bin/env bash
# Usage: scripts/demo.sh
#
# One command from a fresh checkout to a verified signature: installs what is
# missing (scripts/setup.sh), provisions a throwaway SoftHSM2 token in a
# temporary directory (scripts/dev-softhsm.sh), signs a message the way the LAP
# gateway does (base64 in, base64 out) with the pinned-key check on, and
# removes the token again.
set -Eeuo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

main() {
  [[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; return 0; }
  bash "$ROOT/scripts/setup.sh"
  DEMO_DIR=$(mktemp -d "${TMPDIR:-/tmp}/lap-demo.XXXXXX")
  trap 'rm -rf "$DEMO_DIR"' EXIT
  bash "$ROOT/scripts/dev-softhsm.sh" "$DEMO_DIR" >/dev/null
  local message signature
  message="LAP demo receipt $(date -u +%FT%TZ)"
  # base64(message) and a newline on stdin, as the gateway sends it.
  signature=$(printf '%s\n' "$(printf '%s' "$message" | base64 -w0)" \
    | "${VENV:-$ROOT/.venv}/bin/lap-pkcs11" sign --env-file "$DEMO_DIR/signer.env" --input base64)
  echo "$PROG: message:   $message"
  echo "$PROG: signature: $signature"
  echo "$PROG: verified against the token's public key (LAP_PKCS11_EXPECT_PUBLIC_KEY) before it was printed"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
