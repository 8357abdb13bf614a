"""Test support for tpmid and for other projects' CI (docs/testing.md).

* :mod:`tpmid.testing.plugin` — the pytest plugin (entry point ``pytest11``
  ``tpmid``): fixtures for simulated TPMs, the reference EST server and the
  counting proxy;
* :mod:`tpmid.testing.swtpm` — manufacture (EK certificates from a local CA) and
  run simulated TPMs, power-cycle them through the control channel;
* :mod:`tpmid.testing.tpmproxy` — a TCP proxy in front of swtpm that counts (and
  can delay) TPM commands;
* :mod:`tpmid.testing.estserver` — the reference EST server started for a test,
  and a device config that enrolls against it.

The package, the plugin, ``swtpm`` and ``tpmproxy`` import only the standard
library (and pytest) when loaded, so loading them costs nothing in a test run that
does not use them; ``estserver`` imports the reference server. They are not device
code: the Debian package for devices leaves this package out. Benchmarks are not
here either; they live in the checkout's ``tests/bench``.
"""
