/*
 * lap-pkcs11-client: `lap-pkcs11 client` compiled, for the LAP gateway's hottest path.
 *
 * The gateway starts its signing command for every capability token, receipt and
 * audit record and waits for it; with the agent the signature costs well under a
 * millisecond, so what the gateway waits for is the start of the client. This is
 * that client without an interpreter: one C11 file, the C library only.
 *
 * The contract is lap_pkcs11/per_signature/client_command.py's, byte for byte: the same options and
 * environment, the same framing (lap_pkcs11/per_signature/wire.py), the same checks of the
 * answer, the same one `lap-pkcs11: NAME: ...` line, exit codes and empty stdout
 * on every failure. The test suite runs every client contract test against both
 * and compares their stdout, stderr and exit codes. One thing it leaves out: with
 * a pinned key (--expect-public-key, LAP_GATEWAY_PUBLIC_KEY_HEX) the Python client
 * verifies the signature itself; this one checks the same options and input but
 * leaves the verification to the agent, which verifies every signature against its
 * pinned key before it answers (README: "The compiled client").
 *
 * Careful C: every buffer is fixed and bounded (static, nothing is allocated); every
 * read and write loop handles EINTR and short counts and waits with a deadline;
 * signals are blocked except while waiting (ppoll), where they are only noted, and
 * the program stops at its next step, as the Python client does; the server's bytes
 * reach stderr only through printable(), as printable ASCII.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROGRAM "lap-pkcs11"
#define DEFAULT_SOCKET "/run/lap-pkcs11/signer.sock"
#define DEFAULT_TIMEOUT_MS "2000"
/* lap_pkcs11.per_signature.config: time kept back from the caller's deadline,
   and the least left. */
#define CALLER_MARGIN_MS 250
#define MIN_DEADLINE_MS 50
/* lap_pkcs11.per_signature.wire: the signer answers TIMEOUT this long before
   the client gives up. */
#define SERVER_MARGIN_MS 150
/* lap_pkcs11.per_signature.wire.MAX_BODY: base64 of the agent's 64 KiB message,
   plus whitespace. */
#define MAX_MESSAGE (64 * 1024)
#define MAX_BODY (4 * ((MAX_MESSAGE + 2) / 3) + 4096)
#define MAX_RESPONSE (1 << 16)
/* The longest signer text passed on, and the longest local text quoted. */
#define MAX_LINE 400
#define MAX_SHOWN 200
#define MAX_NAME 40
#define MAX_USER 32
#define OUTPUT_WAIT_NS (200 * NS_PER_MS)
#define HEADER_ROOM 32
#define MESSAGE_SIZE 2048
#define NS_PER_MS INT64_C(1000000)
#define NS_PER_S INT64_C(1000000000)
#define COUNT(array) (sizeof(array) / sizeof((array)[0]))

static const char USAGE[] =
    "Usage: lap-pkcs11 client [OPTIONS] < message > signature\n"
    "       lap-pkcs11-client [OPTIONS] < message > signature\n"
    "\n"
    "Send stdin to the lap-pkcs11 agent (or the socket-activated signer) and print\n"
    "its answer exactly as `lap-pkcs11 sign` would (same output, error line and exit\n"
    "code), after checking it: one 64-byte signature, by the pinned key when one is\n"
    "set.\n"
    "\n"
    "  --socket PATH             Env: LAP_PKCS11_SOCKET. [default: /run/lap-pkcs11/signer.sock]\n"
    "  --timeout-ms N            Env: LAP_PKCS11_CLIENT_TIMEOUT_MS. [default: 2000]\n"
    "                            Capped by SIGNER_TIMEOUT_SECONDS (or\n"
    "                            LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS) less 250 ms.\n"
    "  --expect-public-key HEX   Pinned Ed25519 public key: the signature must verify.\n"
    "                            Env: LAP_PKCS11_EXPECT_PUBLIC_KEY, LAP_GATEWAY_PUBLIC_KEY_HEX.\n"
    "  --input raw|base64        How stdin holds the message (to verify the signature);\n"
    "                            the gateway sends base64. Env: LAP_PKCS11_INPUT. [default: raw]\n"
    "  --server-user USER        Who may serve the socket besides root and this user\n"
    "                            (a name or uid: the agent's user when it listens\n"
    "                            itself). Env: LAP_PKCS11_SERVER_USER.\n"
    "\n"
    "lap-pkcs11-client, the compiled client, leaves the pinned-key check to the\n"
    "signer: the agent verifies every signature against its pinned key.\n";

/* ---- errors: lap_pkcs11/per_signature/errors.py -------------------------------------- */

struct error_kind {
    const char *name;
    int code;
};

/* Every name errors.py defines, with its exit code (a test checks both lists agree). */
static const struct error_kind ERRORS[] = {
    {"CONFIG_INVALID", 64},     {"INPUT_INVALID", 65},       {"MESSAGE_TOO_LARGE", 65},
    {"TOOL_NOT_FOUND", 69},     {"MODULE_LOAD_FAILED", 69},  {"TOKEN_NOT_FOUND", 69},
    {"KEY_NOT_FOUND", 69},      {"MECHANISM_UNSUPPORTED", 69}, {"SIGNER_UNAVAILABLE", 69},
    {"PIN_MISSING", 77},        {"PIN_INCORRECT", 77},       {"PIN_LOCKED", 77},
    {"TIMEOUT", 75},            {"KEY_MISMATCH", 70},        {"KEY_EXISTS", 73},
    {"SIGNING_FAILED", 70},
};
static const struct error_kind CONFIG_INVALID = {"CONFIG_INVALID", 64};
static const struct error_kind INPUT_INVALID = {"INPUT_INVALID", 65};
static const struct error_kind SIGNER_UNAVAILABLE = {"SIGNER_UNAVAILABLE", 69};
static const struct error_kind TIMEOUT = {"TIMEOUT", 75};
static const struct error_kind SIGNING_FAILED = {"SIGNING_FAILED", 70};

