"""The ``lap-pkcs11`` console script: a dispatcher that keeps ``sign`` lean.

``sign``, ``client`` and ``serve`` run once per gateway signature, so they are
routed to their stdlib-only modules before anything heavy is imported; every
other command goes to the typer application in ``lap_pkcs11.admin.cli``.
"""

import sys
import time


def main():
    started = time.monotonic()
    args = sys.argv[1:]
    if args[:1] == ["sign"]:
        from lap_pkcs11.per_signature.sign_command import main as sign_main

        return sign_main(args[1:], started)
    if args[:1] == ["client"]:
        from lap_pkcs11.per_signature.client_command import main as client_main

        return client_main(args[1:], started)
    if args[:1] == ["serve"]:
        from lap_pkcs11.per_signature.serve_command import main as serve_main

        return serve_main(args[1:], started)
    if args[:1] in (["agent"], ["agent-status"]):
        from lap_pkcs11.agent.cli import main as agent_main

        return agent_main(args, started)
    from lap_pkcs11.admin.cli import run

    return run()
