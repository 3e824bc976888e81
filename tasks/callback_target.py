"""Which callback URLs stemgen may POST to: the SSRF guard.

A callback URL comes from the caller, so without a guard stemgen would POST wherever it is told: to
a cloud metadata service (169.254.169.254), to Redis on localhost, to anything inside the network.
The rules (as in OWASP's SSRF prevention cheat sheet):

- only ``http`` and ``https`` URLs with a host;
- every address the host resolves to must be public (``ipaddress``: global, not multicast), unless
  the host is allow-listed (``CALLBACK_ALLOWED_HOSTS``), the address lies in an allow-listed network
  (``CALLBACK_ALLOWED_NETWORKS``), or it is loopback and ``CALLBACK_ALLOW_LOOPBACK`` is set;
- checked at submission (``check_url``: a 422 naming ``callback_url``) and again at delivery, on
  the socket actually connected (``guarded_session``), so a name that resolved to a public address
  at submission and resolves to a private one later (DNS rebinding) is still refused;
- no environment proxies (the guard would see the proxy's address), and redirects are not followed
  (tasks.callbacks): a redirect could point anywhere.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: NAT64's well-known prefix (RFC 6052): 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through a gateway.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeCallbackURL(ValueError):
    """The callback URL is refused: wrong scheme, no host, or an address the policy does not allow."""


class CallbackHostUnresolvable(ValueError):
    """The callback host does not resolve (now); at delivery time this is worth retrying."""


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip.sixtofour:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


@dataclass(frozen=True)
class CallbackPolicy:
    """Where callbacks may go (see the module doc).

    Args:
        allowed_hosts: lower-case host names, exact or ``*.suffix``, trusted whatever they resolve to.
        allowed_networks: networks that may be called although they are not public.
        allow_loopback: allow 127.0.0.0/8 and ::1.
    """

    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False

    @classmethod
    def from_settings(cls, settings) -> "CallbackPolicy":
        """Policy from ``CALLBACK_ALLOWED_HOSTS``, ``CALLBACK_ALLOWED_NETWORKS``, ``CALLBACK_ALLOW_LOOPBACK``.

        Raises:
            ValueError: an allowed network is not a valid CIDR.
        """
        hosts = tuple(h.lower().rstrip(".") for h in settings.split_list(settings.callback_allowed_hosts))
        networks = tuple(ipaddress.ip_network(n, strict=False)
                         for n in settings.split_list(settings.callback_allowed_networks))
        return cls(hosts, networks, bool(settings.callback_allow_loopback))

    def host_trusted(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False

    def refusal(self, address: str) -> str | None:
        """Why ``address`` (an IP literal, as a socket reports it) may not be called; None if it may."""
        try:
            ip = _embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return "not an IP address"
        if any(ip in network for network in self.allowed_networks):
            return None
        if ip.is_loopback:
            return None if self.allow_loopback else "a loopback address (CALLBACK_ALLOW_LOOPBACK is off)"
        if ip.is_unspecified or ip.is_multicast or not ip.is_global:
            return "not a public address"
        return None


def resolve(host: str, port: int) -> list[str]:
    """Addresses ``host`` resolves to (for TCP).

    Raises:
        CallbackHostUnresolvable: DNS answered no address (or failed).
        UnsafeCallbackURL: the host is not a valid name.
    """
    try:  # an address in canonical form is its own answer (no look-up, no resolver thread)
        if str(ipaddress.ip_address(host)) == host:
            return [host]
    except ValueError:  # a name, or a non-canonical form (127.1, 0x7f.1): getaddrinfo decides
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CallbackHostUnresolvable(f"callback host {host!r} does not resolve: {exc.strerror}") from exc
    except (UnicodeError, ValueError) as exc:  # IDNA-invalid label, NUL byte
        raise UnsafeCallbackURL(f"callback host {host!r} is not a valid host name") from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


def check_url(url: str, policy: CallbackPolicy) -> list[str]:
    """Check a callback URL against ``policy`` and return the addresses it resolves to now
    (empty for an allow-listed host, which is not resolved).

    Raises:
        UnsafeCallbackURL: refused (scheme, host, or an address).
        CallbackHostUnresolvable: the host does not resolve.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeCallbackURL(f"invalid callback URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeCallbackURL("the callback URL must be http or https")
    host = parts.hostname
    if not host:
        raise UnsafeCallbackURL("the callback URL has no host")
    if policy.host_trusted(host):
        return []
    addresses = resolve(host, port or (443 if parts.scheme == "https" else 80))
    for address in addresses:
        reason = policy.refusal(address)
        if reason:
            raise UnsafeCallbackURL(f"callback host {host!r} resolves to {address}: {reason}")
    return addresses


class _PeerCheck:
    """Connection mixin: refuse the socket when the address actually connected is not allowed."""

    policy: CallbackPolicy

    def _new_conn(self):
        sock = super()._new_conn()
        if not self.policy.host_trusted(self.host):
            peer = sock.getpeername()[0]
            reason = self.policy.refusal(peer)
            if reason:
                sock.close()
                raise UnsafeCallbackURL(f"callback host {self.host!r} connected to {peer}: {reason}")
        return sock


class _GuardedAdapter(HTTPAdapter):
    """requests adapter whose connections check the peer address before anything is sent."""

    def __init__(self, policy: CallbackPolicy):
        self._policy = policy  # before super().__init__, which builds the pool manager
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        extra = {"policy": self._policy}
        http = type("GuardedHTTPConnection", (_PeerCheck, HTTPConnection), extra)
        https = type("GuardedHTTPSConnection", (_PeerCheck, HTTPSConnection), extra)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }


def guarded_session(policy: CallbackPolicy) -> requests.Session:
    """A requests session that only connects where ``policy`` allows (raises UnsafeCallbackURL)
    and ignores proxy environment variables."""
    session = requests.Session()
    session.trust_env = False
    adapter = _GuardedAdapter(policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
