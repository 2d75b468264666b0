"""The operator commands: ``lap-pkcs11 config``, ``pubkey``, ``keys``, ``keygen``,
``doctor``, ``install-units``, ``install-client`` and the rest (``cli``, typer).

They run rarely and for people, so they may import typer and pydantic-settings
(``settings``); they resolve options through the per-signature code
(``lap_pkcs11.per_signature.config``) and reach the token through the one-shot
backend (``token_inspection`` over ``lap_pkcs11.backends.pkcs11_tool``).

Importing this package imports nothing.
"""
