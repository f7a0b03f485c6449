"""A fleet of proxies acting as one: node discovery and registration (etcd, DNS), limits shared in Redis.

Everything here needs the ``fleet`` extra (``pip install 'pitcher-rpc[fleet]'``)
only when a configuration names etcd or Redis; a single proxy imports none of it.
"""
