#!/bin/bash
# Usage: pkcs11_signer.sh [OPTIONS] < message > signature
#
# The shell mirror of `lap-pkcs11 sign`, for hosts with only bash, coreutils,
# util-linux and OpenSC: the same options, environment variables, defaults,
# precedence, encodings, error names and exit codes. It signs stdin with an
# Ed25519 key on a PKCS#11 token through pkcs11-tool and prints only the
# signature; on failure stdout stays empty and stderr gets one line
# `lap-pkcs11: NAME: ...`.
#
# Options (environment variables in brackets, looked up in that order):
#   --module PATH             PKCS#11 module (.so). Required. [LAP_PKCS11_MODULE]
#   --slot ID                 token by slot id [LAP_PKCS11_SLOT]
#   --slot-index N            token by slot index [LAP_PKCS11_SLOT_INDEX]
#   --token-label L           token by label [LAP_PKCS11_TOKEN_LABEL]
#   --key-id HEX              private key by CKA_ID [LAP_PKCS11_KEY_ID]
#   --key-label L             private key by CKA_LABEL [LAP_PKCS11_KEY_LABEL]
#   --mechanism M             default EDDSA [LAP_PKCS11_MECHANISM]
#   --pin-env NAME            variable holding the PIN, default PKCS11_PIN [LAP_PKCS11_PIN_ENV]
#   --pin-file PATH           file whose first line is the PIN [LAP_PKCS11_PIN_FILE]
#   --input raw|base64        default raw; the LAP gateway sends base64 [LAP_PKCS11_INPUT]
#   --output base64|hex|raw   default base64 [LAP_PKCS11_OUTPUT, SIGNER_OUTPUT]
#   --timeout-ms N            default 1500 [LAP_PKCS11_TIMEOUT_MS, SIGNER_TIMEOUT_MS]
#   --env-file PATH           dotenv data file, default .env.pkcs11 if present [LAP_PKCS11_ENV_FILE]
#   --pkcs11-tool PATH        default pkcs11-tool on PATH [LAP_PKCS11_TOOL]
#   --expect-public-key HEX   pinned key, checked with openssl
#                             [LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX]
#   --lock-dir PATH           lock file directory, or none [LAP_PKCS11_LOCK_DIR]
#   -h, --help                show this help
# SIGNER_TIMEOUT_SECONDS (the gateway's deadline) caps the deadline, less 250 ms.
set -Eeuo pipefail
LC_ALL=C

readonly MAX_MESSAGE=1024
readonly READ_LIMIT=$((4 * ((MAX_MESSAGE + 2) / 3) + 4096))
readonly CALLER_MARGIN_MS=250 MIN_DEADLINE_MS=50

# attr|flag|variables|default: the same table as lap_pkcs11/options.py.
readonly OPTION_TABLE=(
  "module|--module|LAP_PKCS11_MODULE|"
  "slot|--slot|LAP_PKCS11_SLOT|"
  "slot_index|--slot-index|LAP_PKCS11_SLOT_INDEX|"
  "token_label|--token-label|LAP_PKCS11_TOKEN_LABEL|"
  "key_id|--key-id|LAP_PKCS11_KEY_ID|"
  "key_label|--key-label|LAP_PKCS11_KEY_LABEL|"
  "mechanism|--mechanism|LAP_PKCS11_MECHANISM|EDDSA"
  "pin_env|--pin-env|LAP_PKCS11_PIN_ENV|PKCS11_PIN"
  "pin_file|--pin-file|LAP_PKCS11_PIN_FILE|"
  "input|--input|LAP_PKCS11_INPUT|raw"
  "output|--output|LAP_PKCS11_OUTPUT SIGNER_OUTPUT|base64"
  "timeout_ms|--timeout-ms|LAP_PKCS11_TIMEOUT_MS SIGNER_TIMEOUT_MS|1500"
  "env_file|--env-file|LAP_PKCS11_ENV_FILE|"
  "pkcs11_tool|--pkcs11-tool|LAP_PKCS11_TOOL|pkcs11-tool"
  "expect_public_key|--expect-public-key|LAP_PKCS11_EXPECT_PUBLIC_KEY LAP_GATEWAY_PUBLIC_KEY_HEX|"
  "lock_dir|--lock-dir|LAP_PKCS11_LOCK_DIR|"
  "caller_timeout_ms||SIGNER_TIMEOUT_SECONDS|"
  "agent_socket|--socket|LAP_PKCS11_AGENT_SOCKET|/run/lap-pkcs11/agent.sock"
  "agent_allow_users|--allow-users|LAP_PKCS11_AGENT_ALLOW_USERS|"
  "agent_allow_groups|--allow-groups|LAP_PKCS11_AGENT_ALLOW_GROUPS|"
  "agent_workers|--workers|LAP_PKCS11_AGENT_WORKERS|2"
  "agent_max_connections|--max-connections|LAP_PKCS11_AGENT_MAX_CONNECTIONS|128"
  "agent_read_timeout_ms|--read-timeout-ms|LAP_PKCS11_AGENT_READ_TIMEOUT_MS|1000"
)
readonly SCRUBBED_ENV=(OPENSC_DEBUG PKCS11SPY PKCS11SPY_OUTPUT)
readonly GATEWAY_MARKERS=(LAP_GATEWAY_SIGNING_CMD LAP_GATEWAY_KEYSET_JSON LAP_GATEWAY_KEYSET_FILE)
readonly B64=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/

