"""TLS on the standard library's ``ssl.SSLObject``: server contexts and the Twisted layer.

``contexts.py`` turns a plain record (certificate, key, chain, client CAs, ALPN, minimum
version) into an ``ssl.SSLContext``; ``layer.py`` is the protocol wrapper that speaks TLS
with it on memory BIOs under any Twisted transport. The room imports nothing of ours, so
the proxy and the agent can both use it.
"""
