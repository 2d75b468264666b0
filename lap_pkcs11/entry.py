"""The ``lap-pkcs11`` console script: a dispatcher that keeps ``sign`` lean.

``sign``, ``client`` and ``serve`` run once per gateway signature, so they are
routed to their stdlib-only modules before anything heavy is imported; every
other command goes to the typer application in ``lap_pkcs11.admin.cli``.

Those three end with ``os._exit`` once their answer is out: the interpreter's
own finalisation (freeing every object and module) measured about 2 ms here,
on every signature, and there is nothing left for it to do (see ``ended``).
"""

import os
import sys
import time


def main():
    started = time.monotonic()
    args = sys.argv[1:]
    if args[:1] == ["sign"]:
        from lap_pkcs11.per_signature.sign_command import main as sign_main

        return ended(sign_main(args[1:], started))
    if args[:1] == ["client"]:
        from lap_pkcs11.per_signature.client_command import main as client_main

        return ended(client_main(args[1:], started))
    if args[:1] == ["serve"]:
        from lap_pkcs11.per_signature.serve_command import main as serve_main

        return ended(serve_main(args[1:], started))
    if args[:1] in (["agent"], ["agent-status"]):
        from lap_pkcs11.agent.cli import main as agent_main

        return agent_main(args, started)
    from lap_pkcs11.admin.cli import run

    return run()


def ended(code):
    """End a per-signature command now, with ``code``, without finalising the interpreter.

    Its answer went out through ``os.write`` before ``main`` returned, pkcs11-tool
    and the watchdog were reaped (a watchdog left to its kill time outlives us
    either way), and it registers nothing to run at exit: the kernel closes what
    is left, which also releases the token lock. Python's stderr is flushed first;
    its stdout buffer is not, since stdout holds the answer alone. So nothing runs
    at exit here: a profiler or a coverage hook started from ``sitecustomize``
    writes no results for these commands.
    """
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    os._exit(code)