/* The one failure of this run: its name, exit code and message. */
static struct {
    char name[MAX_NAME + 1];
    int code;
    char message[MESSAGE_SIZE];
} failure;

/* Record the failure (the message as printf formats it, cut to the buffer); return -1. */
__attribute__((format(printf, 2, 3))) static int fail(struct error_kind kind,
                                                      const char *format, ...)
{
    va_list args;
    snprintf(failure.name, sizeof failure.name, "%s", kind.name);
    failure.code = kind.code;
    va_start(args, format);
    vsnprintf(failure.message, sizeof failure.message, format, args);
    va_end(args);
    return -1;
}

/* ---- time and signals ---------------------------------------------------------------- */

static int64_t clock_ns(clockid_t clock)
{
    struct timespec now;
    clock_gettime(clock, &now);
    return (int64_t)now.tv_sec * NS_PER_S + now.tv_nsec;
}

static int64_t monotonic_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* Catchable signals whose default ends the process, in the order of their numbers. */
static const int SIGNALS[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2,
                              SIGALRM, SIGTERM, SIGVTALRM, SIGPROF};
static const char *const SIGNAL_NAMES[] = {"SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                                           "SIGALRM", "SIGTERM", "SIGVTALRM", "SIGPROF"};

/* The signal noted first; the signals we took over (blocked but while waiting); the mask
 * while waiting (the one we were started with: a signal the caller blocked stays so). */
static volatile sig_atomic_t interrupted;
static sigset_t ours;
static sigset_t waiting;

static void note(int signum)
{
    if (!interrupted)
        interrupted = signum;
}

/* Note the terminating signals instead of dying of them; block them except in ppoll. */
static void take_over_signals(void)
{
    struct sigaction action;
    sigset_t original;
    memset(&action, 0, sizeof action);
    sigemptyset(&ours);
    sigprocmask(SIG_SETMASK, NULL, &original);
    waiting = original;
    for (size_t i = 0; i < COUNT(SIGNALS); i++)
        if (!sigismember(&original, SIGNALS[i]))
            sigaddset(&ours, SIGNALS[i]);
    sigprocmask(SIG_BLOCK, &ours, NULL);
    action.sa_handler = note;
    action.sa_mask = ours;
    for (size_t i = 0; i < COUNT(SIGNALS); i++)
        sigaction(SIGNALS[i], &action, NULL);
    /* As Python does: a reader that went away is EPIPE, a file size limit EFBIG. */
    action.sa_handler = SIG_IGN;
    sigemptyset(&action.sa_mask);
    sigaction(SIGPIPE, &action, NULL);
    sigaction(SIGXFSZ, &action, NULL);
}

/* Note a signal that arrived while blocked (outside a wait). */
static void note_pending(void)
{
    sigset_t pending;
    if (interrupted || sigpending(&pending) != 0)
        return;
    for (size_t i = 0; i < COUNT(SIGNALS); i++)
        if (sigismember(&ours, SIGNALS[i]) && sigismember(&pending, SIGNALS[i])) {
            interrupted = SIGNALS[i];
            return;
        }
}

/* The error for the signal noted: -1 with the failure set, or 0 when there is none. */
static int interruption(void)
{
    note_pending();
    for (size_t i = 0; i < COUNT(SIGNALS); i++)
        if (interrupted == SIGNALS[i])
            return fail(SIGNING_FAILED, "interrupted by %s; nothing was signed", SIGNAL_NAMES[i]);
    return 0;
}

/* Wait until fd has `events` (or an error or hang-up) before the monotonic deadline:
 * 1 when it has, 0 when the deadline came first. With `stop`, a noted signal ends the
 * wait: -1 and its failure. Signals are delivered (noted) only here. */
static int wait_for(int fd, short events, int64_t deadline, bool stop)
{
    for (;;) {
        if (stop && interruption() < 0)
            return -1;
        int64_t left = deadline - monotonic_ns();
        if (left <= 0)
            return 0;
        struct timespec wait = {.tv_sec = (time_t)(left / NS_PER_S),
                                .tv_nsec = (long)(left % NS_PER_S)};
        struct pollfd poller = {.fd = fd, .events = events, .revents = 0};
        int ready = ppoll(&poller, 1, &wait, &waiting);
        if (ready > 0 || (ready < 0 && errno != EINTR))
            return 1; /* ready, or a poll error the next read or write reports */
    }
}

/* ---- the process: lap_pkcs11/per_signature/process.py -------------------------------- */

/* Open the standard descriptors that are closed on /dev/null; return which were. */
static void open_standard_fds(bool closed[3])
{
    for (int fd = 0; fd < 3; fd++) {
        closed[fd] = fcntl(fd, F_GETFD) == -1 && errno == EBADF;
        if (!closed[fd])
            continue;
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0 && null != fd) {
            dup2(null, fd);
            close(null);
        }
    }
}

/* Close every inherited descriptor above stderr. */
static void close_inherited(void)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3U, ~0U, 0U) == 0)
        return;
#endif
    struct rlimit limit;
    int top = 1 << 20;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
        limit.rlim_cur < (rlim_t)top)
        top = (int)limit.rlim_cur;
    for (int fd = 3; fd < top; fd++)
        close(fd);
}

/* When this process began, on the monotonic clock: the caller's deadline runs from
 * before it started us (process.started_at: the kernel's start time, at most 60 s). */
