"""Test support for tpmid and for other projects' CI: simulated TPMs and a counting proxy.

* :mod:`tpmid.testing.swtpm` — manufacture (EK certificates from a local CA) and
  run simulated TPMs, power-cycle them through the control channel;
* :mod:`tpmid.testing.tpmproxy` — a TCP proxy in front of swtpm that counts (and
  can delay) TPM commands.

These modules import only the standard library when loaded, so importing them
costs nothing in a test run that does not use them. They are not device code:
the Debian package for devices leaves this package out. Benchmarks are not
here either; they live in the checkout's ``tests/bench``.
"""
