#!/bin/bash -p
{
  { EARLY_OPTIONS=$-; set +o xtrace +o verbose; } 2>/dev/null
  # Signals only noted until main's traps, then inherited options and the
  # variables that carry them are dropped by a clean re-exec. Call the script by
  # its path: its shebang's bash -p ignores SHELLOPTS, BASHOPTS and BASH_ENV from
  # the start. `bash script` cannot: with SHELLOPTS=noexec it runs nothing, with
  # onecmd only the shebang line (exit 0, empty stdout either way), verbose
  # echoes lines and extdebug looks for bashdb before any line of ours runs.
  unset -v EARLY_SIGNAL
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-HUP}' HUP
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-INT}' INT
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-QUIT}' QUIT
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-USR1}' USR1
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-USR2}' USR2
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-ALRM}' ALRM
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-TERM}' TERM
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-VTALRM}' VTALRM
  trap 'EARLY_SIGNAL=${EARLY_SIGNAL:-PROF}' PROF
  # Options beyond a script's own (h, B; p from the shebang), shopt options
  # beyond the defaults, or the variables that carry them: start again clean.
  if [[ $EARLY_OPTIONS != *p* && ${BASH_SOURCE[0]} == "$0" ]] \
      && [[ ${SHELLOPTS@a}${BASHOPTS@a}${PS4@a}${BASH_XTRACEFD+x}${BASH_COMPAT+x}${BASH_ENV+x}${ENV+x} == *x* \
            || -n ${EARLY_OPTIONS//[hB]/} \
            || :$BASHOPTS: =~ :(extdebug|failglob|nocaseglob|nocasematch|nullglob|dotglob|globstar|lastpipe|xpg_echo|inherit_errexit|execfail|expand_aliases|extglob|shift_verbose|gnu_errfmt|localvar_inherit|localvar_unset|assoc_expand_once|varredir_close|noexpand_translation|compat[0-9]+): ]]; then
    exec env -u SHELLOPTS -u BASHOPTS -u PS4 -u BASH_XTRACEFD -u BASH_COMPAT -u BASH_ENV -u ENV \
      "$BASH" -p -- "$0" "$@"
    printf 'lap-pkcs11: SIGNING_FAILED: bash could not be started again without the inherited shell options\n' >&2
    exit 70
  fi
  unset -v EARLY_OPTIONS
}
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
#   --uri URI                 PKCS#11 URI (RFC 7512) of the key, e.g.
#                             pkcs11:token=lap-gateway;id=%01;type=private; it fills
#                             the options it names (set otherwise to another
#                             value: an error) [LAP_PKCS11_URI]
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
#   --env-file PATH           dotenv data file; none unless named [LAP_PKCS11_ENV_FILE]
#   --pkcs11-tool PATH        default pkcs11-tool on PATH [LAP_PKCS11_TOOL]
#   --expect-public-key HEX   pinned key, checked with openssl
#                             [LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX]
#   --lock-dir PATH           private lock directory, or none [LAP_PKCS11_LOCK_DIR]
#                             (default $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR or /tmp,
#                             in a lap-pkcs11-<uid> directory of its own)
#   -h, --help                show this help
#   --version                 print the version
# SIGNER_TIMEOUT_SECONDS or LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS (the gateway's
# deadline) caps the deadline, less 250 ms.
# The env file and the PIN file must be regular files of this user or root that
# no one else may write (the PIN file: that others cannot read either).
# The script's own globals: none is taken from the environment (an inherited
# one is kept, unexported, for pkcs11-tool's environment only, in INHERITED).
unset -v INHERITED CHILD_ENV
declare -A INHERITED=() CHILD_ENV=()
for _name in ANCESTORS B64 BACKSTOP_MS BYTES CALLER_END_US CALLER_MARGIN_MS CONF DEADLINE_US \
    DECODER DIR ENV_FILE_LIMIT ERR_FD ERR_TEXT EXIT EXIT_CODE FILE_ENV FLAGS FLAG_ATTR F_ID \
    F_MODE F_SIZE F_TYPE F_UID GATEWAY_MARKERS GRACE_MS GUARD_REMEMBERED HELPER INFO IN_STDIN \
    KEY_ID KILL_AT_US KILL_RESERVE_MS LINE LINES LINKS LOCKER LOCK_FD MADE MARKER MAX_MESSAGE \
    MIN_DEADLINE_MS MIN_TOOL_MS MSG_FD OPTION_TABLE OUTPUT_LIMIT PARTS PIN_ENV PIN_FD \
    PIN_FILE_LIMIT PIN_VALUE POLL_US READ_LIMIT SCRUBBED_ENV SECRET SECRET_FILE SELECTOR \
    SIGNALS SIG_FD SIG_SCRATCH SRC START_US STAT_FIELDS STATE_FILE_LIMIT STATUS STDERR \
    STDOUT_CLOSED TEXT TIMEOUT_TOOL TOKEN_CONSTRAINTS TOOL TOOL_PID TOOL_START URI_ITEMS \
    URI_MAX_LENGTH URI_NAME URI_ORDER \
    URI_PATH URI_PATH_CHARS URI_QUERY URI_QUERY_CHARS URI_REFUSED URI_UNRESERVED URI_VAL VAL \
    VERSION OPEN_END_US WRITE_WAIT; do
  [[ ${!_name@a} == *x* ]] && INHERITED[$_name]=${!_name}
  unset -v "$_name"
done
unset -v _name
# The line's descriptor from the start: a signal's line goes to our stderr even
# while a command of ours has its stderr redirected.
if [[ -L /proc/self/fd/2 ]]; then exec {STDERR}>&2; fi
set -Eeuo pipefail +o posix
LC_ALL=C
ulimit -c 0

readonly VERSION=0.1.0  # lap_pkcs11.__version__ (a test keeps them equal)
readonly MAX_MESSAGE=1024
readonly READ_LIMIT=$((4 * ((MAX_MESSAGE + 2) / 3) + 4096))
readonly CALLER_MARGIN_MS=250 MIN_DEADLINE_MS=50
# pkcs11-tool is never started with less than MIN_TOOL_MS left (its normal run
# here: 13 ms p50, 37 ms max under load): a SoftHSM2 login rewrites token.object,
# and a kill in the middle of that write destroys the token. A run that the
# deadline overtakes gets GRACE_MS more (the TIMEOUT line is written at once),
# but never past the caller's own deadline less KILL_RESERVE_MS.
# When we are gone, timeout(1) kills the tool's group BACKSTOP_MS after kill_at.
readonly WRITE_WAIT=0.2  # stdout: a full pipe nobody reads is an error after this
readonly MIN_TOOL_MS=50 GRACE_MS=200 KILL_RESERVE_MS=50 BACKSTOP_MS=20 POLL_US=20000
readonly ENV_FILE_LIMIT=1048576 PIN_FILE_LIMIT=4096 STATE_FILE_LIMIT=4096 OUTPUT_LIMIT=65536
readonly GUARD_REMEMBERED=8  # rejected PINs the guard keeps
# Signals whose default would end us (as lap_pkcs11/per_signature/process.py's): each is one line.
readonly SIGNALS=(HUP INT QUIT USR1 USR2 ALRM TERM VTALRM PROF)