static int64_t started_at(int64_t now)
{
    char stat[4096];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return now;
    ssize_t size;
    do
        size = read(fd, stat, sizeof stat - 1);
    while (size < 0 && errno == EINTR);
    close(fd);
    if (size <= 0)
        return now;
    stat[size] = '\0';
    char *field = strrchr(stat, ')');
    if (field == NULL)
        return now;
    field++;
    /* After the command's ")": state is field 3, starttime field 22. */
    for (int number = 3; number <= 22; number++) {
        while (*field == ' ')
            field++;
        if (number == 22)
            break;
        while (*field != ' ' && *field != '\0')
            field++;
    }
    char *end;
    errno = 0;
    unsigned long long ticks = strtoull(field, &end, 10);
    long hertz = sysconf(_SC_CLK_TCK);
    if (errno != 0 || end == field || hertz <= 0 || ticks > (unsigned long long)INT64_MAX / NS_PER_S)
        return now;
    int64_t age = clock_ns(CLOCK_BOOTTIME) - (int64_t)ticks * NS_PER_S / hertz;
    if (age < 0)
        age = 0;
    if (age > 60 * NS_PER_S)
        age = 60 * NS_PER_S;
    return now - age;
}

/* Write all of data to fd before the deadline (process.write_all): NULL, or why not.
 * A regular file written at its end that took part of it is cut back again. */
static const char *write_all(int fd, const unsigned char *data, size_t size, int64_t deadline)
{
    off_t start = -1;
    struct stat info;
    if (fstat(fd, &info) == 0 && S_ISREG(info.st_mode)) {
        int flags = fcntl(fd, F_GETFL);
        if (flags != -1) {
            if (flags & O_APPEND)
                start = info.st_size;
            else if (lseek(fd, 0, SEEK_CUR) == info.st_size)
                start = info.st_size;
        }
    }
    size_t done = 0;
    const char *why = NULL;
    while (done < size) {
        if (wait_for(fd, POLLOUT, deadline, false) == 0) {
            why = "nobody reads it";
            break;
        }
        ssize_t written = write(fd, data + done, size - done);
        if (written >= 0)
            done += (size_t)written;
        else if (errno != EINTR) {
            why = strerror(errno);
            break;
        }
    }
    if (why != NULL && start >= 0 && done > 0)
        (void)!ftruncate(fd, start);
    return why;
}

/* ---- text in lines ------------------------------------------------------------------- */

/* A path, option or user name as a line quotes it (client_command.shown): each byte outside
 * printable ASCII as "?", cut after MAX_SHOWN bytes with "...". */
static const char *shown(char out[MAX_SHOWN + 4], const char *text, size_t size)
{
    size_t i;
    for (i = 0; i < size && i < MAX_SHOWN; i++) {
        unsigned char byte = (unsigned char)text[i];
        out[i] = byte >= 0x20 && byte < 0x7f ? (char)byte : '?';
    }
    if (size > MAX_SHOWN)
        memcpy(out + i, "...", 3), i += 3;
    out[i] = '\0';
    return out;
}

/* Python's str.split() then " ".join() over ASCII, in place, with any byte outside
 * printable ASCII left as "?" (errors.SignerError.line). */
static void normalise(char *text)
{
    size_t out = 0;
    bool space = false;
    for (size_t i = 0; text[i] != '\0'; i++) {
        unsigned char byte = (unsigned char)text[i];
        if (byte == ' ' || (byte >= '\t' && byte <= '\r') || (byte >= 0x1c && byte <= 0x1f)) {
            space = out > 0;
            continue;
        }
        if (space)
            text[out++] = ' ';
        space = false;
        text[out++] = byte >= 0x20 && byte < 0x7f ? (char)byte : '?';
    }
    text[out] = '\0';
}

enum { ESC = 0x1b, BEL = 0x07, CSI = 0x5b, C1_CSI = 0x9b, C1_ST = 0x9c };

static bool string_introducer(unsigned char byte) { return byte != 0 && strchr("]PX^_", byte); }

static bool c1_string_introducer(unsigned char byte)
{
    return byte == 0x90 || byte == 0x98 || byte == 0x9d || byte == 0x9e || byte == 0x9f;
}

/* Whether an escape sequence starts at data[i]: ESC, or C2 and a C1 introducer. */
static bool introduces(const unsigned char *data, size_t size, size_t i)
{
    return data[i] == ESC || (data[i] == 0xc2 && i + 1 < size &&
                              (data[i + 1] == C1_CSI || c1_string_introducer(data[i + 1])));
}

/* The index after the escape sequence that starts at data[i] (client_command._skip_escape). */
static size_t skip_escape(const unsigned char *data, size_t size, size_t i)
{
    bool csi;
    if (data[i] == ESC) {
        i++;
        if (i >= size)
            return i;
        csi = data[i] == CSI;
        if (!csi && !string_introducer(data[i])) {
            while (i < size && data[i] >= 0x20 && data[i] <= 0x2f)
                i++; /* intermediates, then one final byte */
            return i + 1;
        }
        i++;
    } else {
        csi = data[i + 1] == C1_CSI;
        i += 2;
    }
    if (csi) {
        while (i < size && !(data[i] >= 0x40 && data[i] <= 0x7e))
            i++; /* parameters and intermediates */
        return i + 1;
    }
    while (i < size) { /* a control string: ends at BEL, ST (ESC \) or the 8-bit ST */
        if (data[i] == BEL)
            return i + 1;
        if (data[i] == ESC)
            return i + 1 < size && data[i + 1] == '\\' ? i + 2 : i;
        if (data[i] == 0xc2 && i + 1 < size && data[i + 1] == C1_ST)
            return i + 2;
        i++;
    }
    return i;
}

/* The signer's text as client_command.failure_of passes it on: printable() (escape sequences
 * removed, control characters as spaces, other bytes outside printable ASCII as "?"),
 * words joined by one space, cut to MAX_LINE characters with "...". */
