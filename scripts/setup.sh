#!/usr/bin/env bash
# Usage: scripts/setup.sh [--test]
#
# Prepares this checkout: installs opensc, softhsm2, openssl, socat and
# python3-venv with apt-get when any is missing (as root, or through sudo), then
# creates .venv and installs lap-pkcs11 with the agent's extra into it: a
# production install; then builds lap-pkcs11-client beside it when this host has
# a working C compiler. --test (what scripts/test.sh runs) also installs the test
# tools: shellcheck and strace, and the [test] extra (pytest, hypothesis).
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

# missing_packages [test]: the Debian packages to install, into MISSING.
missing_packages() {
  MISSING=()
  command -v pkcs11-tool >/dev/null || MISSING+=(opensc)
  command -v softhsm2-util >/dev/null || MISSING+=(softhsm2)
  command -v openssl >/dev/null || MISSING+=(openssl)
  command -v socat >/dev/null || MISSING+=(socat)
  python3 -c 'import ensurepip, venv' 2>/dev/null || MISSING+=(python3-venv)
  [[ ${1:-} == test ]] || return 0
  command -v shellcheck >/dev/null || MISSING+=(shellcheck)
  command -v strace >/dev/null || MISSING+=(strace)
}

install_packages() {
  local missing
  missing_packages "$@"
  missing=("${MISSING[@]}")
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
  local mode="" extras=agent
  case ${1:-} in
    --test) mode=test extras=test,agent ;;
    "") ;;
    *) abort "unknown option $1; see --help" ;;
  esac
  install_packages "$mode"
  local venv=${VENV:-$ROOT/.venv}
  # Debian's own python3, so the benchmarked interpreter is the one operators run.
  local python=/usr/bin/python3
  [[ -x $python ]] || python=$(command -v python3)
  [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
  # setuptools builds in build/ and never removes what is no longer in the tree: a
  # module moved or deleted would be installed again from there.
  rm -rf "$ROOT/build"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${ROOT}[$extras]"
  install_client "$venv"
  echo "$PROG: lap-pkcs11 installed in $venv" >&2
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