# attr|flag|variables|default: the same table as lap_pkcs11/per_signature/options.py.
readonly OPTION_TABLE=(
  "uri|--uri|LAP_PKCS11_URI|"
  "module|--module|LAP_PKCS11_MODULE|"
  "slot|--slot|LAP_PKCS11_SLOT|"
  "slot_index|--slot-index|LAP_PKCS11_SLOT_INDEX|"
  "token_label|--token-label|LAP_PKCS11_TOKEN_LABEL|"
  "key_id|--key-id|LAP_PKCS11_KEY_ID|"
  "key_label|--key-label|LAP_PKCS11_KEY_LABEL|"
  "token_serial|||"
  "token_manufacturer|||"
  "token_model|||"
  "library_manufacturer|||"
  "library_description|||"
  "library_version|||"
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
  "caller_timeout_ms||SIGNER_TIMEOUT_SECONDS LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS|"
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

declare -A FLAG_ATTR=() FLAGS=() VAL=() SRC=() FILE_ENV=() INFO=() EXIT_CODE=(
  [CONFIG_INVALID]=64 [INPUT_INVALID]=65 [MESSAGE_TOO_LARGE]=65 [TOOL_NOT_FOUND]=69
  [MODULE_LOAD_FAILED]=69 [TOKEN_NOT_FOUND]=69 [KEY_NOT_FOUND]=69 [MECHANISM_UNSUPPORTED]=69
  [PIN_MISSING]=77 [PIN_INCORRECT]=77 [PIN_LOCKED]=77 [TIMEOUT]=75 [KEY_MISMATCH]=70
  [SIGNING_FAILED]=70)
START_US=${EPOCHREALTIME/./}
DEADLINE_US=0 KILL_AT_US=0 CALLER_END_US=0
LINE="" EXIT=0 TOOL_PID="" TOOL_START="" IN_STDIN="" MARKER="" STATUS=0 ERR_TEXT="" TEXT=""
BYTES=() PARTS=()

# say NAME MESSAGE: the one stderr line (whitespace folded, control characters
# made "?"), written at most once,
# to STDERR: our stderr as we got it, even from a trap while a command of ours has
# its stderr redirected.
# A closed, full or broken stderr changes nothing else: no SIGPIPE, no bash message.
# No read builtin here: a signal handler calls it, and a read nested in an
# interrupted read -t would cancel that read's timeout.
say() {
  local text=${2//[$'\t\n\r\v\f\x1c\x1d\x1e\x1f']/ } out=${STDERR:-2}
  text=${text//$'\xc2\x85'/ }
  text=${text//$'\xc2\xa0'/ }
  while [[ $text == *"  "* ]]; do text=${text//  / }; done
  text=${text# }
  # Whatever it quotes (a path, pkcs11-tool's stderr) cannot put a control
  # character or an escape sequence into the caller's log: each is a "?".
  text=${text//[[:cntrl:]]/?}
  text=${text//$'\xc2'[$'\x80'-$'\x9f']/?}
  trap '' PIPE
  LINE=$1 EXIT=${EXIT_CODE[$1]}
  printf 'lap-pkcs11: %s: %s\n' "$1" "${text% }" 1>&"$out" 2>/dev/null || true
}

# fail NAME MESSAGE: the line (unless one was written already) and its exit code.
fail() {
  [[ -n $LINE ]] || say "$@"
  exit "$EXIT"
}

# SIGINT, SIGTERM, SIGHUP (and the other SIGNALS) are the deadline arriving now: with pkcs11-tool
# running, the line is written at once and the tool gets the same bounded grace
# (run_tool kills its group then); otherwise we stop here.
on_signal() {
  [[ -n $LINE ]] || say SIGNING_FAILED "interrupted by SIG$1; nothing was signed"
  if [[ -n $TOOL_PID ]]; then
    local kill_at=$((${EPOCHREALTIME/./} + GRACE_MS * 1000))
    ((CALLER_END_US == 0 || kill_at <= CALLER_END_US - KILL_RESERVE_MS * 1000)) \
      || kill_at=$((CALLER_END_US - KILL_RESERVE_MS * 1000))
    ((kill_at >= KILL_AT_US)) || KILL_AT_US=$kill_at
    return 0
  fi
  exit "$EXIT"
}

# The stdin alarm (see read_message): SIGURG at the deadline ends a read that
# a trickling writer keeps waiting.
on_alarm() {
  [[ -z $IN_STDIN ]] || fail TIMEOUT "stdin did not end before the deadline; send the whole message and close stdin (or raise --timeout-ms)"
}

usage() {
  trap '' PIPE
  sed -n '/^# Usage:/,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" 2>/dev/null || true
}

# started_at: when this process began, from the kernel (field 22 of
# /proc/self/stat, in clock ticks since boot, against /proc/uptime): the
# caller's deadline runs from before we started, and under load bash's own start
# takes a while. As lap_pkcs11/per_signature/process.py's started_at; 10 ms resolution.
started_at() {
  local stat up ticks now=${EPOCHREALTIME/./} fields=()
  { IFS= read -r stat < /proc/self/stat && read -r up _ < /proc/uptime; } 2>/dev/null || return 0
  # shellcheck disable=SC2206 # numbers and one letter: no globbing
  fields=(${stat##*) })
  ticks=${fields[19]-}
  [[ $ticks =~ ^[0-9]+$ && $up =~ ^([0-9]+)\.([0-9]{2})$ ]] || return 0
  local age=$(((10#${BASH_REMATCH[1]} * 100 + 10#${BASH_REMATCH[2]} - ticks) * 10000))
  ((age > 0 && age < 60000000 && now - age < START_US)) && START_US=$((now - age))
  return 0
}

# close_stray_fds: descriptors the caller left open (above 2) are closed, so
# pkcs11-tool never sees them and our own descriptors stay small numbers; the
# one bash reads this script from stays.
close_stray_fds() {
  local path fd
  for path in /proc/self/fd/*; do
    fd=${path##*/}
    if ((fd > 2 && fd != ${STDERR:-2})) && [[ -L $path && ! $path -ef ${BASH_SOURCE[0]} ]]; then
      exec {fd}>&-
    fi
  done
}

# Closed standard descriptors: stdin and stderr become /dev/null (nothing of
# ours may land on them); a closed stdout is an error before anything is signed.
check_stdio() {
  [[ -L /proc/self/fd/0 ]] || exec 0</dev/null
  [[ -L /proc/self/fd/2 ]] || exec 2>/dev/null
  [[ -n ${STDERR-} ]] || exec {STDERR}>&2
  [[ -L /proc/self/fd/1 ]] && return 0
  exec 1>/dev/null
  STDOUT_CLOSED=1
}

trim() {  # trim VAR: strip surrounding spaces and TABs in place (as options.py)
  local -n _value=$1
  _value=${_value#"${_value%%[![:blank:]]*}"}
  _value=${_value%"${_value##*[![:blank:]]}"}
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
      --version) trap '' PIPE; printf 'lap-pkcs11 %s\n' "$VERSION" 2>/dev/null || true; exit 0 ;;
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

# stat_into NAMES...: stat(2) (symlinks followed) of each name into INFO[name] as
# "uid mode size dev-ino type"; a name that cannot be stat'ed gets no entry. One process.
stat_into() {
  local record
  while IFS= read -r -d '' record; do
    INFO[${record#*$'\n'}]=${record%%$'\n'*}
  done < <(exec stat -L --printf '%u %a %s %d-%i %F\n%n\0' -- "$@" 2>/dev/null)
}

# fields TEXT: a stat_into record, "uid mode size dev-ino type", into F_UID,
# F_MODE, F_SIZE, F_ID and F_TYPE (no here-string: this runs on every call).
fields() {
  local text=$1
  F_UID=${text%% *} text=${text#* }
  F_MODE=${text%% *} text=${text#* }
  F_SIZE=${text%% *} text=${text#* }
  F_ID=${text%% *} F_TYPE=${text#* }
}

# open_named PATH WHAT LIMIT SECRET: open a file the operator named (env file,
# PIN file) into REPLY. Never a FIFO or device: it is tested to be a regular file
# before it is opened and again through the descriptor; the owner and mode are
# checked by check_named on that descriptor.
open_named() {
  local path=$1 what=$2 fd
  [[ -e $path ]] || fail CONFIG_INVALID "$what $path cannot be read (no such file); fix the path or its permissions"
  [[ -f $path ]] || fail CONFIG_INVALID "$what $path is not a regular file; name a regular file"
  open_safely "$path" || {
    (($? == 1)) && fail CONFIG_INVALID "$what $path cannot be read (permission denied); fix the path or its permissions"
    fail CONFIG_INVALID "$what $path is not a regular file; name a regular file"
  }
  fd=$REPLY
  [[ -f /dev/fd/$fd ]] || fail CONFIG_INVALID "$what $path is not a regular file; name a regular file"
  REPLY=$fd
}

# open_safely PATH: open PATH for reading into REPLY without ever blocking: a
# FIFO swapped in after our checks would block an open (bash cannot open with
# O_NONBLOCK), so a child opens it and we reopen its descriptor through /proc
# only once it is a regular file; a child still blocked at OPEN_END_US (or
# 0.05 s from now, when that has passed) is killed. Returns 1 when the file
# cannot be opened, 2 when it is not a regular file (or the open blocked).
open_safely() {
  local path=$1 sync hold held pid="" fd="" left
  exec {hold}<<< ""
  read -r -u "$hold" _
  exec {held}> "/dev/fd/$hold"  # the child waits on it until we are done
  exec {sync}< <(
    exec {STDERR}>&- {held}>&- 2>/dev/null
    exec {fd}<"$path" || exit 0
    printf '%s %s\n' "$BASHPID" "$fd"
    exec >&-
    read -r -t 10 -u "$hold" _ || true
  )
  local child=$!
  left=$((OPEN_END_US - ${EPOCHREALTIME/./}))
  ((left >= 50000)) || left=50000
  seconds "$left"
  local rc=0
  IFS=' ' read -r -t "$REPLY" -u "$sync" pid fd || rc=$?
  exec {sync}<&- {hold}<&-
  if [[ -z $pid ]]; then
    exec {held}>&-
    ((rc > 128)) || return 1
    kill -KILL "$child" 2>/dev/null || true
    return 2
  fi
  if [[ ! -f /proc/$pid/fd/$fd ]] || ! { exec {fd}<"/proc/$pid/fd/$fd"; } 2>/dev/null; then
    exec {held}>&-
    return 2
  fi
  exec {held}>&-
  REPLY=$fd
}

# check_named PATH WHAT LIMIT SECRET FIELDS: FIELDS ("uid mode size ...") of
# the opened file: this user's or root's, writable by no one else (a SECRET one
# also unreadable by others), at most LIMIT bytes.
check_named() {
  local path=$1 what=$2 limit=$3 secret=$4 uid mode size loose=8#022
  fields "$5"
  uid=$F_UID mode=$F_MODE size=$F_SIZE
  [[ -n $5 ]] || fail CONFIG_INVALID "$what $path cannot be read; fix the path or its permissions"
  ((uid == EUID || uid == 0)) \
    || fail CONFIG_INVALID "$what $path belongs to uid $uid, not to this user or root; chown it to the signer's user or root"
  [[ -n $secret ]] && loose=8#027
  if ((8#$mode & loose)); then
    printf -v mode '%04o' $((8#$mode))
    fail CONFIG_INVALID "$what $path has mode $mode; chmod go-w${secret:+,o-rwx} it"
  fi
  ((size <= limit)) || fail CONFIG_INVALID "$what $path is larger than $limit bytes; shorten it"
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

# load_env_file PATH: the one env-file grammar (lap_pkcs11/per_signature/envfile.py reads the
# same; tests/envfile_cases.json holds the cases), read as data. Lines end in LF
# or CRLF; a line holding a byte that another reader could take for a line end
# or drop (NUL, a control character other than TAB, DEL, U+0085, U+2028,
# U+2029) is refused with its number, comments too. Blanks are space and TAB.
load_env_file() {
  local path=$1 fd line key raw rest number=0 value nul_line=0 before="" ended total=0
  open_named "$path" "env file"
  fd=$REPLY
  stat_into "/dev/fd/$fd"
  check_named "$path" "env file" "$ENV_FILE_LIMIT" "" "${INFO[/dev/fd/$fd]-}"
  # A NUL cannot live in a shell string: reading up to the first one finds its line.
  if IFS= read -r -d '' before < "/dev/fd/$fd"; then
    before=${before//[!$'\n']/}
    nul_line=$((${#before} + 1))
  fi
  before=""
  while :; do
    line="" ended=1
    IFS= read -r line || { [[ -n $line ]] || break; ended=""; }
    ((number += 1))
    total=$((total + ${#line} + 1))
    ((total <= ENV_FILE_LIMIT + 1)) \
      || fail CONFIG_INVALID "env file $path is larger than $ENV_FILE_LIMIT bytes; shorten it"
    [[ -n $ended && $line == *$'\r' ]] && line=${line%$'\r'}
    if ((number == nul_line)) || [[ ${line//$'\t'/} == *[[:cntrl:]]* || $line == *$'\xc2\x85'* \
        || $line == *$'\xe2\x80\xa8'* || $line == *$'\xe2\x80\xa9'* ]]; then
      fail CONFIG_INVALID "env file $path: line $number: holds a NUL, a control character other than TAB, DEL, a lone CR or a Unicode line break; remove it"
    fi
    trim line
    [[ -z $line || $line == \#* ]] && continue
    if [[ $line == "export "* || $line == "export"$'\t'* ]]; then
      line=${line:7}
      trim line
    fi
    [[ $line == *=* ]] || fail CONFIG_INVALID "env file $path: line $number is not KEY=VALUE"
    key=${line%%=*}
    raw=${line#*=}
    rest=$raw
    trim key
    trim rest
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] \
      || fail CONFIG_INVALID "env file $path: line $number is not KEY=VALUE"
    if [[ $rest == [\'\"]* ]]; then
      quoted_value "$rest" || fail CONFIG_INVALID "env file $path: line $number: $REPLY"
      value=$REPLY
    else
      # A comment starts at a "#" after a space or TAB: "A=#a" is the value "#a".
      value=${raw%%[[:blank:]]#*}
      trim value
      [[ $value == *"\${"* ]] && fail CONFIG_INVALID \
        "env file $path: line $number: \${...} expansion is not supported; write the value out"
    fi
    FILE_ENV[$key]=$value
  done < "/dev/fd/$fd"
  ((nul_line == 0 || nul_line <= number)) || fail CONFIG_INVALID \
    "env file $path: line $nul_line: holds a NUL, a control character other than TAB, DEL, a lone CR or a Unicode line break; remove it"
  exec {fd}<&-
}

# describe ATTR FLAG [SOURCE]: where an option's value came from (SOURCE, default
# SRC[ATTR]), for error messages.
describe() {
  local source=${3-${SRC[$1]-}}
  case $source in
    flag) REPLY=$2 ;;
    env:*) REPLY="${source#env:} (from the environment)" ;;
    file:*) REPLY="${source#file:} (from the env file)" ;;
    uri:*) describe uri --uri "${source#uri:}"; REPLY="the URI's ${URI_NAME[$1]}= ($REPLY)" ;;
    *) REPLY=$2 ;;
  esac
}

bad() { describe "$1" "$2"; fail CONFIG_INVALID "$REPLY $3"; }
# parse_value ATTR FLAG: validate and normalise VAL[ATTR] as options.py does.
parse_value() {
  local attr=$1 flag=$2 v=${VAL[$1]} whole fraction
  case $attr in
    uri|module|token_label|key_label|pin_file|pkcs11_tool|lock_dir|env_file|token_serial|\
    token_manufacturer|token_model|library_manufacturer|library_description)
      [[ $v == *$'\n'* ]] && bad "$attr" "$flag" "must be one line of text" ;;
    library_version)
      trim v
      [[ $v =~ ^([0-9]+)(\.([0-9]+))?$ ]] || bad "$attr" "$flag" "must be a version such as 2 or 2.6"
      v=$((10#${BASH_REMATCH[1]})).$((10#${BASH_REMATCH[3]:-0})) ;;
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
  local entry attr flag names default name found path mine theirs uri_mode=""
  declare -A flag_of=([slot]=--slot [slot_index]=--slot-index [token_label]=--token-label)
  if [[ -v FLAGS[env_file] ]]; then path=${FLAGS[env_file]}; SRC[env_file]=flag
  elif [[ -n ${LAP_PKCS11_ENV_FILE-} ]]; then path=$LAP_PKCS11_ENV_FILE; SRC[env_file]=env:LAP_PKCS11_ENV_FILE
  else path=""; SRC[env_file]="unset"
  fi
  # No implicit ./.env.pkcs11: the caller's working directory is no place for
  # the signer's configuration, and a file there may be anyone's.
  if [[ ${SRC[env_file]} != unset ]]; then
    # The deadline is not known before the env file is read: its open is bounded
    # by the one the flags or the environment give, else the default.
    local ms=1500 text
    for text in "${FLAGS[timeout_ms]-}" "${LAP_PKCS11_TIMEOUT_MS-}" "${SIGNER_TIMEOUT_MS-}"; do
      [[ -n $text ]] || continue
      [[ $text =~ ^[0-9]{1,6}$ ]] && ms=$((10#$text))
      break
    done
    OPEN_END_US=$((START_US + ms * 1000))
    load_env_file "$path"
  fi
  VAL[env_file]=$path
  # Each option's raw text by precedence: flag, environment, env file, default;
  # parsed at once, unless a URI (the table's first option) is given: then all
  # are parsed after the URI has filled its options, as lap_pkcs11/per_signature/config.py does.
  for entry in "${OPTION_TABLE[@]}"; do
    attr=${entry%%|*} entry=${entry#*|}
    flag=${entry%%|*} entry=${entry#*|}
    names=${entry%%|*} default=${entry#*|}
    [[ $attr == env_file ]] && continue
    [[ -n $flag$names ]] || { SRC[$attr]="unset"; continue; }  # filled only by a URI
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
    [[ $attr == uri && -n $found ]] && uri_mode=1
    if [[ -n $uri_mode ]]; then flag_of[$attr]=${flag:-${names%% *}}; fi
    if [[ -z $found ]]; then SRC[$attr]="unset"
    elif [[ -z $uri_mode ]]; then parse_value "$attr" "$flag"
    fi
  done
  if [[ -n $uri_mode ]]; then
    # The URI fills the options it names; one set otherwise to another value is an error.
    parse_uri "${VAL[uri]}"
    for attr in "${URI_ORDER[@]}"; do
      if [[ -v VAL[$attr] && ${SRC[$attr]} != default ]]; then
        local other=${VAL[$attr]} other_source=${SRC[$attr]}
        VAL[$attr]=${URI_VAL[$attr]} SRC[$attr]=uri:${SRC[uri]}
        parse_value "$attr" "${flag_of[$attr]-}"
        mine=${VAL[$attr]}
        describe "$attr" "${flag_of[$attr]-}"
        name=$REPLY
        VAL[$attr]=$other SRC[$attr]=$other_source
        parse_value "$attr" "${flag_of[$attr]-}"
        theirs=${VAL[$attr]}
        describe "$attr" "${flag_of[$attr]-}"
        [[ $mine == "$theirs" ]] || fail CONFIG_INVALID "$REPLY and $name differ; keep one"
      fi
      VAL[$attr]=${URI_VAL[$attr]} SRC[$attr]=uri:${SRC[uri]}
    done
    for entry in "${OPTION_TABLE[@]}"; do
      attr=${entry%%|*}
      [[ $attr == env_file || ${SRC[$attr]} == unset ]] || parse_value "$attr" "${flag_of[$attr]-}"
    done
  fi
  [[ -n ${VAL[module]-} ]] || fail CONFIG_INVALID "no PKCS#11 module: give --module PATH or set LAP_PKCS11_MODULE"
  local selectors=()
  for attr in slot slot_index token_label; do
    if [[ -v VAL[$attr] ]]; then describe "$attr" "${flag_of[$attr]-}"; selectors+=("$REPLY"); fi
  done
  if ((${#selectors[@]} > 1)); then
    local joined=${selectors[0]}
    for name in "${selectors[@]:1}"; do joined+=" and $name"; done
    fail CONFIG_INVALID "$joined both select a token; keep only one"
  fi
  if [[ -v VAL[slot_index] ]]; then
    for attr in "${TOKEN_CONSTRAINTS[@]}"; do
      [[ -v VAL[$attr] ]] || continue
      describe "$attr" "${flag_of[$attr]-}"
      name=$REPLY
      describe slot_index --slot-index
      fail CONFIG_INVALID "$REPLY cannot be combined with $name; select the token by label or slot id"
    done
  fi
  if [[ ! -v VAL[key_id] && ! -v VAL[key_label] ]]; then
    fail CONFIG_INVALID "neither --key-id nor --key-label given; give one (or both: the key must then carry both)"
  fi
}

# PKCS#11 URIs (RFC 7512), read as lap_pkcs11/per_signature/uri.py reads them: the pkcs11:
# scheme, path attributes separated by ";", an optional query after "?" with
# attributes separated by "&", values of the characters the grammar allows for
# their component or %HH escapes, no attribute twice, no whitespace, no
# fragment. The attributes lap-pkcs11 can honour fill URI_VAL[attr] (raw text
# for the option's own parse_value); every other one is refused, naming it.
declare -A URI_PATH=([token]=token_label [manufacturer]=token_manufacturer
  [serial]=token_serial [model]=token_model [library-manufacturer]=library_manufacturer
  [library-description]=library_description [library-version]=library_version
  [object]=key_label [type]="" [id]=key_id [slot-id]=slot [slot-description]=""
  [slot-manufacturer]="")
declare -A URI_QUERY=([module-path]=module [pin-source]="" [pin-value]="" [module-name]="")
declare -A URI_NAME=([token_label]=token [token_manufacturer]=manufacturer
  [token_serial]=serial [token_model]=model [library_manufacturer]=library-manufacturer
  [library_description]=library-description [library_version]=library-version
  [key_label]=object [key_id]=id [slot]=slot-id [module]=module-path [pin_env]=pin-source
  [pin_file]=pin-source)
declare -A URI_REFUSED=(
  [pin-value]="a PIN must not sit in a command line or an environment listing; use pin-source=file:PATH or pin-source=env:NAME"
  [module-name]="it needs p11-kit's module registry, which lap-pkcs11 does not read; give module-path="
  [slot-description]="pkcs11-tool cannot select by it; select the token with token=, serial= or slot-id="
  [slot-manufacturer]="pkcs11-tool cannot select by it; select the token with token=, serial= or slot-id=")
readonly URI_UNRESERVED=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~
readonly URI_PATH_CHARS="$URI_UNRESERVED:[]@!\$'()*+,=&" URI_QUERY_CHARS="$URI_UNRESERVED:[]@!\$'()*+,=/?|"
readonly URI_MAX_LENGTH=4096 TOKEN_CONSTRAINTS=(token_serial token_manufacturer token_model
  library_manufacturer library_description library_version)
declare -A URI_VAL=()
URI_ITEMS=()

uri_fail() { describe uri --uri; fail CONFIG_INVALID "$REPLY $1"; }

# uri_bytes RAW NAME ALLOWED: the value's bytes as lowercase hex pairs into REPLY.
uri_bytes() {
  local raw=$1 name=$2 allowed=$3 i c hex="" pair
  for ((i = 0; i < ${#raw}; i++)); do
    c=${raw:i:1}
    if [[ $c == % ]]; then
      pair=${raw:i+1:2}
      [[ $pair =~ ^[0-9A-Fa-f]{2}$ ]] || uri_fail "has a % in $name= that is not followed by two hex digits; write a literal % as %25"
      hex+=${pair,,}
      ((i += 2))
    elif [[ $allowed == *"$c"* ]]; then
      printf -v pair '%02x' "'$c"
      hex+=$pair
    elif [[ $c > ' ' && $c < $'\x7f' ]]; then
      uri_fail "has the character $c in $name=, which a PKCS#11 URI must percent-encode"
    else
      uri_fail "has a space, control or non-ASCII character in $name=, which a PKCS#11 URI must percent-encode"
    fi
  done
  REPLY=$hex
}

# uri_items TEXT SEPARATOR ALLOWED COMPONENT: name=value items into URI_ITEMS
# as "component name raw hex" (a space is allowed in none of them).
uri_items() {
  local rest=$1 sep=$2 allowed=$3 component=$4 item name more=1
  while [[ -n $more ]]; do
    if [[ $rest == *"$sep"* ]]; then item=${rest%%"$sep"*} rest=${rest#*"$sep"}; else item=$rest more=""; fi
    name=${item%%=*}
    if [[ $item != *=* || -z $name || ! $name =~ ^[A-Za-z0-9_-]+$ ]]; then
      uri_fail "has an attribute in its $component that is not name=value (attributes are separated by $sep)"
    fi
    uri_bytes "${item#*=}" "$name" "$allowed"
    URI_ITEMS+=("$component $name ${item#*=} $REPLY")
  done
}

# uri_text HEX NAME: a text value (strict UTF-8, then no control character, then
# not empty, as uri.py checks them) into REPLY.
uri_text() {
  local hex=$1 name=$2 i b need=0 low=128 high=191 escaped="" bytes=()
  for ((i = 0; i < ${#hex}; i += 2)); do bytes+=($((16#${hex:i:2}))); escaped+=\\x${hex:i:2}; done
  for b in "${bytes[@]}"; do
    if ((need > 0)); then
      ((b >= low && b <= high)) || uri_fail "has a $name= that is not UTF-8 once percent-decoded"
      low=128 high=191
      need=$((need - 1))
    elif ((b < 128)); then :
    elif ((b >= 194 && b <= 223)); then need=1
    elif ((b == 224)); then need=2 low=160
    elif ((b >= 225 && b <= 236 || b == 238 || b == 239)); then need=2
    elif ((b == 237)); then need=2 high=159
    elif ((b == 240)); then need=3 low=144
    elif ((b >= 241 && b <= 243)); then need=3
    elif ((b == 244)); then need=3 high=143
    else uri_fail "has a $name= that is not UTF-8 once percent-decoded"
    fi
  done
  ((need == 0)) || uri_fail "has a $name= that is not UTF-8 once percent-decoded"
  # C0 controls, DEL, and C1 controls (U+0080-U+009F: C2 80 to C2 9F).
  for ((i = 0; i < ${#bytes[@]}; i++)); do
    b=${bytes[i]}
    if ((b < 32 || b == 127)) || ((b == 194 && bytes[i + 1] <= 159)); then
      uri_fail "has a control character in $name="
    fi
  done
  [[ -n $hex ]] || uri_fail "gives $name= no value; remove it or give one"
  printf -v REPLY '%b' "$escaped"
}

# parse_uri TEXT: the options the URI fills, into URI_VAL (URI_ORDER: in the URI's order).
parse_uri() {
  local text=$1 path query item component name raw hex attr
  declare -A given=()
  ((${#text} <= URI_MAX_LENGTH)) || uri_fail "is longer than $URI_MAX_LENGTH characters"
  [[ ${text:0:7} == [pP][kK][cC][sS]11: ]] || uri_fail "is not a PKCS#11 URI: it must start with pkcs11:"
  [[ $text != *"#"* ]] || uri_fail "has a # (a fragment), which a PKCS#11 URI does not have; write a # in a value as %23"
  path=${text:7} query=""
  if [[ $path == *"?"* ]]; then query=${path#*"?"} path=${path%%"?"*}; fi
  URI_ITEMS=() URI_ORDER=()
  [[ -z $path ]] || uri_items "$path" ";" "$URI_PATH_CHARS" path
  [[ -z $query ]] || uri_items "$query" "&" "$URI_QUERY_CHARS" query
  for item in "${URI_ITEMS[@]}"; do
    name=${item#* } name=${name%% *}
    [[ -z ${given[$name]-} ]] || uri_fail "gives $name= twice; keep one"
    given[$name]=1
  done
  for item in "${URI_ITEMS[@]}"; do
    component=${item%% *} item=${item#* }
    name=${item%% *} item=${item#* }
    raw=${item%% *} hex=${item#* }
    if [[ $component == path && -v URI_PATH[$name] ]]; then attr=${URI_PATH[$name]}
    elif [[ $component == query && -v URI_QUERY[$name] ]]; then attr=${URI_QUERY[$name]}
    elif [[ $component == path && -v URI_QUERY[$name] ]]; then
      uri_fail "has $name= in its path; it belongs in the query (after ?)"
    elif [[ $component == query && -v URI_PATH[$name] ]]; then
      uri_fail "has $name= in its query; it belongs in the path (before ?)"
    else
      uri_fail "has the attribute $name=, which lap-pkcs11 does not know; it refuses what it cannot honour, remove it"
    fi
    [[ -z ${URI_REFUSED[$name]-} ]] || uri_fail "has $name=, which lap-pkcs11 refuses: ${URI_REFUSED[$name]}"
    case $name in
      type)
        [[ $raw =~ ^(public|private|cert|secret-key|data)$ ]] || uri_fail "has a type= that RFC 7512 does not define"
        [[ $raw == private ]] || uri_fail "has type=$raw; lap-pkcs11 signs with a private key: give type=private or leave type= out"
        continue ;;
      id)
        [[ -n $hex ]] || uri_fail "gives id= no value; remove it or give one"
        REPLY=$hex ;;
      slot-id)
        [[ $raw =~ ^[0-9]+$ ]] || uri_fail "has a slot-id= that is not a decimal number"
        REPLY=$raw ;;
      library-version)
        [[ $raw =~ ^[0-9]+(\.[0-9]+)?$ ]] || uri_fail "has a library-version= that is not MAJOR or MAJOR.MINOR"
        REPLY=$raw ;;
      pin-source)
        uri_text "$hex" "$name"
        if [[ $REPLY == env:* ]]; then attr=pin_env REPLY=${REPLY#env:}
        elif [[ $REPLY == file:* ]]; then
          attr=pin_file raw=${REPLY#file:}
          if [[ $raw == //* ]]; then
            raw=${raw#//}
            [[ -z $raw || $raw == /* ]] || uri_fail "has a pin-source= on another host; give file:/PATH"
          fi
          [[ $raw == /* ]] || uri_fail "has a pin-source=file: that is not an absolute path; give file:/PATH"
          REPLY=$raw
        else
          uri_fail "has a pin-source= that lap-pkcs11 cannot read; give file:/PATH or env:NAME"
        fi ;;
      *) uri_text "$hex" "$name" ;;
    esac
    URI_VAL[$attr]=$REPLY
    URI_ORDER+=("$attr")
  done
}

check_gateway_input() {
  [[ ${SRC[input]} == default ]] || return 0
  local name started=""
  local mode=${SIGNER_MODE-}
  # The gateway compares SIGNER_MODE after Python's strip() (any whitespace) and
  # lower(); these values select its external signer.
  mode=${mode#"${mode%%[![:space:]]*}"}
  mode=${mode%"${mode##*[![:space:]]}"}
  case ${mode,,} in external|cmd|command) started=1 ;; esac
  for name in "${GATEWAY_MARKERS[@]}"; do [[ -n ${!name-} ]] && started=1; done
  [[ -z $started ]] || fail CONFIG_INVALID "started by the LAP gateway, which sends base64(message), but --input is not set; add --input base64 to SIGNER_CMD (or set --input raw explicitly)"
}

set_deadline() {
  local deadline=${VAL[timeout_ms]} caller
  if [[ -v VAL[caller_timeout_ms] ]]; then
    caller=$((VAL[caller_timeout_ms] - CALLER_MARGIN_MS))
    ((caller >= MIN_DEADLINE_MS)) || fail CONFIG_INVALID "${SRC[caller_timeout_ms]#*:} leaves less than $MIN_DEADLINE_MS ms after the $CALLER_MARGIN_MS ms start-up margin; give the gateway's signer a longer timeout"
    ((caller < deadline)) && deadline=$caller
    CALLER_END_US=$((START_US + VAL[caller_timeout_ms] * 1000))
  fi
  DEADLINE_US=$((START_US + deadline * 1000))
  KILL_AT_US=$((DEADLINE_US + GRACE_MS * 1000))
  ((CALLER_END_US == 0 || KILL_AT_US <= CALLER_END_US - KILL_RESERVE_MS * 1000)) \
    || KILL_AT_US=$((CALLER_END_US - KILL_RESERVE_MS * 1000))
}

# seconds MICROSECONDS: as S.mmmmmm in REPLY, for read -t, flock -w and sleep.
seconds() { printf -v REPLY '%d.%06d' $(($1 / 1000000)) $(($1 % 1000000)); }

# tool_time_left: whether pkcs11-tool may start: at least MIN_TOOL_MS left.
tool_time_left() { ((DEADLINE_US - ${EPOCHREALTIME/./} >= MIN_TOOL_MS * 1000)); }

# Anonymous scratch: a here-string of bash 5.1+ is a pipe (an older bash or a
# compatibility level of 5.0 makes an unlinked file), so what they will hold
# (message, signature, errors) never has a name on disk. /dev/fd/N reopens them
# for writing; the newline a here-string holds is read off first. A file made
# read-only by bash is made writable for its owner (bash 5.2 at level 5.0).
open_scratch_files() {
  exec {MSG_FD}<<< "" {SIG_FD}<<< "" {ERR_FD}<<< ""
  if [[ -p /dev/fd/$MSG_FD && -p /dev/fd/$SIG_FD && -p /dev/fd/$ERR_FD ]]; then
    read -r -u "$MSG_FD" _ && read -r -u "$SIG_FD" _ && read -r -u "$ERR_FD" _
  elif [[ ! -w /dev/fd/$MSG_FD || ! -w /dev/fd/$SIG_FD || ! -w /dev/fd/$ERR_FD ]]; then
    chmod u+w "/dev/fd/$MSG_FD" "/dev/fd/$SIG_FD" "/dev/fd/$ERR_FD"
  fi
}

# stdin_error: a read that ended in an error (its message went to ERR_FD) is not EOF.
stdin_error() {
  local message=""
  IFS= read -r -d '' -N 4096 message < "/dev/fd/$ERR_FD" || true
  [[ -z $message ]] || fail INPUT_INVALID "stdin cannot be read"
}

start_stdin_alarm() {
  IN_STDIN=1
}

# our_parent: whether this subshell's parent is still the signer.
our_parent() {
  local stat
  IFS= read -r stat < "/proc/$BASHPID/stat" || return 1
  stat=${stat##*) }
  stat=${stat#* }
  [[ ${stat%% *} == "$$" ]]
}

stop_stdin_alarm() {
  IN_STDIN=""
}

# stop_helper: the alarm is not needed any more (the helper's stat is read).
stop_helper() {
  [[ -n ${HELPER-} ]] || return 0
  # KILL and reap: the helper naps in reads of SIG_FD, and bash may hold a TERM
  # back inside such a read, long enough to take a byte of the signature that
  # base64 writes there later (seen as "pkcs11-tool printed 63 bytes").
  kill -KILL "$HELPER" 2>/dev/null || true
  { wait "$HELPER"; } 2>/dev/null || true
  HELPER=""
  trap - URG  # SIGURG's default: ignored
}

# The message on stdin into the scratch pipe MSG_FD, under the deadline.
read_message() {
  ((DEADLINE_US > ${EPOCHREALTIME/./})) || fail TIMEOUT "the deadline passed before stdin was read; raise --timeout-ms"
  start_stdin_alarm
  if [[ ${VAL[input]} == raw ]]; then read_raw; else read_base64; fi
  stop_stdin_alarm
}

# Raw bytes: read in pieces up to each NUL (a NUL cannot live in a shell
# string); PARTS keeps them for write_message.
read_raw() {
  local chunk want total=0 rc
  PARTS=("")
  while ((total <= MAX_MESSAGE)); do
    want=$((MAX_MESSAGE + 1 - total))
    chunk="" rc=0
    IFS= read -r -d '' -n "$want" chunk 2> "/dev/fd/$ERR_FD" || rc=$?
    PARTS[-1]+=$chunk
    total=$((total + ${#chunk}))
    if ((rc != 0)); then
      stdin_error
      break
    fi
    if ((${#chunk} < want)); then
      PARTS+=("")
      total=$((total + 1))
    fi
  done
  ((total <= MAX_MESSAGE)) || fail MESSAGE_TOO_LARGE "the message is over $MAX_MESSAGE bytes; pkcs11-tool cannot sign longer EdDSA input"
  ((total > 0)) || fail INPUT_INVALID "the message is empty; the gateway never signs an empty message"
  write_message
}

# write_message: the message into MSG_FD (again, for openssl, after pkcs11-tool read it).
write_message() {
  local i out
  if [[ ${VAL[input]} == base64 ]]; then
    base64 -d <<< "$TEXT" > "/dev/fd/$MSG_FD"
    return 0
  fi
  exec {out}> "/dev/fd/$MSG_FD"
  for ((i = 0; i < ${#PARTS[@]}; i++)); do
    ((i == 0)) || printf '\0' >&"$out"
    printf '%s' "${PARTS[i]}" >&"$out"
  done
  exec {out}>&-
}

read_base64() {
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
  TEXT=$text
  # Decoding runs beside the lock wait; main waits for it before signing.
  base64 -d <<< "$text" > "/dev/fd/$MSG_FD" &
  DECODER=$!
}

# The child environment: env file variables under the real environment, PIN set.
# A PIN file is opened here (or was, in begin_inspect), checked and read in inspect_files.
prepare_environment() {
  local name
  # Nothing here becomes a variable of ours: the names go to CHILD_ENV, which
  # only the tool chain's subshell exports.
  for name in "${!INHERITED[@]}"; do CHILD_ENV[$name]=${INHERITED[$name]}; done
  for name in "${!FILE_ENV[@]}"; do
    in_environment "$name" || CHILD_ENV[$name]=${FILE_ENV[$name]}
  done
  for name in "${SCRUBBED_ENV[@]}"; do unset "$name" 'CHILD_ENV[$name]'; done
  PIN_ENV=${VAL[pin_env]}
  if [[ -v VAL[pin_file] ]]; then
    [[ ${SRC[pin_env]} == default ]] || fail CONFIG_INVALID "both --pin-file and --pin-env are set; keep only one"
    env_value "$PIN_ENV" && [[ -n $REPLY ]] && fail CONFIG_INVALID "the PIN is given twice: in $PIN_ENV and in --pin-file; remove one"
    if [[ -z ${PIN_FD-} ]]; then
      open_named "${VAL[pin_file]}" "PIN file"
      PIN_FD=$REPLY
    fi
    return 0
  fi
  env_value "$PIN_ENV" || fail PIN_MISSING "no PIN: set $PIN_ENV or give --pin-file"
  [[ -n $REPLY ]] || fail PIN_MISSING "no PIN: $PIN_ENV is empty"
  PIN_VALUE=$REPLY
}

# in_environment NAME: whether the environment we were given holds NAME.
in_environment() {
  [[ -v INHERITED[$1] ]] && return 0
  [[ -v $1 && ${!1@a} == *x* ]]
}

# env_value NAME: NAME's value in the environment, else in the env file, into REPLY.
env_value() {
  if [[ -v INHERITED[$1] ]]; then REPLY=${INHERITED[$1]}
  elif [[ -v $1 && ${!1@a} == *x* ]]; then REPLY=${!1}
  elif [[ -v FILE_ENV[$1] ]]; then REPLY=${FILE_ENV[$1]}
  else return 1
  fi
}

read_pin_file() {
  local pin_file=${VAL[pin_file]} pin=""
  check_named "$pin_file" "PIN file" "$PIN_FILE_LIMIT" secret "${INFO[/dev/fd/$PIN_FD]-}"
  IFS= read -r pin <&"$PIN_FD" || true
  exec {PIN_FD}<&-
  pin=${pin%$'\r'}
  [[ -n $pin ]] || fail PIN_MISSING "PIN file $pin_file is empty; write the user PIN in it"
  PIN_VALUE=$pin
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

# lock_dir: the private directory of the lock and PIN-guard files into DIR
# (empty for --lock-dir none): --lock-dir itself, or lap-pkcs11-<euid> in
# $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR or /tmp (MADE: made 0700 by
# inspect_files, once the directories above it are found safe); ANCESTORS: the
# directories above it, nearest first, as os.path.abspath spells them.
lock_dir() {
  local path part rest parts=()
  DIR=${VAL[lock_dir]-} MADE="" ANCESTORS=()
  [[ $DIR == none ]] && DIR="" && return 0
  if [[ -z $DIR ]]; then
    DIR=${RUNTIME_DIRECTORY-}
    DIR=${DIR%%:*}
    [[ -n $DIR ]] || DIR=${XDG_RUNTIME_DIR:-/tmp}
    MADE=1
  fi
  # "dir/" would follow a symlink named dir: the checks are of the name itself.
  while [[ $DIR == ?*/ ]]; do DIR=${DIR%/}; done
  if [[ -n $MADE ]]; then
    [[ $DIR == / ]] && DIR=""
    DIR=$DIR/lap-pkcs11-$EUID
  fi
  path=$DIR
  [[ $path == /* ]] || path=$PWD/$path
  rest=${path#/}
  while [[ -n $rest ]]; do
    part=${rest%%/*}
    if [[ $rest == */* ]]; then rest=${rest#*/}; else rest=""; fi
    case $part in
      ""|.) ;;
      ..) ((${#parts[@]} == 0)) || unset 'parts[-1]' ;;
      *) parts+=("$part") ;;
    esac
  done
  while ((${#parts[@]})); do
    unset 'parts[-1]'
    printf -v path '/%s' "${parts[@]}"
    path=${path%/}
    ANCESTORS+=("${path:-/}")
  done
}

# begin_inspect: one stat, started before stdin is read (it runs while we
# read), for the PIN file (opened now when it is a regular file; any problem
# with it is prepare_environment's to report), the module, SOFTHSM2_CONF, the
# lock directory, the directories above it and the lock files in it. The
# helper subshell that runs it is also the stdin alarm (start_helper).
begin_inspect() {
  local names=() path pin=${VAL[pin_file]-}
  OPEN_END_US=$DEADLINE_US
  if [[ -n $pin && -f $pin ]] && open_safely "$pin"; then
    PIN_FD=$REPLY
    if [[ -f /dev/fd/$PIN_FD ]]; then names+=("/dev/fd/$PIN_FD"); else exec {PIN_FD}<&-; unset PIN_FD; fi
  fi
  # pkcs11-tool's SOFTHSM2_CONF: the real environment's, else the env file's.
  CONF=${SOFTHSM2_CONF-${FILE_ENV[SOFTHSM2_CONF]-}} LINKS=()
  lock_dir
  if [[ -n $DIR ]]; then
    names+=("${VAL[module]}")
    [[ -n $CONF ]] && names+=("$CONF")
    [[ -L $DIR ]] || names+=("$DIR")
    for path in "${ANCESTORS[@]}"; do
      if [[ -L $path ]]; then LINKS+=("$path"); else names+=("$path"); fi
    done
    names+=("$DIR"/*.lock)
  fi
  start_helper "${names[@]}"
}

# start_helper NAMES...: one subshell (one fork, no program of its own) that
# stats NAMES into the pipe STAT_FD and then is the stdin alarm: a pipe's writer
# may trickle and never close, and bash's read -t costs a select() per byte, so
# stdin is read without -t and the helper sends SIGURG (whose default is to be
# ignored, and which no caller sends) at the deadline, and again every 50 ms
# (bash runs a trap when a read is interrupted, and a signal may come between
# two reads); on_alarm turns it into TIMEOUT. It waits in read -t on the
# signature pipe, which it holds open for writing itself, and it never signals
# a process that is no longer its parent (we were killed: our pid is free).
start_helper() {
  local left=$((DEADLINE_US - ${EPOCHREALTIME/./})) alarm="" statw held
  ((left > 0)) || fail TIMEOUT "the deadline passed before stdin was read; raise --timeout-ms"
  [[ -f /dev/fd/0 ]] || alarm=1  # a regular file never keeps a read waiting
  (($#)) || [[ -n $alarm ]] || return 0
  if (($#)); then
    exec {STAT_FD}<<< ""
    read -r -u "$STAT_FD" _
    exec {statw}> "/dev/fd/$STAT_FD"  # a writer from now on: no early end of file
  fi
  seconds "$left"
  [[ -z $alarm ]] || trap on_alarm URG
  (
    exec </dev/null >/dev/null 2>&1 {STDERR}>&-
    if (($#)); then
      stat -L --printf '%u %a %s %d-%i %F\n%n\0' -- "$@" >&"$statw" || true
      exec {statw}>&-
    fi
    [[ -n $alarm ]] || exit 0
    # shellcheck disable=SC2034 # held open, never used
    exec {held}> "/dev/fd/$SIG_FD"
    read -r -t "$REPLY" -u "$SIG_FD" || true
    while our_parent && kill -URG "$$"; do read -r -t 0.05 -u "$SIG_FD" || true; done
  ) &
  [[ -z $alarm ]] || HELPER=$!
  [[ -z ${statw-} ]] || exec {statw}>&-
}

# inspect_files: begin_inspect's answers, checked in the order of
# lap_pkcs11/per_signature/signer.py: the PIN file, the module, the tool, the directories
# above the lock directory, the directory, the lock file. The lock and the
# guard are named after the module file and the SoftHSM2 configuration file
# (device and inode, whatever path names them; a configuration that names no
# file by its spelling, bytes outside [A-Za-z0-9._-] as "_", 160 at most).
inspect_files() {
  local module=${VAL[module]} conf=$CONF record name lock mode
  if [[ -v STAT_FD ]]; then
    while IFS= read -r -d '' record; do
      INFO[${record#*$'\n'}]=${record%%$'\n'*}
    done <&"$STAT_FD"
    exec {STAT_FD}<&-
  fi
  if [[ -n ${PIN_FD-} ]]; then
    [[ -v INFO[/dev/fd/$PIN_FD] ]] || stat_into "/dev/fd/$PIN_FD"  # opened only just now
    read_pin_file
  fi
  [[ -f $module ]] || fail MODULE_LOAD_FAILED "PKCS#11 module $module does not exist; fix --module"
  find_tool
  [[ -n $DIR ]] || return 0
  [[ -n ${INFO[$module]-} ]] || fail MODULE_LOAD_FAILED "PKCS#11 module $module cannot be read; fix --module"
  fields "${INFO[$module]}"
  name=$F_ID
  if [[ -n $conf && -n ${INFO[$conf]-} ]]; then
    fields "${INFO[$conf]}"
    name+=-$F_ID
  elif [[ -n $conf ]]; then
    conf=${conf//[^A-Za-z0-9._-]/_}
    name+=-${conf:0:160}
  fi
  check_ancestors "${LINKS[@]}"
  if [[ -L $DIR ]]; then
    fail CONFIG_INVALID "lock directory $DIR is not private (a symlink); use a directory only you can write, e.g. --lock-dir \$XDG_RUNTIME_DIR"
  elif [[ -z ${INFO[$DIR]-} && -n $MADE ]]; then
    if ! mkdir -m 700 -- "$DIR" 2>/dev/null; then
      [[ -e $DIR || -L $DIR ]] \
        || fail CONFIG_INVALID "lock directory $DIR cannot be made; set --lock-dir to a directory only this user can write"
      stat_into "$DIR"  # made by another signer just now
    fi
  fi
  if [[ -n ${INFO[$DIR]-} || -z $MADE ]]; then
    [[ -n ${INFO[$DIR]-} ]] \
      || fail CONFIG_INVALID "lock directory $DIR cannot be used (it does not exist); set --lock-dir to a directory only this user can write"
    fields "${INFO[$DIR]}"
    if [[ $F_TYPE != directory ]] || ((F_UID != EUID || 8#$F_MODE & 8#022)); then
      printf -v mode '%04o' $((8#$F_MODE))
      fail CONFIG_INVALID "lock directory $DIR is not private (${F_TYPE/#directory/a directory}, owner uid $F_UID, mode $mode); use a directory only you can write, e.g. --lock-dir \$XDG_RUNTIME_DIR"
    fi
  fi
  lock=$DIR/$name.lock
  [[ -L $lock ]] && fail CONFIG_INVALID "signer state file $lock is a symlink; remove it (only the signer's user may create files in its lock directory)"
  [[ -n ${INFO[$lock]-} ]] && check_state "$lock" "${INFO[$lock]}"
  { exec {LOCK_FD}<>"$lock"; } 2>/dev/null \
    || fail CONFIG_INVALID "lock file $lock cannot be opened; set --lock-dir to a private directory"
  [[ -f /dev/fd/$LOCK_FD && -O /dev/fd/$LOCK_FD ]] \
    || fail CONFIG_INVALID "signer state file $lock is not this user's regular file; remove it (only the signer's user may create files in its lock directory)"
  MARKER=$DIR/$name.pin-rejected
  SECRET_FILE=$DIR/secret
}

# check_ancestors LINKS...: every directory above the lock directory must be
# root's or ours, and no one else may rename entries in it (not writable by
# others, or sticky like /tmp): else the private directory could be swapped
# between check and use. A symlink among them (LINKS, stat'ed apart: without
# following it) is judged by its owner.
check_ancestors() {
  local path uid mode type record
  declare -A own=()
  if (($#)); then
    while IFS= read -r -d '' record; do
      own[${record#*$'\n'}]=${record%%$'\n'*}
    done < <(exec stat --printf '%u %a %s %d-%i %F\n%n\0' -- "$@" 2>/dev/null)
  fi
  for path in "${ANCESTORS[@]}"; do
    record=${own[$path]-${INFO[$path]-}}
    [[ -n $record ]] || fail CONFIG_INVALID "lock directory $path cannot be used; set --lock-dir to a directory only this user can write"
    fields "$record"
    uid=$F_UID mode=$F_MODE type=$F_TYPE
    if ((uid != 0 && uid != EUID)) \
        || { [[ $type != "symbolic link" ]] && ((8#$mode & 8#022 && !(8#$mode & 8#1000))); }; then
      printf -v mode '%04o' $((8#$mode))
      fail CONFIG_INVALID "lock directory's parent $path is not safe (owner uid $uid, mode $mode); set --lock-dir to a directory whose parents only root or this user can change"
    fi
  done
}

# check_state PATH FIELDS [LIMIT]: a file in the private directory must be this
# user's regular file that no one else may read or write (and at most LIMIT bytes).
check_state() {
  local uid mode size type problem=""
  fields "$2"
  uid=$F_UID mode=$F_MODE size=$F_SIZE type=$F_TYPE
  if [[ $type != "regular file" && $type != "regular empty file" ]]; then problem="is not a regular file (${type:-unknown})"
  elif ((uid != EUID)); then problem="belongs to uid $uid"
  elif ((8#$mode & 8#077)); then printf -v mode '%04o' $((8#$mode)); problem="has mode $mode"
  elif [[ -n ${3-} ]] && ((size > $3)); then problem="is larger than $3 bytes"
  fi
  [[ -z $problem ]] || fail CONFIG_INVALID "signer state file $1 $problem; remove it (only the signer's user may create files in its lock directory)"
}

# check_state_files PATHS...: check_state for those that exist (lstat: a symlink is refused).
check_state_files() {
  local path record found=()
  declare -A stated=()
  for path in "$@"; do [[ -e $path || -L $path ]] && found+=("$path"); done
  ((${#found[@]})) || return 0
  while IFS= read -r -d '' record; do
    stated[${record#*$'\n'}]=${record%%$'\n'*}
  done < <(exec stat --printf '%u %a %s %d-%i %F\n%n\0' -- "${found[@]}" 2>/dev/null)
  for path in "${found[@]}"; do check_state "$path" "${stated[$path]-}" "$STATE_FILE_LIMIT"; done
}

# start_lock: wait for the lock in the background until MIN_TOOL_MS before the
# deadline; await_lock collects it. (Should we die meanwhile, flock gets the lock
# later, exits and so lets it go: nothing holds it for us.)
start_lock() {
  [[ -v LOCK_FD ]] || return 0
  local left=$((DEADLINE_US - ${EPOCHREALTIME/./} - MIN_TOOL_MS * 1000))
  ((left > 0)) || fail TIMEOUT "the deadline left less than $MIN_TOOL_MS ms to lock the token and run pkcs11-tool, so it was not started; raise --timeout-ms"
  seconds "$left"
  flock -w "$REPLY" "$LOCK_FD" </dev/null 2>/dev/null {STDERR}>&- &
  LOCKER=$!
}

await_lock() {
  [[ -n ${LOCKER-} ]] || return 0
  wait "$LOCKER" || fail TIMEOUT "the token stayed busy with other signatures until the deadline; raise --timeout-ms or lower concurrency"
}

# The PIN guard: what it keeps and why is said once, at PinGuard in
# lap_pkcs11/per_signature/signer.py; this is the same guard on the same files.

# guard_lines PATH: the valid lines (64 hex digits) of a state file, into LINES.
guard_lines() {
  local line
  LINES=()
  [[ -e $1 || -L $1 ]] || return 0
  check_state_files "$1"
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[0-9a-f]{64}$ ]] && LINES+=("$line")
  done < "$1"
  return 0
}

# guard_secret [create]: the per-user secret into SECRET; a missing or damaged
# one is made anew when asked to.
guard_secret() {
  guard_lines "$SECRET_FILE"
  SECRET=${LINES[0]-}
  [[ -n $SECRET || -z ${1-} ]] && return 0
  printf -v SECRET '%08x' "$SRANDOM" "$SRANDOM" "$SRANDOM" "$SRANDOM" "$SRANDOM" "$SRANDOM" "$SRANDOM" "$SRANDOM"
  printf '%s\n' "$SECRET" > "$SECRET_FILE"
}

# guard_fingerprint: sha256(secret, newline, PIN) into REPLY.
guard_fingerprint() {
  read -r REPLY _ < <(printf '%s\n%s' "$SECRET" "$PIN_VALUE" | sha256sum)
}

check_pin_guard() {
  [[ -n $MARKER ]] || return 0
  local seen line
  guard_lines "$MARKER"
  ((${#LINES[@]})) || return 0
  seen=("${LINES[@]}")
  guard_secret
  [[ -n $SECRET ]] || return 0
  guard_fingerprint
  for line in "${seen[@]}"; do
    [[ $line == "$REPLY" ]] && fail PIN_INCORRECT "the token rejected this PIN before and it is not tried again, so the token cannot lock; fix the PIN (if the token's PIN was changed to it, remove $MARKER)"
  done
  return 0
}

remember_rejected_pin() {
  [[ -n $MARKER ]] || return 0
  local line kept=()
  guard_secret create
  guard_fingerprint
  guard_lines "$MARKER"
  for line in "${LINES[@]}"; do [[ $line == "$REPLY" ]] || kept+=("$line"); done
  kept+=("$REPLY")
  ((${#kept[@]} <= GUARD_REMEMBERED)) || kept=("${kept[@]: -GUARD_REMEMBERED}")
  printf '%s\n' "${kept[@]}" > "$MARKER"
}

forget_rejected_pin() {
  [[ -n $MARKER ]] && [[ -e $MARKER || -L $MARKER ]] || return 0
  rm -f -- "$MARKER"
}

selector_args() {
  SELECTOR=(--module "${VAL[module]}")
  if [[ -v VAL[slot] ]]; then SELECTOR+=(--slot "${VAL[slot]}")
  elif [[ -v VAL[slot_index] ]]; then SELECTOR+=(--slot-index "${VAL[slot_index]}")
  elif [[ -v VAL[token_label] ]]; then SELECTOR+=(--token-label "${VAL[token_label]}")
  fi
}

# run_tool OUT ARGS...: pkcs11-tool, never started with less than MIN_TOOL_MS
# left, as setsid -- timeout -s KILL SECONDS pkcs11-tool (Python's backend keeps
# the same times with a watchdog of its own instead): coreutils timeout leads a
# session and process group of its own (no terminal to prompt on) and KILLs that
# whole group, a module's helper processes included, BACKSTOP_MS after kill_at.
# While we live we kill it ourselves at kill_at; when a caller SIGKILLs us, the run is not cut inside a login (which
# would empty SoftHSM2's token file), and still nothing outlives our kill_at.
# OUT "base64": the tool's stdout goes through base64 (running while the tool
# does) into SIG_FD, its stderr into the watch pipe we read here. Otherwise (a
# listing) its stdout is the watch pipe and becomes a here-string at SIG_FD.
# When the deadline passes, the TIMEOUT line is written at once and the tool
# gets until KILL_AT_US to finish (a login half-written would destroy a
# SoftHSM2 token), then its group is killed. Sets STATUS and ERR_TEXT.
run_tool() {
  local out=$1 watch line rc now next text="" listing="" gone="" backstop
  shift
  tool_time_left || fail TIMEOUT "the deadline left less than $MIN_TOOL_MS ms for pkcs11-tool, so it was not started; raise --timeout-ms"
  backstop=$((KILL_AT_US - ${EPOCHREALTIME/./} + BACKSTOP_MS * 1000))
  printf -v backstop '%d.%03d' $((backstop / 1000000)) $((backstop / 1000 % 1000))
  if [[ $out == base64 ]]; then
    # base64 (started by the subshell that becomes the tool chain, not by us)
    # reads the tool's stdout; the signature pipe ends when it exits.
    exec {watch}< <(
      exec {STDERR}>&-; child_env
      exec setsid -- "$TIMEOUT_TOOL" -s KILL "$backstop" "$TOOL" "$@" </dev/null 2>&1 \
        > >(exec base64 -w0 > "/dev/fd/$SIG_FD" 2>/dev/null)
    )
    TOOL_PID=$!
    TOOL_START=""
    stat_of "$TOOL_PID" && TOOL_START=${STAT_FIELDS[19]}
  else
    listing=1
    exec {watch}< <(
      exec {STDERR}>&-; child_env
      exec setsid -- "$TIMEOUT_TOOL" -s KILL "$backstop" "$TOOL" "$@" </dev/null 2> "/dev/fd/$ERR_FD"
    )
    TOOL_PID=$!
    TOOL_START=""
    stat_of "$TOOL_PID" && TOOL_START=${STAT_FIELDS[19]}
  fi
  while :; do
    now=${EPOCHREALTIME/./}
    if [[ -z $LINE ]] && ((now >= DEADLINE_US)); then
      say TIMEOUT "pkcs11-tool did not finish before the deadline; check the token, pcscd and --timeout-ms"
    fi
    if [[ -n $LINE ]] && ((now >= KILL_AT_US)); then
      kill -KILL -- "-$TOOL_PID" 2>/dev/null || true
      { wait "$TOOL_PID"; } 2>/dev/null || true
      exit "$EXIT"
    fi
    if [[ -n $LINE ]]; then next=$KILL_AT_US; else next=$DEADLINE_US; fi
    next=$((next - now))
    ((next <= POLL_US)) || next=$POLL_US
    seconds "$next"
    rc=0 line=""
    IFS= read -r -t "$REPLY" -u "$watch" line || rc=$?
    # Read on to the end, keep at most OUTPUT_LIMIT bytes of it.
    ((${#text} > OUTPUT_LIMIT)) && line=""
    if ((rc == 0)); then text+=$line$'\n'; continue; fi
    text+=$line
    ((rc == 1)) && break
    # timeout has exited, a helper of the tool holds the pipe: kill it, read on;
    # still held a poll later, by one outside the group (setsid): kill that too.
    if [[ -z $gone ]] && tool_exited; then
      gone=1
      kill -KILL -- "-$TOOL_PID" 2>/dev/null || true
    elif [[ $gone == 1 ]]; then
      gone=2
      kill_holders "$watch"
    fi
  done
  # Reaped first: timeout closes its stderr (our pipe) just before it exits.
  STATUS=0
  { wait "$TOOL_PID"; } 2>/dev/null || STATUS=$?
  # Whatever the tool left in its group goes too.
  kill -KILL -- "-$TOOL_PID" 2>/dev/null || true
  TOOL_PID=""
  exec {watch}<&-
  if [[ -n $listing ]]; then
    ERR_TEXT=""
    IFS= read -r -d '' -N "$OUTPUT_LIMIT" ERR_TEXT < "/dev/fd/$ERR_FD" || true
    exec {SIG_FD}<<< "$text"
  else
    ERR_TEXT=$text
  fi
  # Starved past its deadline (a loaded host), we may find the tool already
  # killed by timeout's backstop: that is the deadline's TIMEOUT, not a crash.
  if [[ -z $LINE ]] && ((STATUS > 128 && ${EPOCHREALTIME/./} >= DEADLINE_US)); then
    say TIMEOUT "pkcs11-tool did not finish before the deadline; check the token, pcscd and --timeout-ms"
  fi
  [[ -z $LINE ]] || late_tool
}

# child_env: in the tool chain's subshell, pkcs11-tool's environment: ours, the
# env file's names that the environment lacks, and the PIN. The lock descriptor
# stays open in the chain: the token stays locked until the whole tool group is
# gone, even when we are SIGKILLed.
child_env() {
  local name
  for name in "${!CHILD_ENV[@]}"; do export "$name=${CHILD_ENV[$name]}" 2>/dev/null || true; done
  export "$PIN_ENV=$PIN_VALUE" 2>/dev/null || true
}

# stat_of PID: the fields of /proc/PID/stat after the command name, into STAT_FIELDS.
stat_of() {
  local stat=""
  { IFS= read -r -d '' stat < "/proc/$1/stat"; } 2>/dev/null || true
  [[ $stat == *") "* ]] || return 1
  read -r -a STAT_FIELDS <<< "${stat##*) }"
}

# tool_exited: the leader (timeout) has exited though a helper of the tool may
# still hold the watch pipe open.
tool_exited() {
  stat_of "$TOOL_PID" || return 0
  [[ ${STAT_FIELDS[0]} == Z ]]
}

# kill_holders FD: SIGKILL every other process, started since the tool's chain, that
# still holds the pipe of our FD (a helper that left the tool's process group with
# setsid, keeping what it inherited), with its process group when the group's leader
# started since too and the group is not ours. An older holder got the descriptor
# passed to it by the tool: it is no leftover, and neither is its group.
kill_holders() {
  local dir held pid group ours since=$TOOL_START
  [[ -n $since ]] && stat_of $$ || return 0
  ours=${STAT_FIELDS[2]}
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
    if ! stat_of "$pid" || ((STAT_FIELDS[19] < since)); then continue; fi
    group=${STAT_FIELDS[2]}
    for held in "$dir"/fd/*; do
      [[ $held -ef /proc/$$/fd/$1 ]] || continue
      if [[ $group != "$ours" && $group != 0 ]] && stat_of "$group" \
          && ((STAT_FIELDS[19] >= since)); then
        kill -KILL -- "-$group" 2>/dev/null || true
      fi
      kill -KILL -- "$pid" 2>/dev/null || true
      break
    done
  done
}

# late_tool: the deadline (or a signal) came while pkcs11-tool ran and it
# finished within the grace: its line is written; the PIN guard still learns
# what the token said, then we exit with that line's code.
late_tool() {
  if ((STATUS == 0)); then forget_rejected_pin
  elif [[ $ERR_TEXT == *CKR_PIN_INCORRECT* ]]; then remember_rejected_pin
  fi
  exit "$EXIT"
}

classify() {
  local err=$ERR_TEXT
  case $err in
    *"Failed to load pkcs11 module"*) fail MODULE_LOAD_FAILED "the PKCS#11 module cannot be loaded; check --module and the module's own configuration" ;;
    *"sc_dlopen failed"*) fail MODULE_LOAD_FAILED "the PKCS#11 module cannot be loaded; check --module" ;;
    *"sc_dlopen_deep failed"*) fail MODULE_LOAD_FAILED "the PKCS#11 module cannot be loaded; check --module" ;;
    *"C_Initialize failed"*) fail MODULE_LOAD_FAILED "the PKCS#11 module failed to initialise; check its configuration (e.g. SOFTHSM2_CONF)" ;;
    *CKR_PIN_INCORRECT*) remember_rejected_pin; fail PIN_INCORRECT "the token rejected the PIN; fix the PIN (real tokens lock after a few wrong tries)" ;;
    *CKR_PIN_LEN_RANGE*) fail PIN_INCORRECT "the token rejected the PIN's length; fix the PIN" ;;
    *CKR_PIN_LOCKED*) fail PIN_LOCKED "the user PIN is locked; unlock it with the SO PIN" ;;
    *CKR_PIN_EXPIRED*) fail PIN_LOCKED "the user PIN has expired; set a new one" ;;
    *"Token not initialized"*|*CKR_TOKEN_NOT_RECOGNIZED*) fail TOKEN_NOT_FOUND "the selected slot holds no initialised token; check the token selector (pkcs11-tool --list-token-slots)" ;;
    *"No slot with token named"*) fail TOKEN_NOT_FOUND "no token with that label; check --token-label (pkcs11-tool --list-slots)" ;;
    *CKR_SLOT_ID_INVALID*) fail TOKEN_NOT_FOUND "no such slot; check --slot (pkcs11-tool --list-slots)" ;;
    *CKR_TOKEN_NOT_PRESENT*) fail TOKEN_NOT_FOUND "no token in that slot; insert it or fix the slot" ;;
    *"is not available"*) fail TOKEN_NOT_FOUND "no token at that slot index; check --slot-index (pkcs11-tool --list-slots)" ;;
    *"No slot with id"*) fail TOKEN_NOT_FOUND "no such slot; check --slot (pkcs11-tool --list-slots)" ;;
    *"No slots"*) fail TOKEN_NOT_FOUND "the module sees no slots; check the token is present and initialised" ;;
    *"No slot"*) fail TOKEN_NOT_FOUND "no usable token; check the token selector (pkcs11-tool --list-slots)" ;;
    *"Private/secret key not found"*) fail KEY_NOT_FOUND "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)" ;;
    *"key not found"*) fail KEY_NOT_FOUND "no private key with that id on the token; check --key-id (lap-pkcs11 doctor)" ;;
    *"Key has no EC_PARAMS attribute"*) fail MECHANISM_UNSUPPORTED "the key has no EC parameters, so it is not an Ed25519 key; select an Ed25519 key" ;;
    *"Unknown or unsupported EC curve"*) fail MECHANISM_UNSUPPORTED "the key is on a curve pkcs11-tool cannot sign EdDSA with; select an Ed25519 key" ;;
    *CKR_MECHANISM_INVALID*) fail MECHANISM_UNSUPPORTED "the token cannot do this mechanism; check --mechanism and the key type" ;;
    *CKR_KEY_TYPE_INCONSISTENT*) fail MECHANISM_UNSUPPORTED "the key's type does not fit the mechanism; use an Ed25519 key with EDDSA" ;;
    *CKR_KEY_FUNCTION_NOT_PERMITTED*) fail MECHANISM_UNSUPPORTED "the key may not sign (CKA_SIGN is false); use a signing key" ;;
    *CKR_OPERATION_NOT_INITIALIZED*) fail MECHANISM_UNSUPPORTED "the token refused to sign with this mechanism and key; check --mechanism and the key type" ;;
    *"Unknown PKCS11 mechanism"*) fail MECHANISM_UNSUPPORTED "pkcs11-tool does not know this mechanism; use EDDSA" ;;
    *"mechanism not supported"*) fail MECHANISM_UNSUPPORTED "the token does not support this mechanism" ;;
  esac
  # timeout (coreutils) exits 126 or 127 when it cannot run the tool.
  ((STATUS == 126 || STATUS == 127)) && fail TOOL_NOT_FOUND "pkcs11-tool could not be started; check --pkcs11-tool"
  ((STATUS > 128)) && fail SIGNING_FAILED "pkcs11-tool died of signal $((STATUS - 128))"
  local line last=""
  while IFS= read -r line; do
    trim line
    [[ -n $line && $line != Aborting. ]] && last=$line
  done <<< "$err"
  fail SIGNING_FAILED "pkcs11-tool exited $STATUS${last:+: ${last:0:200}}"
}

# The CKA_ID to sign with: the configured id, the id of the one key with the
# label, or, given both, the id after checking that the one key with it carries
# the label (pkcs11-tool signs with the first key of an id).
resolve_key_id() {
  if [[ ! -v VAL[key_label] ]]; then KEY_ID=${VAL[key_id]}; return 0; fi
  run_tool "$SIG_FD" "${SELECTOR[@]}" --login --pin "env:$PIN_ENV" --list-objects --type privkey
  ((STATUS == 0)) || classify
  local line field="" value in_key="" label="" id="" have_label="" ids=() same=()
  local wanted=${VAL[key_label]} want_id=${VAL[key_id]-}
  # The listing of every OpenSC from 0.23 to 0.27, read as
  # lap_pkcs11/backends/pkcs11_tool.py's
  # parse_objects reads it: an object starts at a line with no indent, fields are
  # "  name: value", a line indented deeper continues the field before it (0.27
  # wraps values over 32 bytes). Ids become lowercase hex, "?" when unreadable.
  finish_key() {
    if [[ -n $in_key ]]; then
      # 0.27 prints ids of at most 4 bytes that are not zero as "258 (0x01:02)".
      if [[ $id =~ ^([0-9]+)\ \(0x([0-9a-fA-F:]+)\)$ ]]; then
        id=${BASH_REMATCH[2]//:/}
        [[ ${#id} -le 8 && ${#BASH_REMATCH[1]} -le 10 ]] && ((16#${id:-0} == 10#${BASH_REMATCH[1]})) || id="?"
      fi
      id=${id//[:[:space:]]/}
      id=${id,,}
      [[ $id =~ ^([0-9a-f]{2})+$ ]] || id="?"
      [[ -n $have_label && $label == "$wanted" ]] && ids+=("$id")
      # A key's label as "=label", or "" when it shows none.
      [[ $id == "$want_id" ]] && same+=("${have_label:+=$label}")
    fi
    in_key="" label="" id="" have_label="" field=""
  }
  while IFS= read -r line; do
    if [[ -z ${line//[[:space:]]/} ]]; then
      continue
    elif [[ $line != " "* ]]; then
      finish_key
      [[ $line == "Private Key Object"* ]] && in_key=1
    elif [[ -z $in_key ]]; then
      continue
    elif [[ $line == "   "* && -n $field ]]; then
      [[ $field == ID ]] && id+=" ${line#"${line%%[![:space:]]*}"}"
    else
      field=${line#"${line%%[![:space:]]*}"}
      value=${field#*:}
      field=${field%%:*}
      trim value
      [[ $field == label ]] && label=$value && have_label=1
      [[ $field == ID ]] && id=$value
    fi
  done < "/dev/fd/$SIG_FD"
  finish_key
  if [[ -n $want_id ]]; then
    ((${#same[@]} > 0)) || fail KEY_NOT_FOUND "no private key with id $want_id on the token; check --key-id (lap-pkcs11 keys)"
    ((${#same[@]} == 1)) || fail KEY_NOT_FOUND "${#same[@]} private keys have id $want_id; give each key its own id"
    if [[ ${same[0]} != "=$wanted" ]]; then
      label=None
      [[ -z ${same[0]} ]] || label="'${same[0]#=}'"
      fail KEY_NOT_FOUND "the private key with id $want_id is labelled $label, not '$wanted'; check --key-label or the URI's object= (lap-pkcs11 keys)"
    fi
    KEY_ID=$want_id
    return 0
  fi
  ((${#ids[@]} > 0)) || fail KEY_NOT_FOUND "no private key labelled '$wanted' on the token; check --key-label (lap-pkcs11 doctor)"
  local unique
  unique=$(printf '%s\n' "${ids[@]}" | sort -u)
  [[ $unique != *"?"* ]] || fail KEY_NOT_FOUND "a private key labelled '$wanted' shows no ID that lap-pkcs11 can read; select the key with --key-id"
  [[ $unique != *$'\n'* ]] || fail KEY_NOT_FOUND "the label '$wanted' is not unique on the token; select the key with --key-id"
  KEY_ID=$unique
}

# resolve_token: a URI that narrows the token by serial=, manufacturer=, model=
# or the module's library-*= picks the one matching token (with its label or
# slot id, when given) from one --show-info --list-token-slots run, and selects
# it by slot id: pkcs11-tool itself selects only by label, slot or index. As
# lap_pkcs11/per_signature/signer.py's resolve_token and choose_token.
resolve_token() {
  local attr any="" line name value head inside current=-1 count=0 i wanted="" library="" shown=""
  local slot_id=""
  local lib_manufacturer="None" lib_description="None" lib_version="None" in_slots=""
  local slots=() labels=() manufacturers=() models=() serials=() found=()
  for attr in "${TOKEN_CONSTRAINTS[@]}"; do [[ -v VAL[$attr] ]] && any=1; done
  [[ -n $any ]] || return 0
  run_tool "$SIG_FD" --module "${VAL[module]}" --show-info --list-token-slots
  ((STATUS == 0)) || classify
  while IFS= read -r line; do
    if [[ $line == "Slot "* ]]; then
      in_slots=1 current=-1
      head=${line%%:*} inside=${head##*(0x} inside=${inside%%)*}
      if [[ $head == *"(0x"* && $inside =~ ^[0-9a-fA-F]+$ ]]; then slot_id=$((16#$inside)); else slot_id=""; fi
    elif [[ -z $in_slots && $line == "Manufacturer "* ]]; then
      lib_manufacturer=${line#Manufacturer} lib_manufacturer=${lib_manufacturer#"${lib_manufacturer%%[! ]*}"}
      lib_manufacturer=${lib_manufacturer%"${lib_manufacturer##*[! ]}"}
    elif [[ -z $in_slots && $line == "Library "* ]]; then
      value=${line#Library} value=${value#"${value%%[! ]*}"} value=${value%"${value##*[! ]}"}
      if [[ $value == *" (ver "*")" ]]; then
        lib_description=${value% (ver *} lib_version=${value##* (ver } lib_version=${lib_version%)}
      else
        lib_description=$value
      fi
    elif [[ -n $in_slots && $line == "  "*:* ]]; then
      name=${line%%:*} name=${name#"${name%%[! ]*}"} name=${name%"${name##*[! ]}"}
      value=${line#*:} value=${value#"${value%%[! ]*}"} value=${value%"${value##*[! ]}"}
      if [[ $name == "token label" && -n $slot_id ]]; then
        current=$count count=$((count + 1))
        slots[current]=$slot_id labels[current]=$value
        manufacturers[current]="" models[current]="" serials[current]=""
      elif ((current >= 0)); then
        case $name in
          "token manufacturer") manufacturers[current]=$value ;;
          "token model") models[current]=$value ;;
          "serial num") serials[current]=$value ;;
        esac
      fi
    fi
  done < "/dev/fd/$SIG_FD"
  # The library first: a module that is not the one named selects nothing.
  for attr in library_manufacturer library_description library_version; do
    [[ -v VAL[$attr] ]] || continue
    library+="${library:+, }${URI_NAME[$attr]}=${VAL[$attr]}"
    case $attr in
      library_manufacturer) value=$lib_manufacturer ;;
      library_description) value=$lib_description ;;
      library_version) value=$lib_version ;;
    esac
    [[ $value == "${VAL[$attr]}" ]] || any=mismatch
  done
  if [[ $any == mismatch ]]; then
    fail TOKEN_NOT_FOUND "the module is '$lib_manufacturer' '$lib_description' version $lib_version, not the URI's $library; check the URI and --module"
  fi
  for attr in token_label slot token_serial token_manufacturer token_model; do
    [[ -v VAL[$attr] ]] && wanted+="${wanted:+, }${URI_NAME[$attr]}=${VAL[$attr]}"
  done
  for ((i = 0; i < count; i++)); do
    [[ ! -v VAL[token_label] || ${labels[i]} == "${VAL[token_label]}" ]] || continue
    [[ ! -v VAL[slot] || ${slots[i]} == "${VAL[slot]}" ]] || continue
    [[ ! -v VAL[token_serial] || ${serials[i]} == "${VAL[token_serial]}" ]] || continue
    [[ ! -v VAL[token_manufacturer] || ${manufacturers[i]} == "${VAL[token_manufacturer]}" ]] || continue
    [[ ! -v VAL[token_model] || ${models[i]} == "${VAL[token_model]}" ]] || continue
    found+=("${slots[i]}")
  done
  if ((${#found[@]} == 1)); then
    VAL[slot]=${found[0]}
    unset 'VAL[token_label]' 'VAL[slot_index]'
    return 0
  fi
  for ((i = 0; i < count; i++)); do shown+="${shown:+; }'${labels[i]}' serial '${serials[i]}'"; done
  ((${#found[@]} > 1)) && fail TOKEN_NOT_FOUND "${#found[@]} tokens have $wanted; add serial= to the URI to tell them apart"
  fail TOKEN_NOT_FOUND "no token has $wanted; tokens seen: ${shown:-none}; check the URI (pkcs11-tool --list-token-slots)"
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

# message_file: openssl -rawin needs the message in a file of known size, and
# pkcs11-tool has read the scratch pipe empty: the message again, into an
# unlinked file (a here-string at bash's compatibility level 5.0, read-only
# until chmod makes it writable for us) at MSG_FD.
message_file() {
  local BASH_COMPAT=50 TMPDIR=${TMPDIR:-/tmp} file
  [[ -d /dev/shm && -w /dev/shm ]] && TMPDIR=/dev/shm
  exec {file}<<< ""
  [[ -w /dev/fd/$file ]] || chmod u+w "/dev/fd/$file"
  MSG_FD=$file
  write_message
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
  message_file
  if ! openssl pkeyutl -verify -pubin -inkey /dev/stdin -rawin -in "/dev/fd/$MSG_FD" \
      -sigfile <(base64 -d <<< "$1") <<< "$pem" >/dev/null 2>&1; then
    fail KEY_MISMATCH "the signature does not verify under the pinned public key ${key:0:16}...; the token key is not the one the gateway trusts (check slot, token and key id, or the pinned key)"
  fi
}

# write_signature B64: the signature in the configured encoding on stdout. A
# full or broken stdout is SIGNING_FAILED (no SIGPIPE death, no bash message).
write_signature() {
  local i out="" err="" line
  trap '' PIPE
  case ${VAL[output]} in
    base64) out=$1$'\n' ;;
    hex) decode_signature "$1"
         for ((i = 0; i < 64; i++)); do printf -v out '%s%02x' "$out" "${BYTES[i]}"; done
         out+=$'\n' ;;
    raw) decode_signature "$1"
         for ((i = 0; i < 64; i++)); do printf -v out '%s\\x%02x' "$out" "${BYTES[i]}"; done ;;
  esac
  local format='%s' stdout writer rc=""
  [[ ${VAL[output]} == raw ]] && format=$out out=""
  if [[ -f /dev/fd/1 ]]; then
    # shellcheck disable=SC2059 # the format is '%s' or our own \xHH escapes
    printf "$format" "$out" 2> "/dev/fd/$ERR_FD" && return 0
  else
    # A pipe (or socket, terminal) may be full with nobody reading: a writer
    # of its own, waited for WRITE_WAIT; at most 129 bytes, so a pipe gets all
    # of it in one write or none.
    exec {stdout}>&1
    exec {writer}< <(
      exec {STDERR}>&-
      [[ -z ${LOCK_FD-} ]] || exec {LOCK_FD}>&-
      rc=0
      # shellcheck disable=SC2059 # as above
      printf "$format" "$out" 1>&"$stdout" 2> "/dev/fd/$ERR_FD" || rc=1
      printf '%s\n' "$rc"
    )
    local pid=$!
    rc=""
    IFS= read -r -t "$WRITE_WAIT" -u "$writer" rc || true
    exec {writer}<&- {stdout}>&-
    [[ $rc == 0 ]] && return 0
    if [[ -z $rc ]]; then
      kill -KILL "$pid" 2>/dev/null || true
      fail SIGNING_FAILED "stdout cannot be written (nobody reads it); nothing was signed for the caller"
    fi
  fi
  IFS= read -r -d '' -N 4096 err < "/dev/fd/$ERR_FD" || true
  while IFS= read -r line; do
    [[ $line == *"write error: "* ]] && err=${line##*write error: }
  done <<< "$err"
  fail SIGNING_FAILED "stdout cannot be written (${err:-write error}); nothing was signed for the caller"
}

main() {
  local name
  for name in "${SIGNALS[@]}"; do
    # shellcheck disable=SC2064 # the name is fixed now
    trap "on_signal $name" "$name"
  done
  [[ -z ${EARLY_SIGNAL-} ]] || on_signal "$EARLY_SIGNAL"
  started_at
  close_stray_fds
  check_stdio
  umask 077
  # SRANDOM (the guard's secret), here-strings as pipes, wait for a process substitution.
  ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) \
    || fail TOOL_NOT_FOUND "bash $BASH_VERSION is too old; bash 5.1 or later is needed"
  parse_args "$@"
  resolve
  check_gateway_input
  set_deadline
  [[ -z ${STDOUT_CLOSED-} ]] || fail SIGNING_FAILED "stdout is closed; the signature would have nowhere to go, so nothing was signed"
  if [[ -v VAL[expect_public_key] ]] && ! type -P openssl >/dev/null; then
    fail CONFIG_INVALID "a public key is pinned but openssl is not installed; apt-get install openssl"
  fi
  if ! type -P setsid flock >/dev/null; then
    fail TOOL_NOT_FOUND "setsid or flock (util-linux) is missing; install util-linux"
  fi
  # coreutils' timeout at a fixed place, not from PATH (as Python's watchdog is /bin/bash).
  if [[ -x /usr/bin/timeout ]]; then TIMEOUT_TOOL=/usr/bin/timeout
  elif [[ -x /bin/timeout ]]; then TIMEOUT_TOOL=/bin/timeout
  else fail TOOL_NOT_FOUND "timeout (coreutils) is missing; install it"
  fi
  type -P stat >/dev/null || fail TOOL_NOT_FOUND "stat (coreutils) is missing; install coreutils"
  open_scratch_files
  SIG_SCRATCH=$SIG_FD
  begin_inspect
  read_message
  prepare_environment
  inspect_files
  stop_helper
  start_lock
  [[ -z ${DECODER-} ]] || wait "$DECODER" || fail INPUT_INVALID "stdin could not be decoded as base64"
  await_lock
  check_pin_guard
  resolve_token
  selector_args
  resolve_key_id
  SIG_FD=$SIG_SCRATCH
  run_tool base64 "${SELECTOR[@]}" --login --pin "env:$PIN_ENV" --sign \
    --mechanism "${VAL[mechanism]}" --id "$KEY_ID" --input-file "/dev/fd/$MSG_FD"
  ((STATUS == 0)) || classify
  forget_rejected_pin
  local signature=""
  IFS= read -r -N 65536 signature < "/dev/fd/$SIG_FD" || true
  # The signature is ours: from now on a signal changes nothing.
  trap '' "${SIGNALS[@]}"
  check_signature "$signature"
  check_pinned_key "$signature"
  write_signature "$signature"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