static void printable(const unsigned char *data, size_t size, char out[MAX_LINE + 2])
{
    size_t length = 0;
    bool space = false;
    for (size_t i = 0; i < size && length <= MAX_LINE;) {
        char shown_as;
        if (introduces(data, size, i)) {
            i = skip_escape(data, size, i);
            continue;
        }
        if (data[i] >= 0x20 && data[i] < 0x7f)
            shown_as = (char)data[i];
        else if (data[i] < 0x20 || data[i] == 0x7f)
            shown_as = ' ';
        else if (data[i] == 0xc2 && i + 1 < size && data[i + 1] >= 0x80 && data[i + 1] <= 0x9f) {
            shown_as = ' '; /* a C1 control character */
            i++;
        } else
            shown_as = '?';
        i++;
        if (shown_as == ' ') {
            space = length > 0;
            continue;
        }
        if (space)
            out[length++] = ' ';
        space = false;
        if (length <= MAX_LINE)
            out[length++] = shown_as;
    }
    if (length > MAX_LINE)
        memcpy(out + MAX_LINE - 3, "...", 3), length = MAX_LINE;
    out[length] = '\0';
}

/* ---- encodings ----------------------------------------------------------------------- */

static int base64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* The length of what `text` decodes to when it is strict, canonical base64 (standard
 * alphabet, padded, unused bits zero: what binascii writes), else -1. */
static long canonical_base64(const unsigned char *text, size_t size)
{
    if (size % 4 != 0)
        return -1;
    if (size == 0)
        return 0;
    size_t pad = text[size - 1] != '=' ? 0 : text[size - 2] != '=' ? 1 : 2;
    for (size_t i = 0; i < size - pad; i++)
        if (base64_value(text[i]) < 0)
            return -1;
    if ((pad == 2 && (base64_value(text[size - 3]) & 0x0f)) ||
        (pad == 1 && (base64_value(text[size - 2]) & 0x03)))
        return -1;
    return (long)(size / 4 * 3 - pad);
}

/* Whether the body of an OK is one 64-byte signature exactly as sign prints it. */
static bool one_signature(const unsigned char *body, size_t size)
{
    if (size == 64)
        return true;
    if (size == 89 && body[88] == '\n')
        return canonical_base64(body, 88) == 64;
    if (size == 129 && body[128] == '\n') {
        for (size_t i = 0; i < 128; i++)
            if (!((body[i] >= '0' && body[i] <= '9') || (body[i] >= 'a' && body[i] <= 'f')))
                return false;
        return true;
    }
    return false;
}

/* ---- options: client_command.parse_args ---------------------------------------------- */

enum { SOCKET, TIMEOUT_MS, INPUT, EXPECT_PUBLIC_KEY, SERVER_USER, OPTION_COUNT };
static const char *const FLAGS[OPTION_COUNT] = {"--socket", "--timeout-ms", "--input",
                                                "--expect-public-key", "--server-user"};
static const char *const ENVS[OPTION_COUNT][3] = {
    {"LAP_PKCS11_SOCKET", NULL},
    {"LAP_PKCS11_CLIENT_TIMEOUT_MS", NULL},
    {"LAP_PKCS11_INPUT", NULL},
    {"LAP_PKCS11_EXPECT_PUBLIC_KEY", "LAP_GATEWAY_PUBLIC_KEY_HEX", NULL},
    {"LAP_PKCS11_SERVER_USER", NULL},
};

struct settings {
    const char *flags[OPTION_COUNT];
    const char *socket;
    int64_t deadline_ms;
    bool raw;
    const char *input_source;
    bool pinned;
    const char *server_user; /* trimmed into user */
    const char *server_user_source;
    char user[MAX_USER + 1];
};

static const char *nonempty_env(const char *name)
{
    const char *value = getenv(name);
    return value != NULL && value[0] != '\0' ? value : NULL;
}

/* An option's text and where it came from: its flag (even empty), then the first of its
 * variables that is set and not empty; NULL when unset. */
static const char *lookup(const struct settings *settings, int option, const char **source)
{
    *source = "default";
    if (settings->flags[option] != NULL) {
        *source = FLAGS[option];
        return settings->flags[option];
    }
    for (size_t i = 0; ENVS[option][i] != NULL; i++) {
        const char *value = nonempty_env(ENVS[option][i]);
        if (value != NULL) {
            *source = ENVS[option][i];
            return value;
        }
    }
    return NULL;
}

/* The text with spaces and tabs trimmed from both ends: its start, and its size. */
static const char *trim_blanks(const char *text, size_t *size)
{
    size_t end = strlen(text);
    while (*text == ' ' || *text == '\t')
        text++, end--;
    while (end > 0 && (text[end - 1] == ' ' || text[end - 1] == '\t'))
        end--;
    *size = end;
    return text;
}

static bool all_digits(const char *text, size_t size)
{
    if (size == 0)
        return false;
    for (size_t i = 0; i < size; i++)
        if (text[i] < '0' || text[i] > '9')
            return false;
    return true;
}

/* The value of `size` decimal digits that are at most `max_significant` long (leading
 * zeros aside): -1 when it has more. */
static int64_t small_number(const char *digits, size_t size, size_t max_significant)
{
    while (size > 0 && *digits == '0')
        digits++, size--;
    if (size > max_significant)
        return -1;
    int64_t value = 0;
    for (size_t i = 0; i < size; i++)
        value = value * 10 + (digits[i] - '0');
    return value;
}

static const char TIMEOUT_RANGE[] = "must be a whole number of milliseconds from 1 to 600000";
static const char SECONDS_FORM[] = "must be a number of seconds such as 2 or 1.5";
static const char SECONDS_RANGE[] = "must be more than 0 and less than 86400 seconds";

/* options._timeout_ms: NULL and *ms, or the reason. */
static const char *timeout_ms(const char *value, int64_t *ms)
{
    size_t size;
    const char *text = trim_blanks(value, &size);
    if (!all_digits(text, size))
        return TIMEOUT_RANGE;
    *ms = small_number(text, size, 6);
    return *ms < 1 || *ms > 600000 ? TIMEOUT_RANGE : NULL;
}

