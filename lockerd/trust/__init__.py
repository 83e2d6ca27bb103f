"""Trust layer: DSSE envelopes, the keyring, codes bundles and code digests."""
