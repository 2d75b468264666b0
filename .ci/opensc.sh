#!/usr/bin/env bash
# Usage: .ci/opensc.sh [build|test|all]
#
# Builds pkcs11-tool from the OpenSC release sources kept beside the clone
# ($REPO/../shared/opensc, or $LAP_OPENSC_SRC_DIR when that is absent) into
# /opt/opensc-VERSION, and runs the contract and operator tests against each
# build (LAP_TEST_PKCS11_TOOL selects the binary for the tests and fixtures).
# A build is reused when /opt/opensc-VERSION holds one made from a tarball
# with the same SHA-256. Without an argument it does both (all).
set -Eeuo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSIONS=(0.26.1 0.27.1)
# The contract and operator tests: every file that runs pkcs11-tool or reads its output.
TESTS=(tests/test_sign_contract.py tests/test_sign_errors.py tests/test_sign_process.py
  tests/test_pin_guard.py tests/test_vectors.py tests/test_properties.py tests/test_mirror.py
  tests/test_operator.py tests/test_listings.py tests/test_gateway_e2e.py tests/test_uri.py)

abort() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }

source_dir() {
  local dir=$ROOT/../shared/opensc
  [[ -d $dir ]] || dir=${LAP_OPENSC_SRC_DIR:-}
  [[ -n $dir && -d $dir ]] || abort "no OpenSC sources: neither $ROOT/../shared/opensc nor \$LAP_OPENSC_SRC_DIR"
  printf '%s\n' "$dir"
}

install_build_deps() {
  local missing=() pkg
  for pkg in autoconf automake libtool pkg-config libssl-dev libpcsclite-dev zlib1g-dev \
    libreadline-dev gengetopt xsltproc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# build_one VERSION TARBALL: build into /opt/opensc-VERSION unless already built from it.
build_one() {
  local version=$1 tarball=$2 dest=/opt/opensc-$1 sum work start
  sum=$(sha256sum "$tarball" | cut -d' ' -f1)
  if [[ -x $dest/bin/pkcs11-tool && $(cat "$dest/.lap-tarball-sha256" 2>/dev/null) == "$sum" ]]; then
    printf '%s: opensc %s already built from %s\n' "$PROG" "$version" "${sum:0:12}" >&2
    return 0
  fi
  start=$SECONDS
  work=$(mktemp -d "/tmp/opensc-$version.XXXXXX")
  # shellcheck disable=SC2064  # expand $work now: it is local to this function
  trap "rm -rf '$work'" RETURN
  tar -xJf "$tarball" -C "$work"
  local src
  src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
  [[ -n $src ]] || abort "$tarball holds no directory"
  rm -rf "$dest"
  (
    cd "$src"
    ./bootstrap
    ./configure --prefix="$dest" --disable-doc --disable-man --disable-notify \
      --disable-tests --disable-cmocka --disable-autostart-items --disable-strict
    make -j"$(nproc)"
    make install
  ) >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; abort "building opensc $version failed"; }
  "$dest/bin/pkcs11-tool" --help >/dev/null 2>&1 || true
  [[ -x $dest/bin/pkcs11-tool ]] || abort "opensc $version built no pkcs11-tool"
  printf '%s\n' "$sum" >"$dest/.lap-tarball-sha256"
  printf '%s: opensc %s built in %d s\n' "$PROG" "$version" "$((SECONDS - start))" >&2
}

build() {
  local dir version
  dir=$(source_dir)
  install_build_deps
  for version in "${VERSIONS[@]}"; do
    [[ -f $dir/opensc-$version.tar.xz ]] || abort "missing $dir/opensc-$version.tar.xz"
    build_one "$version" "$dir/opensc-$version.tar.xz"
  done
}

run_tests() {
  local version status=0 start tool
  bash "$ROOT/scripts/setup.sh" --test
  cd "$ROOT"
  for version in "${VERSIONS[@]}"; do
    tool=/opt/opensc-$version/bin/pkcs11-tool
    # The tests would skip without it; here its absence is a failure.
    [[ -x $tool ]] || abort "$tool is missing; run $0 build first"
    start=$SECONDS
    printf '%s: tests against pkcs11-tool %s\n' "$PROG" "$version" >&2
    LAP_TEST_PKCS11_TOOL=$tool "${VENV:-$ROOT/.venv}/bin/python" -m pytest -q "${TESTS[@]}" \
      || status=$?
    printf '%s: pkcs11-tool %s tests took %d s\n' "$PROG" "$version" "$((SECONDS - start))" >&2
    ((status == 0)) || abort "tests against pkcs11-tool $version failed"
  done
}

main() {
  case ${1:-all} in
    -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0" ;;
    build) build ;;
    test) run_tests ;;
    all) build && run_tests ;;
    *) abort "unknown action: $1 (build, test or all)" ;;
  esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
