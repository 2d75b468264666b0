#!/usr/bin/env bash
# Usage: scripts/dev-softhsm.sh [DIR]
#
# Provisions a throwaway SoftHSM2 token for development in DIR (default
# ./.softhsm): a token labelled lap-dev with one Ed25519 key (id 01, label
# lap-signer, sensitive and never extractable), and DIR/signer.env with
# SOFTHSM2_CONF, the module, the token label, the key id, the pinned public key
# and the PIN variable. Running it again reuses the token and the key.
# LAP_PKCS11_TOOL selects the pkcs11-tool (and goes into signer.env); the token
# is read and the key made through this checkout's lap-pkcs11.
# Development only: the PIN sits in DIR/signer.env (mode 0600).
set -Eeuo pipefail

PROG=${0##*/}
TOKEN_LABEL=lap-dev
KEY_ID=01
KEY_LABEL=lap-signer
MODULES=(/usr/lib/softhsm/libsofthsm2.so
         /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so
         /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so)

abort() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }

find_module() {
  local module
  for module in "${MODULES[@]}"; do
    [[ -e $module ]] && { printf '%s\n' "$module"; return 0; }
  done
  abort "SoftHSM2 module not found; apt-get install softhsm2"
}

# The env file is our own data: read one KEY=VALUE back without sourcing it.
env_value() {
  local key=$1 file=$2 line
  while IFS= read -r line; do
    [[ $line == "$key="* ]] && { printf '%s\n' "${line#*=}"; return 0; }
  done < "$file"
  return 1
}

# lap-pkcs11 of this checkout's venv (VENV, default .venv), else the one on PATH.
find_lap() {
  local root venv
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  venv=${VENV:-$root/.venv}
  if [[ -x $venv/bin/lap-pkcs11 ]]; then printf '%s\n' "$venv/bin/lap-pkcs11"; return 0; fi
  command -v lap-pkcs11 || abort "lap-pkcs11 not found; run scripts/setup.sh first"
}

main() {
  [[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; return 0; }
  command -v softhsm2-util >/dev/null || abort "softhsm2-util not found; apt-get install softhsm2"
  command -v "${LAP_PKCS11_TOOL:-pkcs11-tool}" >/dev/null \
    || abort "${LAP_PKCS11_TOOL:-pkcs11-tool} not found; apt-get install opensc"
  local dir=${1:-./.softhsm} module pin
  umask 077
  mkdir -p "$dir/tokens"
  dir=$(cd "$dir" && pwd)
  module=$(find_module)
  export SOFTHSM2_CONF=$dir/softhsm2.conf
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$dir/tokens" > "$SOFTHSM2_CONF"
  if [[ -f $dir/signer.env ]] && pin=$(env_value PKCS11_PIN "$dir/signer.env"); then
    :
  else
    pin=$(od -An -N8 -tu8 /dev/urandom | tr -dc 0-9 | cut -c1-8)
  fi
  export PKCS11_PIN=$pin
  # lap-pkcs11 reads the token (its parser knows every OpenSC's listing): the key's
  # public key, or which of token and key is missing. keygen refuses a taken id.
  local lap_cli public status=0 token=(--module "$module" --token-label "$TOKEN_LABEL")
  lap_cli=$(find_lap)
  public=$("$lap_cli" pubkey "${token[@]}" --key-id "$KEY_ID" 2>"$dir/lap.err") || status=$?
  if ((status != 0)) && grep -q '^lap-pkcs11: TOKEN_NOT_FOUND:' "$dir/lap.err"; then
    softhsm2-util --init-token --free --label "$TOKEN_LABEL" --so-pin "$(od -An -N8 -tu8 /dev/urandom | tr -dc 0-9)" \
      --pin "$PKCS11_PIN" >/dev/null
  fi
  if ((status != 0)); then
    grep -q '^lap-pkcs11: \(TOKEN\|KEY\)_NOT_FOUND:' "$dir/lap.err" || abort "$(head -n1 "$dir/lap.err")"
    public=$("$lap_cli" keygen "${token[@]}" --key-id "$KEY_ID" --key-label "$KEY_LABEL" 2>"$dir/lap.err") \
      || abort "key generation failed: $(head -n1 "$dir/lap.err")"
  fi
  rm -f "$dir/lap.err"
  cat > "$dir/signer.env" <<ENV
# Development signer settings, written by $PROG. Not for production: the PIN is here.
SOFTHSM2_CONF=$SOFTHSM2_CONF
LAP_PKCS11_MODULE=$module
LAP_PKCS11_TOKEN_LABEL=$TOKEN_LABEL
LAP_PKCS11_KEY_ID=$KEY_ID
LAP_PKCS11_EXPECT_PUBLIC_KEY=$public
LAP_PKCS11_PIN_ENV=PKCS11_PIN
PKCS11_PIN=$PKCS11_PIN
ENV
  [[ -z ${LAP_PKCS11_TOOL-} ]] || printf 'LAP_PKCS11_TOOL=%s\n' "$LAP_PKCS11_TOOL" >> "$dir/signer.env"
  cat <<NEXT
Token $TOKEN_LABEL with Ed25519 key $KEY_ID ($KEY_LABEL) is ready in $dir.
Public key (LAP_GATEWAY_PUBLIC_KEY_HEX): $public
Next:
  printf 'hello' | lap-pkcs11 sign --env-file $dir/signer.env
  printf 'hello' | base64 | lap-pkcs11 sign --env-file $dir/signer.env --input base64
NEXT
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
