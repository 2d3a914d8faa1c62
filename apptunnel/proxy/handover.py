"""Giving a connection to another protocol mid-stream: the edge after the first head, TCP
access after an HTTP app's upgrade.

The protocol that read the start of a connection steps aside: the transport is re-pointed
at the new owner, so later bytes skip the old one, and the owner gets the bytes read so
far. A TCP transport dispatches through ``.protocol``, a TLS (or any ProtocolWrapper)
layer through ``.wrappedProtocol``; where neither points at the old protocol, the old one
must keep forwarding ``dataReceived``/``connectionLost`` itself.
"""

from __future__ import annotations

from twisted.internet.interfaces import IProtocol, ITransport


def hand_over(transport: ITransport, old: IProtocol, new: IProtocol, early: bytes = b"") -> bool:
    """Make ``new`` the owner of ``transport`` and give it ``early``; True when the
    transport now calls ``new`` directly (else ``old`` must forward)."""
    repointed = False
    if getattr(transport, "protocol", None) is old:
        transport.protocol = new
        repointed = True
    if getattr(transport, "wrappedProtocol", None) is old:
        transport.wrappedProtocol = new
        repointed = True
    new.makeConnection(transport)
    if early:
        new.dataReceived(early)
    return repointed
