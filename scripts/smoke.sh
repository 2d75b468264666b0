#!/bin/bash
# Usage: scripts/smoke.sh [--pubkey PEM_FILE] [SIGNER_CMD]
#
# The post-deployment smoke test: signs a random message through the signer
# command exactly as the LAP gateway does (the command string split like
# Python's shlex.split and run without a shell; base64(message) and a newline
# on stdin; stdout stripped and base64-decoded to 64 bytes; killed after the
# gateway's timeout, default 2.0 s), then verifies the signature with
# `openssl pkeyutl -verify -rawin`. Prints one PASS or FAIL line with the
# latency; the exit status follows (0 pass, 1 fail, 64 usage).
#
# SIGNER_CMD: the argument, else LAP_GATEWAY_SIGNING_CMD (killed after
# LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS), else SIGNER_CMD (killed after
# SIGNER_TIMEOUT_SECONDS); an argument is killed after whichever of the two is set.
# Public key: --pubkey FILE (from `lap-pkcs11 pubkey --format pem`), else
# LAP_GATEWAY_PUBLIC_KEY_HEX, else LAP_PKCS11_EXPECT_PUBLIC_KEY (64 hex characters).
# Needs bash, coreutils and openssl besides the signer.
set -Eeuo pipefail

PROG=${0##*/}
# DER header of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow it.
readonly SPKI_PREFIX='\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00'

usage() { sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
abort() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 64; }
result() { printf '%s: %s\n' "$PROG" "$1"; }

# split_command TEXT: Python's shlex.split (POSIX mode) into the WORDS array.
split_command() {
  local text=$1 word="" have="" c i=0 n=${#1} quote=""
  WORDS=()
  while ((i < n)); do
    c=${text:i:1}
    i=$((i + 1))
    if [[ $quote == "'" ]]; then
      if [[ $c == "'" ]]; then quote=""; else word+=$c; fi
    elif [[ $quote == '"' ]]; then
      if [[ $c == '"' ]]; then quote=""
      elif [[ $c == "\\" && $i -lt $n && ${text:i:1} == [\\\"\$\`] ]]; then word+=${text:i:1}; i=$((i + 1))
      else word+=$c; fi
    elif [[ $c == [[:space:]] ]]; then
      [[ -n $have ]] && WORDS+=("$word")
      word="" have=""
    elif [[ $c == "'" || $c == '"' ]]; then
      quote=$c have=1
    elif [[ $c == "\\" ]]; then
      ((i < n)) || { REPLY="no escaped character"; return 1; }
      word+=${text:i:1} have=1
      i=$((i + 1))
    else
      word+=$c have=1
    fi
  done
  [[ -z $quote ]] || { REPLY="no closing quotation"; return 1; }
  [[ -n $have ]] && WORDS+=("$word")
  return 0
}

public_key_pem() {
  if [[ -n ${PUBKEY_FILE-} ]]; then
    [[ -r $PUBKEY_FILE ]] || abort "cannot read $PUBKEY_FILE"
    cat -- "$PUBKEY_FILE"
    return 0
  fi
  local hex=${LAP_GATEWAY_PUBLIC_KEY_HEX:-${LAP_PKCS11_EXPECT_PUBLIC_KEY-}}
  [[ $hex =~ ^[0-9a-fA-F]{64}$ ]] \
    || abort "no public key: give --pubkey FILE or set LAP_GATEWAY_PUBLIC_KEY_HEX"
  local escaped=$SPKI_PREFIX i
  for ((i = 0; i < 64; i += 2)); do escaped+="\\x${hex:i:2}"; done
  printf -- '-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n' \
    "$(printf '%b' "$escaped" | base64 -w0)"
}

main() {
  local command=""
  while (($#)); do
    case $1 in
      -h|--help) usage; return 0 ;;
      --pubkey) (($# > 1)) || abort "--pubkey needs a file"; PUBKEY_FILE=$2; shift 2 ;;
      *) [[ -z $command ]] || abort "one SIGNER_CMD only (quote it)"; command=$1; shift ;;
    esac
  done
  local timeout=${SIGNER_TIMEOUT_SECONDS:-${LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS:-2.0}} dir
  if [[ -z $command && -n ${LAP_GATEWAY_SIGNING_CMD-} ]]; then
    command=$LAP_GATEWAY_SIGNING_CMD timeout=${LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS:-2.0}
  fi
  command=${command:-${SIGNER_CMD-}}
  [[ -n $command ]] || abort "no signer command: pass it as an argument or set LAP_GATEWAY_SIGNING_CMD"
  command -v openssl >/dev/null || abort "openssl not found; apt-get install openssl"
  split_command "$command" || abort "SIGNER_CMD does not split: $REPLY"
  ((${#WORDS[@]} > 0)) || abort "SIGNER_CMD is empty"
  dir=$(mktemp -d "${TMPDIR:-/tmp}/lap-smoke.XXXXXX")
  # shellcheck disable=SC2064 # expand dir now: it is local
  trap "rm -rf -- '$dir'" EXIT
  public_key_pem > "$dir/key.pem"
  head -c 600 /dev/urandom > "$dir/message"
  local start end status=0 out
  start=${EPOCHREALTIME/./}
  { base64 -w0 "$dir/message"; echo; } > "$dir/stdin"
  timeout -s KILL "$timeout" "${WORDS[@]}" < "$dir/stdin" > "$dir/stdout" 2> "$dir/stderr" || status=$?
  end=${EPOCHREALTIME/./}
  local ms
  ms=$(((end - start) / 1000))
  if ((status == 137)); then
    result "FAIL: the signer did not answer within ${timeout}s (killed, as the gateway would) after ${ms} ms"
    return 1
  elif ((status != 0)); then
    out=$(head -c 500 "$dir/stderr" | tr '\n' ' ')
    result "FAIL: the signer exited $status after ${ms} ms: ${out:-no stderr}"
    return 1
  fi
  out=$(tr -d ' \t\r\n' < "$dir/stdout")
  if ! [[ $out =~ ^[A-Za-z0-9+/]{86}==$ ]] || ! base64 -d <<< "$out" > "$dir/signature" 2>/dev/null; then
    result "FAIL: stdout is not the base64 of a 64-byte signature (${ms} ms)"
    return 1
  fi
  if ! openssl pkeyutl -verify -pubin -inkey "$dir/key.pem" -rawin -in "$dir/message" \
      -sigfile "$dir/signature" >/dev/null 2>&1; then
    result "FAIL: the signature does not verify under the public key (${ms} ms)"
    return 1
  fi
  result "PASS: signed and verified a 600-byte message in ${ms} ms"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
