"""``lap-pkcs11 agent``: one logged-in PKCS#11 session that signs over a unix socket.

The rooms of the agent, each with its own rule about what it may import:

- ``lap_pkcs11.backends.pkcs11_session`` (its backend, outside this folder): the
  one owner of the PKCS#11 module (PyKCS11) and of the pinned key
  (cryptography): login, signing, verification and recovery. Nothing else
  touches the binding.
- ``server``: the accept loop, the worker pool, deadlines, limits and peer
  credentials; ``protocol`` what is read and written on a connection;
  ``metrics`` the Prometheus text; ``systemd`` sd_notify and socket activation.
- ``cli``: ``lap-pkcs11 agent`` and ``lap-pkcs11 agent-status``, the only code
  here that prints for people or picks an exit code.

Importing this package imports nothing; PyKCS11 and cryptography are loaded by
the session backend only, and only the long-running agent pays for them
(``pip install 'lap-pkcs11[agent]'``).
"""