declare -A FLAG_ATTR=() FLAGS=() VAL=() SRC=() FILE_ENV=() EXIT_CODE=(
  [CONFIG_INVALID]=64 [INPUT_INVALID]=65 [MESSAGE_TOO_LARGE]=65 [TOOL_NOT_FOUND]=69
  [MODULE_LOAD_FAILED]=69 [TOKEN_NOT_FOUND]=69 [KEY_NOT_FOUND]=69 [MECHANISM_UNSUPPORTED]=69
  [PIN_MISSING]=77 [PIN_INCORRECT]=77 [PIN_LOCKED]=77 [TIMEOUT]=75 [KEY_MISMATCH]=70
  [SIGNING_FAILED]=70)
START_US=${EPOCHREALTIME/./}
DEADLINE_US=0
BYTES=()

# fail NAME MESSAGE: the one stderr line and the error's exit code; stdout stays empty.
fail() {
  local text IFS=$' \t\n'
  read -r -d '' -a text <<< "$2" || true
  printf 'lap-pkcs11: %s: %s\n' "$1" "${text[*]}" >&2
  exit "${EXIT_CODE[$1]}"
}

usage() { sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

trim() {  # trim VAR: strip surrounding whitespace in place
  local -n _value=$1
  _value=${_value#"${_value%%[![:space:]]*}"}
  _value=${_value%"${_value##*[![:space:]]}"}
}

parse_args() {
  local entry attr flag arg name value
  for entry in "${OPTION_TABLE[@]}"; do
    attr=${entry%%|*} flag=${entry#*|}
    flag=${flag%%|*}
    [[ -n $flag ]] && FLAG_ATTR[$flag]=$attr
  done
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h|--help) usage; exit 0 ;;
      --debug) continue ;;
    esac
    name=${arg%%=*}
    attr=${FLAG_ATTR[$name]-}
    if [[ -z $attr ]]; then
      [[ $arg == -* ]] && fail CONFIG_INVALID "unknown option '$name'; see --help"
      fail CONFIG_INVALID "unknown argument '$name'; see --help"
    fi
    if [[ $arg == *=* ]]; then
      value=${arg#*=}
    else
      (($#)) || fail CONFIG_INVALID "$name needs a value"
      value=$1
      shift
    fi
    [[ -v FLAGS[$attr] ]] && fail CONFIG_INVALID "$name is given twice; keep one"
    FLAGS[$attr]=$value
  done
}

# quoted_value TEXT: parse a quoted dotenv value at the start of TEXT into REPLY.
quoted_value() {
  local text=$1 quote=${1:0:1} out="" i=1 c next tail
  while ((i < ${#text})); do
    c=${text:i:1}
    if [[ $c == "$quote" ]]; then
      tail=${text:i+1}
      trim tail
      [[ -z $tail || $tail == \#* ]] || { REPLY="unexpected text after the closing quote"; return 1; }
      [[ $quote == '"' && $out == *"\${"* ]] && { REPLY="\${...} expansion is not supported; write the value out"; return 1; }
      REPLY=$out
      return 0
    fi
    if [[ $c == "\\" ]] && ((i + 1 < ${#text})); then
      next=${text:i+1:1}
      if [[ $quote == '"' ]]; then
        case $next in
          "\\"|"'"|'"') out+=$next; ((i += 2)); continue ;;
          a) out+=$'\a'; ((i += 2)); continue ;;
          b) out+=$'\b'; ((i += 2)); continue ;;
          f) out+=$'\f'; ((i += 2)); continue ;;
          n) out+=$'\n'; ((i += 2)); continue ;;
          r) out+=$'\r'; ((i += 2)); continue ;;
          t) out+=$'\t'; ((i += 2)); continue ;;
          v) out+=$'\v'; ((i += 2)); continue ;;
        esac
      elif [[ $next == "\\" || $next == "'" ]]; then
        out+=$next
        ((i += 2))
        continue
      fi
    fi
    out+=$c
    ((i += 1))
  done
  REPLY="the quoted value does not end on this line"
  return 1
}

# load_env_file PATH: the dotenv subset of lap_pkcs11/envfile.py, read as data.
load_env_file() {
  local path=$1 line key rest number=0 value
  [[ -f $path && -r $path ]] || fail CONFIG_INVALID \
    "env file $path cannot be read; fix the path in --env-file or LAP_PKCS11_ENV_FILE"
  while IFS= read -r line || [[ -n $line ]]; do
    ((number += 1))
    trim line
    [[ -z $line || $line == \#* ]] && continue
    if [[ $line == "export "* || $line == "export"$'\t'* ]]; then
      line=${line:7}
      trim line
    fi
    [[ $line == *=* ]] || fail CONFIG_INVALID "env file $path: line $number is not KEY=VALUE"
    key=${line%%=*}
    rest=${line#*=}
    trim key
    trim rest
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] \
      || fail CONFIG_INVALID "env file $path: line $number is not KEY=VALUE"
    if [[ $rest == [\'\"]* ]]; then
      quoted_value "$rest" || fail CONFIG_INVALID "env file $path: line $number: $REPLY"
      value=$REPLY
    else
      if [[ $rest == \#* ]]; then value=""; else value=${rest%%[[:blank:]]#*}; fi
      trim value
      [[ $value == *"\${"* ]] && fail CONFIG_INVALID \
        "env file $path: line $number: \${...} expansion is not supported; write the value out"
    fi
    FILE_ENV[$key]=$value
  done < "$path"
}

# describe ATTR FLAG: where an option's value came from, for error messages.
describe() {
  case ${SRC[$1]} in
    flag) REPLY=$2 ;;
    env:*) REPLY="${SRC[$1]#env:} (from the environment)" ;;
    file:*) REPLY="${SRC[$1]#file:} (from the env file)" ;;
    *) REPLY=$2 ;;
  esac
}

bad() { describe "$1" "$2"; fail CONFIG_INVALID "$REPLY $3"; }

# parse_value ATTR FLAG: validate and normalise VAL[ATTR] as options.py does.
parse_value() {
  local attr=$1 flag=$2 v=${VAL[$1]} whole fraction
  case $attr in
    module|token_label|key_label|pin_file|pkcs11_tool|lock_dir|env_file)
      [[ $v == *$'\n'* ]] && bad "$attr" "$flag" "must be one line of text" ;;
    slot|slot_index)
      trim v
      if [[ ${v:0:2} == [0][xX] && ${v:2} =~ ^[0-9a-fA-F]+$ ]]; then v=$((16#${v:2}))
      elif [[ $v =~ ^[0-9]+$ ]]; then v=$((10#$v))
      else bad "$attr" "$flag" "must be a non-negative whole number (decimal, or hex with 0x)"; fi ;;
    key_id)
      v=${v,,}
      v=${v//:/}
      [[ $v =~ ^([0-9a-f]{2})+$ ]] \
        || bad "$attr" "$flag" "must be an even number of hex digits, e.g. 01 or a1b2" ;;
    mechanism)
      trim v
      v=${v^^}
      [[ $v =~ ^[A-Z0-9_-]+$ ]] || bad "$attr" "$flag" "must be a pkcs11-tool mechanism name such as EDDSA" ;;
    pin_env)
      [[ $v =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] \
        || bad "$attr" "$flag" "must be an environment variable name such as PKCS11_PIN" ;;
    input)
      trim v
      v=${v,,}
      [[ $v == raw || $v == base64 ]] || bad "$attr" "$flag" "must be one of raw, base64" ;;
    output)
      trim v
      v=${v,,}
      [[ $v == base64 || $v == hex || $v == raw ]] || bad "$attr" "$flag" "must be one of base64, hex, raw" ;;
    timeout_ms)
      trim v
      if ! [[ $v =~ ^[0-9]+$ ]] || ((${#v} > 7 || 10#$v < 1 || 10#$v > 600000)); then
        bad "$attr" "$flag" "must be a whole number of milliseconds from 1 to 600000"
      fi
      v=$((10#$v)) ;;
    expect_public_key)
      trim v
      v=${v,,}
      [[ $v =~ ^[0-9a-f]{64}$ ]] \
        || bad "$attr" "$flag" "must be 64 hex characters (a 32-byte Ed25519 public key)" ;;
    caller_timeout_ms)
      trim v
      [[ $v =~ ^([0-9]*)\.?([0-9]*)$ && $v != . && -n $v ]] \
        || bad "$attr" "$flag" "must be a number of seconds such as 2 or 1.5"
      whole=${BASH_REMATCH[1]:-0} fraction=${BASH_REMATCH[2]}000
      ((${#whole} <= 6)) || bad "$attr" "$flag" "must be more than 0 and less than 86400 seconds"
      v=$((10#$whole * 1000 + 10#${fraction:0:3}))
      ((v > 0 && v < 86400000)) || bad "$attr" "$flag" "must be more than 0 and less than 86400 seconds" ;;
  esac
  VAL[$attr]=$v
}

resolve() {
  local entry attr flag names default name found path
  if [[ -v FLAGS[env_file] ]]; then path=${FLAGS[env_file]}; SRC[env_file]=flag
  elif [[ -n ${LAP_PKCS11_ENV_FILE-} ]]; then path=$LAP_PKCS11_ENV_FILE; SRC[env_file]=env:LAP_PKCS11_ENV_FILE
  elif [[ -f .env.pkcs11 ]]; then path=.env.pkcs11; SRC[env_file]=default
  else path=""; SRC[env_file]="unset"
  fi
  [[ -n $path || ${SRC[env_file]} != unset ]] && load_env_file "$path"
  VAL[env_file]=$path
  for entry in "${OPTION_TABLE[@]}"; do
    attr=${entry%%|*} entry=${entry#*|}
    flag=${entry%%|*} entry=${entry#*|}
    names=${entry%%|*} default=${entry#*|}
    [[ $attr == env_file ]] && continue
    found=""
    if [[ -v FLAGS[$attr] ]]; then
      VAL[$attr]=${FLAGS[$attr]}; SRC[$attr]=flag; found=1
    fi
    if [[ -z $found ]]; then
      for name in $names; do
        if [[ -n ${!name-} ]]; then VAL[$attr]=${!name}; SRC[$attr]=env:$name; found=1; break; fi
      done
    fi
    if [[ -z $found ]]; then
      for name in $names; do
        if [[ -n ${FILE_ENV[$name]-} ]]; then
          VAL[$attr]=${FILE_ENV[$name]}; SRC[$attr]=file:$name; found=1; break
        fi
      done
    fi
    if [[ -z $found && -n $default ]]; then VAL[$attr]=$default; SRC[$attr]=default; found=1; fi
    if [[ -z $found ]]; then SRC[$attr]="unset"; continue; fi
    parse_value "$attr" "$flag"
  done
  [[ -n ${VAL[module]-} ]] || fail CONFIG_INVALID "no PKCS#11 module: give --module PATH or set LAP_PKCS11_MODULE"
  local selectors=()
  [[ -v VAL[slot] ]] && selectors+=(--slot)
  [[ -v VAL[slot_index] ]] && selectors+=(--slot-index)
  [[ -v VAL[token_label] ]] && selectors+=(--token-label)
  if ((${#selectors[@]} > 1)); then
    local joined="${selectors[*]}"
    fail CONFIG_INVALID "${joined// / and } both select a token; keep only one"
  fi
  if [[ -v VAL[key_id] && -v VAL[key_label] ]]; then
    fail CONFIG_INVALID "both of --key-id and --key-label given; give exactly one"
  elif [[ ! -v VAL[key_id] && ! -v VAL[key_label] ]]; then
    fail CONFIG_INVALID "neither of --key-id and --key-label given; give exactly one"
  fi
}

check_gateway_input() {
  [[ ${SRC[input]} == default ]] || return 0
  local name started=""
  [[ ${SIGNER_MODE-} == external ]] && started=1
  for name in "${GATEWAY_MARKERS[@]}"; do [[ -n ${!name-} ]] && started=1; done
  [[ -z $started ]] || fail CONFIG_INVALID "started by the LAP gateway, which sends base64(message), but --input is not set; add --input base64 to SIGNER_CMD (or set --input raw explicitly)"
}

set_deadline() {
  local deadline=${VAL[timeout_ms]} caller
  if [[ -v VAL[caller_timeout_ms] ]]; then
    caller=$((VAL[caller_timeout_ms] - CALLER_MARGIN_MS))
    ((caller >= MIN_DEADLINE_MS)) || fail CONFIG_INVALID "SIGNER_TIMEOUT_SECONDS leaves less than $MIN_DEADLINE_MS ms after the $CALLER_MARGIN_MS ms start-up margin; give the gateway's signer a longer timeout"
    ((caller < deadline)) && deadline=$caller
  fi
  DEADLINE_US=$((START_US + deadline * 1000))
}

# remaining: seconds left before the deadline, as S.mmmmmm, in REPLY; fails when none.
remaining() {
  local left=$((DEADLINE_US - ${EPOCHREALTIME/./}))
  ((left > 0)) || return 1
  printf -v REPLY '%d.%06d' $((left / 1000000)) $((left % 1000000))
}

# Anonymous files: bash writes a here-string at compatibility level 5.0 to a
# temporary file that it unlinks at once and keeps open, so what they will hold
# (message, signature) never has a name on disk. /dev/fd/N reopens them.
open_scratch_files() {
  local BASH_COMPAT=50 TMPDIR=${TMPDIR:-/tmp}
  [[ -d /dev/shm && -w /dev/shm ]] && TMPDIR=/dev/shm
  exec {MSG_FD}<<< "" {SIG_FD}<<< "" {ERR_FD}<<< ""
}

# stdin_error: a read that ended in an error (its message went to ERR_FD) is not EOF.
stdin_error() {
  local message=""
  IFS= read -r -N 1 message < "/dev/fd/$ERR_FD" || true
  [[ -z $message ]] || fail INPUT_INVALID "stdin cannot be read"
}

# The message on stdin, decoded into the scratch file MSG_FD.
read_message() {
  if [[ ${VAL[input]} == raw ]]; then
    head -c $((MAX_MESSAGE + 1)) > "/dev/fd/$MSG_FD" 2>/dev/null \
      || fail INPUT_INVALID "stdin cannot be read"
    local size
    size=$(stat -L -c %s "/dev/fd/$MSG_FD")
    ((size <= MAX_MESSAGE)) || fail MESSAGE_TOO_LARGE "the message is over $MAX_MESSAGE bytes; pkcs11-tool cannot sign longer EdDSA input"
    ((size > 0)) || fail INPUT_INVALID "the message is empty; the gateway never signs an empty message"
    return 0
  fi
  # A NUL byte cannot live in a shell string: reading up to NUL shows where one was.
  local text="" chunk want nul="" total=0
  while ((total <= READ_LIMIT)); do
    want=$((READ_LIMIT + 1 - total))
    chunk=""
    if ! IFS= read -r -d '' -n "$want" chunk 2> "/dev/fd/$ERR_FD"; then
      stdin_error
      text+=$chunk
      total=$((total + ${#chunk}))
      break
    fi
    text+=$chunk
    total=$((total + ${#chunk}))
    if ((${#chunk} < want)); then
      nul=1
      total=$((total + 1))
    fi
  done
  ((total <= READ_LIMIT)) || fail MESSAGE_TOO_LARGE "the message is over $MAX_MESSAGE bytes; pkcs11-tool cannot sign longer EdDSA input"
  local strict='^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$'
  text=${text#"${text%%[!$' \t\r\n\v\f']*}"}
  text=${text%"${text##*[!$' \t\r\n\v\f']}"}
  [[ -z $nul && $text =~ $strict ]] || fail INPUT_INVALID "stdin is not strict base64 (standard alphabet, padded); with --input base64 send base64(message) and a newline"
  local size=$((${#text} * 3 / 4))
  [[ $text == *= ]] && size=$((size - 1))
  [[ $text == *== ]] && size=$((size - 1))
  ((size > 0)) || fail INPUT_INVALID "the message is empty; the gateway never signs an empty message"
  ((size <= MAX_MESSAGE)) || fail MESSAGE_TOO_LARGE "the message is over $MAX_MESSAGE bytes; pkcs11-tool cannot sign longer EdDSA input"
  # Decoding runs beside the lock wait; main waits for it before signing.
  base64 -d <<< "$text" > "/dev/fd/$MSG_FD" &
  DECODER=$!
}

# The child environment: env file variables under the real environment, PIN set.
prepare_environment() {
  local name
  for name in "${!FILE_ENV[@]}"; do
    [[ -v $name ]] || export "$name=${FILE_ENV[$name]}"
  done
  for name in "${SCRUBBED_ENV[@]}"; do unset "$name"; done
  PIN_ENV=${VAL[pin_env]}
  if [[ -v VAL[pin_file] ]]; then
    [[ ${SRC[pin_env]} == default ]] || fail CONFIG_INVALID "both --pin-file and --pin-env are set; keep only one"
    [[ -n ${!PIN_ENV-} ]] && fail CONFIG_INVALID "the PIN is given twice: in $PIN_ENV and in --pin-file; remove one"
    local pin_file=${VAL[pin_file]} pin=""
    [[ -f $pin_file && -r $pin_file ]] || fail CONFIG_INVALID "PIN file $pin_file cannot be read; fix --pin-file or its permissions"
    IFS= read -r pin < "$pin_file" || true
    pin=${pin%$'\r'}
    [[ -n $pin ]] || fail PIN_MISSING "PIN file $pin_file is empty; write the user PIN in it"
    export "$PIN_ENV=$pin"
    return 0
  fi
  [[ -v $PIN_ENV ]] || fail PIN_MISSING "no PIN: set $PIN_ENV or give --pin-file"
  [[ -n ${!PIN_ENV} ]] || fail PIN_MISSING "no PIN: $PIN_ENV is empty"
  export "${PIN_ENV?}"
}

find_tool() {
  local tool=${VAL[pkcs11_tool]} folder
  if [[ $tool == */* ]]; then
    [[ -f $tool && -x $tool ]] && TOOL=$tool && return 0
  else
    local IFS=:
    for folder in ${PATH:-/usr/bin:/bin}; do
      [[ -f ${folder:-.}/$tool && -x ${folder:-.}/$tool ]] && TOOL=${folder:-.}/$tool && return 0
    done
  fi
  fail TOOL_NOT_FOUND "$tool not found; install OpenSC (apt-get install opensc) or set --pkcs11-tool"
}

# The lock file name: "module\nSOFTHSM2_CONF" with every byte outside
# [A-Za-z0-9._-] made "_", cut to 160 bytes; lap_pkcs11/signer.py builds the same.
lock_name() {
  local scope="${VAL[module]}"$'\n'"${SOFTHSM2_CONF-}"
  scope=${scope//[^A-Za-z0-9._-]/_}
  REPLY="lap-pkcs11-$EUID-${scope:0:160}.lock"
}

# start_lock: open the lock file and start waiting for it in the background
# (flock under setpriv, so it dies with us); main collects it with await_lock.
start_lock() {
  local dir=${VAL[lock_dir]-}
  [[ $dir == none ]] && return 0
  if [[ -z $dir ]]; then
    dir=${RUNTIME_DIRECTORY-}
    dir=${dir%%:*}
    [[ -n $dir ]] || dir=${XDG_RUNTIME_DIR:-/tmp}
  fi
  lock_name
  local path=$dir/$REPLY
  [[ -L $path ]] && fail CONFIG_INVALID "lock file $path is a symlink; set --lock-dir to a private directory"
  { exec {LOCK_FD}<>"$path"; } 2>/dev/null \
    || fail CONFIG_INVALID "lock file $path cannot be opened; set --lock-dir to a private directory"
  [[ -O $path ]] || fail CONFIG_INVALID "lock file $path belongs to another user; set --lock-dir to a private directory"
  MARKER=${path%.lock}.pin-rejected
  SECRET_FILE=$dir/lap-pkcs11-$EUID.secret
  remaining || fail TIMEOUT "the deadline passed before the token could be locked; raise --timeout-ms"
  setpriv --pdeathsig KILL -- flock -w "$REPLY" "$LOCK_FD" &
  LOCKER=$!
}

# The PIN guard (as lap_pkcs11/signer.py's PinGuard): a PIN the token rejected
# is remembered as sha256(host secret, newline, PIN) beside the lock file and
# never tried again, so a wrong PIN cannot lock a real token.
pin_fingerprint() {
  local secret="" line
  if [[ ! -L $SECRET_FILE ]]; then IFS= read -r secret 2>/dev/null < "$SECRET_FILE" || true; fi
  if [[ -z $secret && $1 == create && ! -L $SECRET_FILE ]]; then
    secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    { set -C; printf '%s\n' "$secret" > "$SECRET_FILE"; } 2>/dev/null \
      || IFS= read -r secret 2>/dev/null < "$SECRET_FILE" || true
    set +C
  fi
  [[ -n $secret ]] || return 1
  read -r REPLY _ < <(printf '%s\n%s' "$secret" "${!PIN_ENV}" | sha256sum)
}

check_pin_guard() {
  [[ -n ${MARKER-} && -e $MARKER && ! -L $MARKER ]] || return 0
  local seen=""
  IFS= read -r seen 2>/dev/null < "$MARKER" || true
  if pin_fingerprint check && [[ -n $seen && $seen == "$REPLY" ]]; then
    fail PIN_INCORRECT "the token rejected this PIN before and it is not tried again, so the token cannot lock; fix the PIN (if the token's PIN was changed to it, remove $MARKER)"
  fi
}

remember_rejected_pin() {
  [[ -n ${MARKER-} && ! -L $MARKER ]] || return 0
  if pin_fingerprint create; then
    printf '%s\n' "$REPLY" 2>/dev/null > "$MARKER" || true
  fi
}

await_lock() {
  [[ -n ${LOCKER-} ]] || return 0
  wait "$LOCKER" || fail TIMEOUT "the token stayed busy with other signatures until the deadline; raise --timeout-ms or lower concurrency"
}

selector_args() {
  SELECTOR=(--module "${VAL[module]}")
  if [[ -v VAL[slot] ]]; then SELECTOR+=(--slot "${VAL[slot]}")
  elif [[ -v VAL[slot_index] ]]; then SELECTOR+=(--slot-index "${VAL[slot_index]}")
  elif [[ -v VAL[token_label] ]]; then SELECTOR+=(--token-label "${VAL[token_label]}")
  fi
}

# run_tool OUT ARGS...: pkcs11-tool in its own session, dying with us, against
# the deadline; its stderr goes to ERR_FD and its stdout to /dev/fd/OUT, or, when
# OUT is "base64", through base64 (which runs while the tool does) into SIG_FD.
# Sets STATUS.
run_tool() {
  local out=$1 pid watch encoder="" rc
  shift
  if [[ $out == base64 ]]; then
    exec {out}> >(exec base64 -w0 > "/dev/fd/$SIG_FD")
    encoder=$!
  else
    exec {out}> "/dev/fd/$out"
  fi
  # The process substitution becomes pkcs11-tool (exec, no fork): setpriv arms
  # the parent-death signal, setsid gives it a session of its own (no terminal,
  # its own process group), and its copy of the pipe (fd 9) closes when it exits.
  exec {watch}< <(
    [[ -v LOCK_FD ]] && exec {LOCK_FD}>&-
    exec setpriv --pdeathsig KILL -- setsid -- "$TOOL" "$@" \
      9>&1 </dev/null >&"$out" 2>"/dev/fd/$ERR_FD"
  )
  pid=$!
  exec {out}>&-
  while remaining; do
    rc=0
    IFS= read -r -t "$REPLY" -u "$watch" _ || rc=$?
    ((rc == 0)) && continue
    if ((rc == 1)); then  # end of file: pkcs11-tool has exited
      STATUS=0
      { wait "$pid"; } 2>/dev/null || STATUS=$?
      exec {watch}<&-
      [[ -z $encoder ]] || wait "$encoder"
      return 0
    fi
    break
  done
  kill -KILL -- "-$pid" "$pid" 2>/dev/null || true
  { wait "$pid"; } 2>/dev/null || true
  fail TIMEOUT "pkcs11-tool did not finish before the deadline; check the token, pcscd and --timeout-ms"
}

classify() {
  local err=""
  IFS= read -r -d '' -N 65536 err < "/dev/fd/$ERR_FD" || true
  case $err in
    *"Failed to load pkcs11 module"*) fail MODULE_LOAD_FAILED "the PKCS#11 module cannot be loaded; check --module and the module's own configuration" ;;
    *"sc_dlopen failed"*) fail MODULE_LOAD_FAILED "the PKCS#11 module cannot be loaded; check --module" ;;
    *"C_Initialize failed"*) fail MODULE_LOAD_FAILED "the PKCS#11 module failed to initialise; check its configuration (e.g. SOFTHSM2_CONF)" ;;
    *CKR_PIN_INCORRECT*) remember_rejected_pin; fail PIN_INCORRECT "the token rejected the PIN; fix the PIN (real tokens lock after a few wrong tries)" ;;
    *CKR_PIN_LEN_RANGE*) fail PIN_INCORRECT "the token rejected the PIN's length; fix the PIN" ;;
    *CKR_PIN_LOCKED*) fail PIN_LOCKED "the user PIN is locked; unlock it with the SO PIN" ;;
    *CKR_PIN_EXPIRED*) fail PIN_LOCKED "the user PIN has expired; set a new one" ;;
    *"No slot with token named"*) fail TOKEN_NOT_FOUND "no token with that label; check --token-label (pkcs11-tool --list-slots)" ;;
    *CKR_SLOT_ID_INVALID*) fail TOKEN_NOT_FOUND "no such slot; check --slot (pkcs11-tool --list-slots)" ;;
    *CKR_TOKEN_NOT_PRESENT*) fail TOKEN_NOT_FOUND "no token in that slot; insert it or fix the slot" ;;
    *"is not available"*) fail TOKEN_NOT_FOUND "no token at that slot index; check --slot-index (pkcs11-tool --list-slots)" ;;
    *"No slot"*) fail TOKEN_NOT_FOUND "no usable token; check the token selector (pkcs11-tool --list-slots)" ;;
    *"key not found"*) fail KEY_NOT_FOUND "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)" ;;
    *CKR_MECHANISM_INVALID*) fail MECHANISM_UNSUPPORTED "the token cannot do this mechanism; check --mechanism and the key type" ;;
    *CKR_KEY_TYPE_INCONSISTENT*) fail MECHANISM_UNSUPPORTED "the key's type does not fit the mechanism; use an Ed25519 key with EDDSA" ;;
    *CKR_KEY_FUNCTION_NOT_PERMITTED*) fail MECHANISM_UNSUPPORTED "the key may not sign (CKA_SIGN is false); use a signing key" ;;
    *CKR_OPERATION_NOT_INITIALIZED*) fail MECHANISM_UNSUPPORTED "the token refused to sign with this mechanism and key; check --mechanism and the key type" ;;
    *"Unknown PKCS11 mechanism"*) fail MECHANISM_UNSUPPORTED "pkcs11-tool does not know this mechanism; use EDDSA" ;;
    *"mechanism not supported"*) fail MECHANISM_UNSUPPORTED "the token does not support this mechanism" ;;
  esac
  ((STATUS == 127)) && fail TOOL_NOT_FOUND "pkcs11-tool could not be started; check --pkcs11-tool"
  ((STATUS > 128)) && fail SIGNING_FAILED "pkcs11-tool died of signal $((STATUS - 128))"
  local line last=""
  while IFS= read -r line; do
    trim line
    [[ -n $line && $line != Aborting. ]] && last=$line
  done <<< "$err"
  fail SIGNING_FAILED "pkcs11-tool exited $STATUS${last:+: ${last:0:200}}"
}

# The CKA_ID to sign with: the configured id, or the id of the one key with the label.
resolve_key_id() {
  if [[ -v VAL[key_id] ]]; then KEY_ID=${VAL[key_id]}; return 0; fi
  run_tool "$SIG_FD" "${SELECTOR[@]}" --login --pin "env:$PIN_ENV" --list-objects --type privkey
  ((STATUS == 0)) || classify
  local line field value in_key="" label="" id="" have_label="" ids=()
  local wanted=${VAL[key_label]}
  finish_key() {
    [[ -n $in_key && -n $have_label && $label == "$wanted" ]] && ids+=("${id:-?}")
    in_key="" label="" id="" have_label=""
  }
  while IFS= read -r line; do
    if [[ $line == "Private Key Object"* ]]; then
      finish_key
      in_key=1
    elif [[ -n $in_key && $line == "  "* ]]; then
      field=${line#"${line%%[![:space:]]*}"}
      value=${field#*:}
      field=${field%%:*}
      trim value
      [[ $field == label ]] && label=$value && have_label=1
      [[ $field == ID ]] && id=$value
    else
      finish_key
    fi
  done < "/dev/fd/$SIG_FD"
  finish_key
  ((${#ids[@]} > 0)) || fail KEY_NOT_FOUND "no private key labelled '$wanted' on the token; check --key-label (lap-pkcs11 doctor)"
  local unique
  unique=$(printf '%s\n' "${ids[@]}" | sort -u)
  [[ $unique != *$'\n'* && $unique != "?" ]] || fail KEY_NOT_FOUND "the label '$wanted' is not unique on the token; select the key with --key-id"
  KEY_ID=$unique
}

# decode_signature B64: the 64 bytes of an 88-character base64 signature, as
# decimal numbers in BYTES.
decode_signature() {
  local text=${1%==} i j n c prefix
  BYTES=()
  for ((i = 0; i < 84; i += 4)); do
    n=0
    for ((j = 0; j < 4; j++)); do
      c=${text:i+j:1}
      prefix=${B64%%"$c"*}
      n=$((n << 6 | ${#prefix}))
    done
    BYTES+=($((n >> 16 & 255)) $((n >> 8 & 255)) $((n & 255)))
  done
  prefix=${B64%%"${text:84:1}"*}
  n=$((${#prefix} << 6))
  prefix=${B64%%"${text:85:1}"*}
  n=$((n | ${#prefix}))
  BYTES+=($((n >> 4 & 255)))
}

# bytes_base64 COUNT: base64 of BYTES[0..COUNT) into REPLY.
bytes_base64() {
  local i=0 end=$1 out="" n
  while ((i + 3 <= end)); do
    n=$((BYTES[i] << 16 | BYTES[i + 1] << 8 | BYTES[i + 2]))
    out+=${B64:n >> 18 & 63:1}${B64:n >> 12 & 63:1}${B64:n >> 6 & 63:1}${B64:n & 63:1}
    i=$((i + 3))
  done
  if ((end - i == 1)); then
    n=$((BYTES[i] << 16))
    out+=${B64:n >> 18 & 63:1}${B64:n >> 12 & 63:1}==
  elif ((end - i == 2)); then
    n=$((BYTES[i] << 16 | BYTES[i + 1] << 8))
    out+=${B64:n >> 18 & 63:1}${B64:n >> 12 & 63:1}${B64:n >> 6 & 63:1}=
  fi
  REPLY=$out
}

# check_signature B64: the tool printed exactly 64 bytes (88 base64 characters).
check_signature() {
  local text=$1 size
  [[ ${#text} == 88 && $text == *== ]] && return 0
  size=$((${#text} * 3 / 4))
  [[ $text == *= ]] && size=$((size - 1))
  [[ $text == *== ]] && size=$((size - 1))
  fail SIGNING_FAILED "pkcs11-tool printed $size bytes, not a 64-byte Ed25519 signature; check --mechanism and the key"
}

# check_pinned_key B64: openssl verifies the signature with the pinned key.
check_pinned_key() {
  [[ -v VAL[expect_public_key] ]] || return 0
  local key=${VAL[expect_public_key]} i pem
  BYTES=()
  # SubjectPublicKeyInfo of an Ed25519 key: a fixed 12-byte header, then the key.
  for i in 48 42 48 5 6 3 43 101 112 3 33 0; do BYTES+=("$i"); done
  for ((i = 0; i < 64; i += 2)); do BYTES+=($((16#${key:i:2}))); done
  bytes_base64 44
  pem=$'-----BEGIN PUBLIC KEY-----\n'$REPLY$'\n-----END PUBLIC KEY-----'
  if ! openssl pkeyutl -verify -pubin -inkey /dev/stdin -rawin -in "/dev/fd/$MSG_FD" \
      -sigfile <(base64 -d <<< "$1") <<< "$pem" >/dev/null 2>&1; then
    fail KEY_MISMATCH "the signature does not verify under the pinned public key ${key:0:16}...; the token key is not the one the gateway trusts (check slot, token and key id, or the pinned key)"
  fi
}

# write_signature B64: the signature in the configured encoding on stdout.
write_signature() {
  local i out=""
  case ${VAL[output]} in
    base64) printf '%s\n' "$1" ;;
    hex) decode_signature "$1"
         for ((i = 0; i < 64; i++)); do printf -v out '%s%02x' "$out" "${BYTES[i]}"; done
         printf '%s\n' "$out" ;;
    raw) decode_signature "$1"
         for ((i = 0; i < 64; i++)); do printf -v out '%s\\x%02x' "$out" "${BYTES[i]}"; done
         # shellcheck disable=SC2059 # the format is our own \xHH escapes
         printf "$out" ;;
  esac
}

main() {
  umask 077
  parse_args "$@"
  resolve
  check_gateway_input
  set_deadline
  if [[ -v VAL[expect_public_key] ]] && ! type -P openssl >/dev/null; then
    fail CONFIG_INVALID "a public key is pinned but openssl is not installed; apt-get install openssl"
  fi
  if ! type -P setpriv setsid flock >/dev/null; then
    fail TOOL_NOT_FOUND "setpriv, setsid or flock (util-linux) is missing; install util-linux"
  fi
  open_scratch_files
  read_message
  prepare_environment
  [[ -f ${VAL[module]} ]] || fail MODULE_LOAD_FAILED "PKCS#11 module ${VAL[module]} does not exist; fix --module"
  find_tool
  start_lock
  check_pin_guard
  [[ -z ${DECODER-} ]] || wait "$DECODER" || fail INPUT_INVALID "stdin could not be decoded as base64"
  await_lock
  selector_args
  resolve_key_id
  run_tool base64 "${SELECTOR[@]}" --login --pin "env:$PIN_ENV" --sign \
    --mechanism "${VAL[mechanism]}" --id "$KEY_ID" --input-file "/dev/fd/$MSG_FD"
  ((STATUS == 0)) || classify
  if [[ -n ${MARKER-} && -e $MARKER ]]; then rm -f -- "$MARKER"; fi
  local signature=""
  IFS= read -r -N 65536 signature < "/dev/fd/$SIG_FD" || true
  check_signature "$signature"
  check_pinned_key "$signature"
  write_signature "$signature"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
