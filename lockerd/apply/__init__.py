"""Big code applies verified, decoded and staged in a child process, off the daemon's GIL."""