/* options._seconds_as_ms: seconds as written (2, 1.5, .25) to whole ms. */
static const char *seconds_as_ms(const char *value, int64_t *ms)
{
    size_t size;
    const char *text = trim_blanks(value, &size);
    const char *dot = memchr(text, '.', size);
    size_t whole = dot != NULL ? (size_t)(dot - text) : size;
    const char *fraction = dot != NULL ? dot + 1 : text + size;
    size_t fraction_size = dot != NULL ? size - whole - 1 : 0;
    if ((whole == 0 && fraction_size == 0) || (whole > 0 && !all_digits(text, whole)) ||
        (fraction_size > 0 && !all_digits(fraction, fraction_size)))
        return SECONDS_FORM;
    int64_t seconds = small_number(text, whole, 5);
    if (seconds < 0)
        return SECONDS_RANGE;
    int64_t millis = 0;
    for (size_t i = 0; i < 3; i++)
        millis = millis * 10 + (i < fraction_size ? fraction[i] - '0' : 0);
    *ms = seconds * 1000 + millis;
    return *ms > 0 && *ms < 86400000 ? NULL : SECONDS_RANGE;
}

static bool equals_lowered(const char *text, size_t size, const char *word)
{
    if (size != strlen(word))
        return false;
    for (size_t i = 0; i < size; i++) {
        char c = text[i];
        if ((c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c) != word[i])
            return false;
    }
    return true;
}

/* The length of the UTF-8 sequence at text[i] when it is valid (Unicode's table 3-7,
 * as Python decodes), else 0; *code gets its code point. */
static size_t utf8_sequence(const unsigned char *text, size_t size, size_t i, uint32_t *code)
{
    unsigned char lead = text[i];
    size_t length;
    unsigned char low = 0x80, high = 0xbf;
    if (lead < 0x80) {
        *code = lead;
        return 1;
    }
    if (lead >= 0xc2 && lead <= 0xdf)
        length = 2, *code = lead & 0x1fu;
    else if (lead >= 0xe0 && lead <= 0xef) {
        length = 3, *code = lead & 0x0fu;
        if (lead == 0xe0)
            low = 0xa0;
        if (lead == 0xed)
            high = 0x9f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
        length = 4, *code = lead & 0x07u;
        if (lead == 0xf0)
            low = 0x90;
        if (lead == 0xf4)
            high = 0x8f;
    } else
        return 0;
    if (i + length > size)
        return 0;
    for (size_t k = 1; k < length; k++) {
        unsigned char byte = text[i + k];
        if (byte < (k == 1 ? low : 0x80) || byte > (k == 1 ? high : 0xbf))
            return 0;
        *code = (*code << 6) | (byte & 0x3fu);
    }
    return length;
}

/* Python's str.isspace(), 3.11. */
static bool unicode_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* The gateway's test of SIGNER_MODE: value.strip().lower() in ("external", "cmd",
 * "command"), with Python's (Unicode) strip. */
static bool external_mode(const char *value)
{
    const unsigned char *text = (const unsigned char *)value;
    size_t size = strlen(value), start = size, end = 0;
    for (size_t i = 0; i < size;) {
        uint32_t code = 0;
        size_t length = utf8_sequence(text, size, i, &code);
        bool space = length > 0 && unicode_space(code);
        if (length == 0)
            length = 1;
        if (!space) {
            if (start == size)
                start = i;
            end = i + length;
        }
        i += length;
    }
    if (start >= end)
        return false;
    return equals_lowered(value + start, end - start, "external") ||
           equals_lowered(value + start, end - start, "cmd") ||
           equals_lowered(value + start, end - start, "command");
}

/* config.check_gateway_input: the gateway's base64 must not be read as raw bytes. */
static int check_gateway_input(const struct settings *settings)
{
    static const char *const markers[] = {"LAP_GATEWAY_SIGNING_CMD", "LAP_GATEWAY_KEYSET_JSON",
                                          "LAP_GATEWAY_KEYSET_FILE"};
    if (strcmp(settings->input_source, "default") != 0)
        return 0;
    const char *mode = getenv("SIGNER_MODE");
    bool gateway = mode != NULL && external_mode(mode);
    for (size_t i = 0; i < COUNT(markers) && !gateway; i++)
        gateway = nonempty_env(markers[i]) != NULL;
    if (gateway)
        return fail(CONFIG_INVALID,
                    "started by the LAP gateway, which sends base64(message), but --input is not "
                    "set; add --input base64 to SIGNER_CMD (or set --input raw explicitly)");
    return 0;
}

