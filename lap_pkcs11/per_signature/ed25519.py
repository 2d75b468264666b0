"""Ed25519 signature verification (RFC 8032, section 5.1.7), in pure Python.

The signer checks every signature against the pinned public key before it lets
it out. Importing ``cryptography`` costs more than the whole check on the
per-signature path, so the check is done here, with the RFC's reference
arithmetic on public data only (no secret, so no timing concern). The test
suite checks it against ``cryptography`` on random keys, messages and tampered
signatures.
"""

try:
    from _sha512 import sha512
except ImportError:  # Python 3.12 renamed the built-in module.
    from hashlib import sha512

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
# RFC 8032 Table 1 constants as literals (deriving them costs a millisecond at
# every start); a unit test derives them again and compares.
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _decompress(data):
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


_GX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_GY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _double_mul(s, p, t, q):
    """[s]p + [t]q with one shared chain of doublings (Straus)."""
    pq = _add(p, q)
    acc = (0, 1, 1, 0)
    for bit in range(max(s.bit_length(), t.bit_length()) - 1, -1, -1):
        acc = _add(acc, acc)
        pick = ((s >> bit) & 1) | (((t >> bit) & 1) << 1)
        if pick:
            acc = _add(acc, (p, q, pq)[pick - 1])
    return acc


def is_valid(public_key, message, signature):
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decompress(public_key)
    r = _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    k = int.from_bytes(sha512(signature[:32] + public_key + message).digest(), "little") % _L
    # [s]B == R + [k]A  <=>  [s]B + [k](-A) == R
    neg_a = (_P - a[0], a[1], a[2], _P - a[3])
    check = _double_mul(s, _G, k, neg_a)
    return (check[0] * r[2] - r[0] * check[2]) % _P == 0 and (
        check[1] * r[2] - r[1] * check[2]) % _P == 0
