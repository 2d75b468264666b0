"""The two ways lap-pkcs11 reaches a token.

- ``pkcs11_tool``: the one-shot backend, the one place that runs OpenSC's
  pkcs11-tool (a login per signature; messages up to 1024 bytes). On the
  per-signature path: it imports only what Python has built in.
- ``pkcs11_session``: the long-running backend of ``lap-pkcs11 agent``, one
  logged-in PKCS#11 session through PyKCS11, with recovery (any message size).

Importing this package imports nothing.
"""