static int parse_args(int argc, char **argv, struct settings *settings)
{
    char quoted[MAX_SHOWN + 4];
    memset(settings, 0, sizeof *settings);
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *equals = strchr(arg, '=');
        size_t name_size = equals != NULL ? (size_t)(equals - arg) : strlen(arg);
        int option = -1;
        for (int k = 0; k < OPTION_COUNT; k++)
            if (strlen(FLAGS[k]) == name_size && memcmp(FLAGS[k], arg, name_size) == 0)
                option = k;
        if (option < 0)
            return fail(CONFIG_INVALID, "unknown option '%s'; see lap-pkcs11 client --help",
                        shown(quoted, arg, name_size));
        const char *value;
        if (equals != NULL)
            value = equals + 1;
        else {
            if (i + 1 >= argc)
                return fail(CONFIG_INVALID, "%s needs a value", FLAGS[option]);
            value = argv[++i];
        }
        if (settings->flags[option] != NULL)
            return fail(CONFIG_INVALID, "%s is given twice; keep one", FLAGS[option]);
        settings->flags[option] = value;
    }

    const char *source;
    const char *text = lookup(settings, SOCKET, &source);
    settings->socket = text != NULL && text[0] != '\0' ? text : DEFAULT_SOCKET;

    text = lookup(settings, TIMEOUT_MS, &source);
    if (text == NULL || text[0] == '\0')
        text = DEFAULT_TIMEOUT_MS;
    const char *caller_name = nonempty_env("SIGNER_TIMEOUT_SECONDS") ? "SIGNER_TIMEOUT_SECONDS"
                              : nonempty_env("LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS")
                                  ? "LAP_GATEWAY_SIGNING_CMD_TIMEOUT_SECONDS"
                                  : "SIGNER_TIMEOUT_SECONDS";
    const char *why = timeout_ms(text, &settings->deadline_ms);
    const char *caller = nonempty_env(caller_name);
    if (why == NULL && caller != NULL) {
        int64_t caller_ms = 0;
        why = seconds_as_ms(caller, &caller_ms);
        if (why == NULL && caller_ms - CALLER_MARGIN_MS < settings->deadline_ms)
            settings->deadline_ms = caller_ms - CALLER_MARGIN_MS;
    }
    if (why != NULL)
        return fail(CONFIG_INVALID, "--timeout-ms or %s %s", caller_name, why);
    if (settings->deadline_ms < MIN_DEADLINE_MS)
        return fail(CONFIG_INVALID, "%s leaves no time for the signer; give the gateway's "
                                    "signer a longer timeout", caller_name);

    size_t size;
    text = lookup(settings, INPUT, &settings->input_source);
    settings->raw = true;
    if (text != NULL) {
        const char *input = trim_blanks(text, &size);
        if (equals_lowered(input, size, "base64"))
            settings->raw = false;
        else if (!equals_lowered(input, size, "raw"))
            return fail(CONFIG_INVALID, "%s must be one of raw, base64", settings->input_source);
    }
    text = lookup(settings, EXPECT_PUBLIC_KEY, &source);
    if (text != NULL) {
        const char *key = trim_blanks(text, &size);
        bool hex = size == 64;
        for (size_t i = 0; i < size && hex; i++)
            hex = (key[i] >= '0' && key[i] <= '9') || (key[i] >= 'a' && key[i] <= 'f') ||
                  (key[i] >= 'A' && key[i] <= 'F');
        if (!hex)
            return fail(CONFIG_INVALID,
                        "%s must be 64 hex characters (a 32-byte Ed25519 public key)", source);
        settings->pinned = true;
        if (check_gateway_input(settings) < 0)
            return -1;
    }
    text = lookup(settings, SERVER_USER, &settings->server_user_source);
    if (text != NULL) {
        const char *user = trim_blanks(text, &size);
        bool valid = size > 0 && size <= MAX_USER && user[0] != '-';
        for (size_t i = 0; i < size && valid; i++)
            valid = (user[i] >= 'A' && user[i] <= 'Z') || (user[i] >= 'a' && user[i] <= 'z') ||
                    (user[i] >= '0' && user[i] <= '9') || strchr("._-", user[i]) != NULL;
        if (!valid)
            return fail(CONFIG_INVALID, "%s must be a user name or a uid, e.g. lap-pkcs11 or 998",
                        settings->server_user_source);
        memcpy(settings->user, user, size);
        settings->user[size] = '\0';
        settings->server_user = settings->user;
    }
    return 0;
}

/* ---- the exchange: client_command.exchange ------------------------------------------- */

/* Refuse a socket served by anyone but root, this user or --server-user (SO_PEERCRED):
 * client_command.check_server. The name is resolved only when it is needed. */
static int check_server(int fd, const char *where, const struct settings *settings)
{
    struct ucred peer;
    socklen_t size = sizeof peer;
    char quoted[MAX_SHOWN + 4];
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0)
        return fail(SIGNER_UNAVAILABLE, "the connection to the signer at %s failed (%s)", where,
                    strerror(errno));
    uid_t euid = geteuid();
    if (peer.uid == 0 || peer.uid == euid)
        return 0;
    const char *user = settings->server_user;
    if (user != NULL) {
        size_t length = strlen(user);
        if (all_digits(user, length)) {
            int64_t uid = small_number(user, length, 10);
            if (uid == (int64_t)peer.uid)
                return 0;
        } else {
            struct passwd *entry = getpwnam(user);
            if (entry == NULL)
                return fail(CONFIG_INVALID, "%s: there is no user %s on this host; name the "
                                            "agent's user (or its uid)",
                            settings->server_user_source, shown(quoted, user, length));
            if (entry->pw_uid == peer.uid)
                return 0;
        }
    }
    char allowed[MAX_SHOWN + 32];
    if (user != NULL)
        snprintf(allowed, sizeof allowed, "--server-user %s", shown(quoted, user, strlen(user)));
    else
        snprintf(allowed, sizeof allowed, "a --server-user");
    return fail(SIGNER_UNAVAILABLE,
                "the signer socket %s is served by uid %u (pid %d), not by root, this user (uid "
                "%u) or %s; another user's process may listen there: stop it, or set "
                "--server-user (LAP_PKCS11_SERVER_USER) to the agent's user",
                where, (unsigned)peer.uid, (int)peer.pid, (unsigned)euid, allowed);
}

/* An errno of the exchange as Python's exception classes sort it (client_command.exchange). */
static int exchange_error(int error, const char *where, size_t received)
{
    if (error == ETIMEDOUT)
        return fail(SIGNER_UNAVAILABLE, "the signer at %s did not answer in time", where);
    if (error == ECONNRESET) {
        if (received == 0)
            return fail(SIGNER_UNAVAILABLE, "the signer at %s reset the connection", where);
        return 1; /* it answered first: its answer is read as any other */
    }
    return fail(SIGNER_UNAVAILABLE, "the connection to the signer at %s failed (%s)", where,
                strerror(error));
}

/* Connect, check the server, send the request, read the answer (up to MAX_RESPONSE + 1
 * bytes) into response; 0 and *received, or -1 and the failure. */
