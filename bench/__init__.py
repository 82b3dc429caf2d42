"""SentryPeer's benchmark: ``python -m bench`` (or ``make bench``).

It starts the product itself (``bench.product``: the service tree ``python -m sentrypeer`` runs, plus
a request timer on the API site) on loopback ephemeral ports, drives it with its own sender
processes (``bench.sender``), and prints one table with every figure of issue 7 and the command
that reproduces each; ``--json`` prints the same as JSON. ``--short`` runs every phase for a few
seconds at low rates (CI runs it so that the benchmark cannot rot; it asserts no target).

Modules:

- ``bench.__main__``: the runner (phases, measurements, the table).
- ``bench.product``: the product with its observation hooks.
- ``bench.bare_reader``: a Twisted UDP reader doing nothing per datagram, the reference for what
  Python on this machine can receive.
- ``bench.sender``: one paced (or unpaced) UDP sender process of distinct OPTIONS/INVITE probes
  from many loopback source addresses.
- ``bench.builddb``: builds the million-event database for the API figures with bulk SQL on the
  product's schema, then upgrades it with the product's own migration.
- ``bench.probes``: the probe messages, shared by the senders and the TCP phases.

Everything is bounded in count and time and talks to 127.0.0.0/8 only.
"""
