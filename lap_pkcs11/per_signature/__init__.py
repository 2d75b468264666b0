"""The per-signature path: what runs once for every signature the gateway asks for.

``sign_command`` (``lap-pkcs11 sign``), ``client_command`` (``lap-pkcs11 client``)
and ``serve_command`` (``lap-pkcs11 serve``) are started afresh for each signature,
so they and everything they import (the modules of this folder and the one-shot
backend, ``lap_pkcs11.backends.pkcs11_tool``) import only what Python has built
in: no typer, no pydantic, no third-party module. tests/test_layout.py walks their
import graph and fails otherwise.

- ``signer``: one signature over pkcs11-tool (PIN, token lock, PIN guard, key id).
- ``config``, ``options``, ``envfile``, ``uri``: the one option table, the one
  env-file grammar, RFC 7512 URIs, resolved into one ``Config``; the operator
  commands resolve through the same code.
- ``process``: the hardening of a per-signature process and its standard streams;
  ``files``: private files and directories; ``wire``: the client/serve framing;
  ``errors``: the stable error names and exit codes of every command;
  ``ed25519``: the pinned-key check.

Importing this package imports nothing.
"""