static int talk(int fd, const char *path, const char *where, const struct settings *settings,
                const unsigned char *request, size_t size, int64_t deadline,
                unsigned char *response, size_t *received)
{
    struct sockaddr_un address;
    size_t length = strlen(path);
    int64_t now = monotonic_ns();
    int64_t send_deadline = now + (deadline - now > NS_PER_MS ? deadline - now : NS_PER_MS);
    memset(&address, 0, sizeof address);
    address.sun_family = AF_UNIX;
    if (length >= sizeof address.sun_path)
        return fail(SIGNER_UNAVAILABLE, "the signer socket %s refused the connection (AF_UNIX path "
                                        "too long); check the socket unit and its group", where);
    memcpy(address.sun_path, path, length);
    socklen_t address_size = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + length);
    /* Not retried: the terminating signals are blocked here, and a unix socket connects
     * at once or fails (EAGAIN when its backlog is full, as Python reports it too). */
    if (connect(fd, (struct sockaddr *)&address, address_size) != 0) {
        if (errno == ENOENT)
            return fail(SIGNER_UNAVAILABLE, "no signer socket at %s; is "
                                            "lap-pkcs11-signer.socket running?", where);
        return fail(SIGNER_UNAVAILABLE, "the signer socket %s refused the connection (%s); check "
                                        "the socket unit and its group", where, strerror(errno));
    }
    if (check_server(fd, where, settings) < 0)
        return -1;
    for (size_t sent = 0; sent < size;) {
        ssize_t count = send(fd, request + sent, size - sent, MSG_NOSIGNAL);
        if (count >= 0) {
            sent += (size_t)count;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (wait_for(fd, POLLOUT, send_deadline, false) == 0)
                return exchange_error(ETIMEDOUT, where, 0);
        } else if (errno != EINTR) {
            return exchange_error(errno, where, 0); /* nothing received: -1 */
        }
    }
    if (shutdown(fd, SHUT_WR) != 0)
        return exchange_error(errno, where, 0);
    while (*received <= MAX_RESPONSE) {
        /* Waits here, where a signal wakes it (a noted signal is its error). */
        int ready = wait_for(fd, POLLIN, deadline, true);
        if (ready < 0)
            return -1;
        if (ready == 0)
            return exchange_error(ETIMEDOUT, where, *received);
        ssize_t count = recv(fd, response + *received, MAX_RESPONSE + 1 - *received, 0);
        if (count > 0)
            *received += (size_t)count;
        else if (count == 0)
            break;
        else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
            int outcome = exchange_error(errno, where, *received);
            if (outcome < 0)
                return -1;
            break;
        }
    }
    return 0;
}

static int exchange(const char *path, const struct settings *settings,
                    const unsigned char *request, size_t size, int64_t deadline,
                    unsigned char *response, size_t *received)
{
    char where[MAX_SHOWN + 4];
    shown(where, path, strlen(path));
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return fail(SIGNER_UNAVAILABLE, "the signer socket %s refused the connection (%s); check "
                                        "the socket unit and its group", where, strerror(errno));
    *received = 0;
    int result = talk(fd, path, where, settings, request, size, deadline, response, received);
    close(fd);
    return result;
}

/* ---- the answer: client_command.check_answer ----------------------------------------- */

static bool digits_only(const unsigned char *text, size_t size)
{
    for (size_t i = 0; i < size; i++)
        if (text[i] < '0' || text[i] > '9')
            return false;
    return size > 0;
}

/* wire.parse_response: 0 with *code, name and *body, or -1 when it is not exactly
 * `LAP1 <code> <NAME>\n` as serve and the agent write it. */
static int parse_response(const unsigned char *data, size_t size, int *code,
                          char name[MAX_NAME + 1], size_t *body)
{
    const unsigned char *newline = memchr(data, '\n', size);
    if (newline == NULL)
        return -1;
    size_t line = (size_t)(newline - data);
    const unsigned char *first = memchr(data, ' ', line);
    if (first == NULL || first - data != 4 || memcmp(data, "LAP1", 4) != 0)
        return -1;
    const unsigned char *number = first + 1;
    const unsigned char *second = memchr(number, ' ', (size_t)(newline - number));
    if (second == NULL)
        return -1;
    size_t number_size = (size_t)(second - number);
    const unsigned char *word = second + 1;
    size_t word_size = (size_t)(newline - word);
    if (memchr(word, ' ', word_size) != NULL)
        return -1;
    if (!digits_only(number, number_size) || number_size > 3 ||
        (number_size > 1 && number[0] == '0'))
        return -1;
    if (word_size == 0 || word_size > MAX_NAME || word[0] < 'A' || word[0] > 'Z')
        return -1;
    for (size_t i = 0; i < word_size; i++)
        if (!((word[i] >= 'A' && word[i] <= 'Z') || (word[i] >= '0' && word[i] <= '9') ||
              word[i] == '_'))
            return -1;
    *code = 0;
    for (size_t i = 0; i < number_size; i++)
        *code = *code * 10 + (number[i] - '0');
    memcpy(name, word, word_size);
    name[word_size] = '\0';
    *body = line + 1;
    return 0;
}

/* client_command.failure_of: the error the signer answered, with its own line only when that
 * line is its name's. */
static int failure_of(int code, const char *name, const unsigned char *body, size_t size)
{
    const struct error_kind *known = NULL;
    for (size_t i = 0; i < COUNT(ERRORS); i++)
        if (strcmp(ERRORS[i].name, name) == 0)
            known = &ERRORS[i];
    if (known == NULL || known->code != code)
        return fail(SIGNER_UNAVAILABLE, "the signer answered an unknown error %s (exit %d); check "
                                        "that both ends run one version", name, code);
    char prefix[MAX_NAME + 32];
    int prefix_size = snprintf(prefix, sizeof prefix, "%s: %s: ", PROGRAM, name);
    const unsigned char *newline = memchr(body, '\n', size);
    size_t line = newline != NULL ? (size_t)(newline - body) : size;
    char text[MAX_LINE + 2] = "";
    if (prefix_size > 0 && line >= (size_t)prefix_size && memcmp(body, prefix, (size_t)prefix_size) == 0)
        printable(body + prefix_size, line - (size_t)prefix_size, text);
    if (text[0] != '\0')
        return fail(*known, "%s", text);
    return fail(*known, "the signer answered %s with no message of its own; see the signer's "
                        "journal (journalctl -u 'lap-pkcs11-signer@*')", name);
}

