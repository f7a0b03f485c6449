"""A fleet of proxies acting as one: nodes found in etcd or DNS, limits shared in Redis.

Everything here needs the ``fleet`` extra (``pip install 'pitcher-rpc[fleet]'``)
only when a configuration names etcd or Redis; a single proxy imports none of it.
"""
