"""lap-pkcs11: the hard-key Ed25519 signer for the LAP gateway, over OpenSC's pkcs11-tool."""

__version__ = "0.1.0"