/* What to print for the signer's response: 0 and the body's place, or -1 and why not. */
static int check_answer(const unsigned char *response, size_t size, size_t *body)
{
    int code;
    char name[MAX_NAME + 1];
    if (parse_response(response, size, &code, name, body) < 0)
        return fail(SIGNER_UNAVAILABLE, "the signer's answer is not lap-pkcs11 framing; check "
                                        "that the socket runs lap-pkcs11 serve");
    if (code != 0 || strcmp(name, "OK") != 0)
        return failure_of(code, name, response + *body, size - *body);
    if (!one_signature(response + *body, size - *body))
        return fail(SIGNER_UNAVAILABLE, "the signer answered OK with %zu bytes that are not one "
                                        "64-byte signature as sign prints it (base64 or hex and a "
                                        "newline, or raw); nothing was printed", size - *body);
    /* A pinned key is the agent's to check: it verifies every signature before it answers. */
    return 0;
}

/* ---- the run ------------------------------------------------------------------------- */

/* The request: room for its header, then stdin; the response. Static: nothing is
 * allocated, and the limits are the buffers. */
static unsigned char request[HEADER_ROOM + MAX_BODY + 1];
static unsigned char response[MAX_RESPONSE + 1];

/* process.read_stdin: up to limit + 1 bytes of stdin before the deadline. */
static int read_stdin(unsigned char *into, size_t limit, int64_t deadline, size_t *size)
{
    *size = 0;
    while (*size <= limit) {
        int ready = wait_for(0, POLLIN, deadline, true);
        if (ready < 0)
            return -1;
        if (ready == 0)
            return fail(TIMEOUT, "stdin did not end before the deadline; the caller must write "
                                 "the whole message and close stdin");
        ssize_t count = read(0, into + *size, limit + 1 - *size);
        if (count > 0)
            *size += (size_t)count;
        else if (count == 0)
            break;
        else if (errno != EINTR)
            return fail(INPUT_INVALID, "stdin cannot be read (%s)", strerror(errno));
    }
    return 0;
}

/* Ask the signer: 0 with what to print, or the exit code with the failure set. */
static int run(int argc, char **argv, int64_t started, const unsigned char **out, size_t *out_size)
{
    struct settings settings;
    if (argc >= 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        *out = (const unsigned char *)USAGE;
        *out_size = sizeof USAGE - 1;
        return 0;
    }
    if (parse_args(argc, argv, &settings) < 0)
        return failure.code;
    int64_t deadline = started + settings.deadline_ms * NS_PER_MS;
    unsigned char *payload = request + HEADER_ROOM;
    size_t payload_size;
    if (read_stdin(payload, MAX_BODY, deadline, &payload_size) < 0)
        return failure.code;
    if (settings.pinned && !settings.raw) {
        /* As the Python client decodes it to check the signature (process.decode_base64). */
        static const char whitespace[] = " \t\r\n\v\f";
        size_t start = 0, end = payload_size;
        while (start < end && payload[start] != '\0' && strchr(whitespace, payload[start]))
            start++;
        while (end > start && payload[end - 1] != '\0' && strchr(whitespace, payload[end - 1]))
            end--;
        if (canonical_base64(payload + start, end - start) < 0) {
            fail(INPUT_INVALID, "stdin is not strict base64 (standard alphabet, padded); with "
                                "--input base64 send base64(message) and a newline");
            return failure.code;
        }
    }
    int64_t server_ms = settings.deadline_ms - SERVER_MARGIN_MS -
                        (monotonic_ns() - started) / NS_PER_MS;
    char header[HEADER_ROOM];
    int header_size = snprintf(header, sizeof header, "LAP1 %lld\n",
                               (long long)(server_ms > 1 ? server_ms : 1));
    if (header_size <= 0 || header_size >= HEADER_ROOM) {
        fail(SIGNING_FAILED, "internal error (header); report it");
        return failure.code;
    }
    unsigned char *framed = payload - header_size;
    memcpy(framed, header, (size_t)header_size);
    size_t received = 0, body = 0;
    if (exchange(settings.socket, &settings, framed, (size_t)header_size + payload_size,
                 deadline, response, &received) < 0)
        return failure.code;
    if (check_answer(response, received, &body) < 0)
        return failure.code;
    if (interruption() < 0) /* a signal noted until now still stops the answer */
        return failure.code;
    *out = response + body;
    *out_size = received - body;
    return 0;
}

static void write_line(void)
{
    char line[MAX_NAME + MESSAGE_SIZE + 16];
    normalise(failure.message);
    int size = snprintf(line, sizeof line, "%s: %s: %s\n", PROGRAM, failure.name,
                        failure.message);
    if (size > 0)
        write_all(2, (const unsigned char *)line, strlen(line),
                  monotonic_ns() + OUTPUT_WAIT_NS);
}

int main(int argc, char **argv)
{
    int64_t entered = monotonic_ns();
    bool closed[3];
    take_over_signals();
    open_standard_fds(closed);
    close_inherited();
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    int64_t began = started_at(entered);
    int64_t started = began < entered ? began : entered;
    if (closed[1]) {
        fail(SIGNING_FAILED, "stdout is closed; there is nowhere to print the signature, so "
                             "nothing was asked of the signer");
        write_line();
        return failure.code;
    }
    const unsigned char *out = NULL;
    size_t out_size = 0;
    int code = run(argc, argv, started, &out, &out_size);
    if (code == 0 && out_size > 0) {
        const char *why = write_all(1, out, out_size, monotonic_ns() + OUTPUT_WAIT_NS);
        if (why != NULL) {
            fail(SIGNING_FAILED, "stdout cannot be written (%s)", why);
            code = failure.code;
        }
    }
    if (code != 0)
        write_line();
    return code;
}
