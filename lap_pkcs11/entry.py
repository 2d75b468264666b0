"""The ``lap-pkcs11`` console script: a dispatcher that keeps ``sign`` lean.

``sign`` runs once per gateway signature, so it is routed to its stdlib-only
module before anything heavy is imported; every other command goes to the typer
application in ``lap_pkcs11.cli``.
"""

import sys
import time


def main():
    started = time.monotonic()
    args = sys.argv[1:]
    if args[:1] == ["sign"]:
        from lap_pkcs11.sign_cli import main as sign_main

        return sign_main(args[1:], started)
    from lap_pkcs11.cli import run

    return run()
