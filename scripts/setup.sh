#!/usr/bin/env bash
# Usage: scripts/setup.sh
#
# Prepares this checkout: installs opensc, softhsm2, openssl, shellcheck,
# strace, socat and python3-venv with apt-get when any is missing (as root, or through sudo), then creates
# .venv and installs lap-pkcs11 with its test dependencies and the agent's extra into it,
# then builds lap-pkcs11-client beside it when this host has a working C compiler.
# Environment: VENV (default: .venv in the checkout).
set -Eeuo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

abort() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else abort "need root to run: $*"
  fi
}

install_packages() {
  local missing=()
  command -v pkcs11-tool >/dev/null || missing+=(opensc)
  command -v softhsm2-util >/dev/null || missing+=(softhsm2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  command -v strace >/dev/null || missing+=(strace)
  command -v socat >/dev/null || missing+=(socat)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || abort "install these first: ${missing[*]}"
  echo "$PROG: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# install_client VENV: the compiled client beside lap-pkcs11, when this host can build it.
# Without a C compiler the install still succeeds: the gateway runs `lap-pkcs11 client`.
install_client() {
  "$1/bin/lap-pkcs11" install-client >&2 ||
    echo "$PROG: no lap-pkcs11-client (see above); the gateway's command for the agent is" \
      "'$1/bin/lap-pkcs11 client', the same contract with a slower start" >&2
}

main() {
  [[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; return 0; }
  install_packages
  local venv=${VENV:-$ROOT/.venv}
  # Debian's own python3, so the benchmarked interpreter is the one operators run.
  local python=/usr/bin/python3
  [[ -x $python ]] || python=$(command -v python3)
  [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${ROOT}[test,agent]"
  install_client "$venv"
  echo "$PROG: lap-pkcs11 installed in $venv" >&2
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
