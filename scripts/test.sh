#!/usr/bin/env bash
# Usage: scripts/test.sh [PYTEST ARGS...]
#
# Runs the test suite against real SoftHSM2 tokens and the real pkcs11-tool:
# installs what is missing (scripts/setup.sh), lints the shell scripts (with
# ShellCheck), then runs pytest in .venv. Fails when pytest collects nothing.
# Runs as root or as any user (CI runs it both ways, see .ci/run).
# Environment: VENV (default: .venv in the checkout); SKIP_SETUP=1 uses VENV
# as it is, without scripts/setup.sh (a venv that root prepared for this user).
set -Eeuo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

abort() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }

main() {
  [[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; return 0; }
  local venv=${VENV:-$ROOT/.venv}
  if [[ ${SKIP_SETUP:-} == 1 ]]; then
    [[ -x $venv/bin/lap-pkcs11 ]] || abort "SKIP_SETUP=1, but $venv has no lap-pkcs11; run scripts/setup.sh"
  else
    bash "$ROOT/scripts/setup.sh" --test
  fi
  cd "$ROOT"
  shellcheck scripts/*.sh tests/fakes/fake-pkcs11-tool || abort "shellcheck found problems"
  local status=0
  "$venv/bin/python" -m pytest "$@" || status=$?
  [[ $status -eq 5 ]] && abort "pytest collected no tests"
  return "$status"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
