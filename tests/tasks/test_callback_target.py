"""The SSRF guard: which callback URLs and addresses are allowed, at submission and on connect."""

import ipaddress
import socket

import pytest

from stemgen_settings import load_settings
from tasks.callback_target import (
    CallbackHostUnresolvable,
    CallbackPolicy,
    UnsafeCallbackURL,
    check_url,
    guarded_session,
)
from tasks.callbacks import CallbackError, CallbackRefused, CallbackRetryableError, post_callback
from tests.harness import CallbackReceiver, free_port

STRICT = CallbackPolicy()
LOOPBACK = CallbackPolicy(allow_loopback=True)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "0.0.0.0", "::", "fe80::1", "fd00::1", "224.0.0.1", "ff02::1", "255.255.255.255",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1",
    "fe80::1%eth0", "192.0.2.1", "198.18.0.1",
])
def test_non_public_addresses_are_refused(address):
    assert STRICT.refusal(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert STRICT.refusal(address) is None


def test_loopback_only_when_allowed():
    assert STRICT.refusal("127.0.0.1") and STRICT.refusal("::1")
    assert LOOPBACK.refusal("127.0.0.1") is None and LOOPBACK.refusal("::1") is None
    assert LOOPBACK.refusal("10.0.0.1")  # loopback does not open private ranges


def test_allowed_networks_and_hosts_from_settings():
    settings = load_settings(callback_allowed_networks="10.20.0.0/16, fd00::/8",
                             callback_allowed_hosts="backend.internal,*.svc.cluster.local")
    policy = CallbackPolicy.from_settings(settings)
    assert policy.refusal("10.20.3.4") is None and policy.refusal("fd00::5") is None
    assert policy.refusal("10.21.0.1") and policy.refusal("127.0.0.1")
    assert policy.host_trusted("backend.internal") and policy.host_trusted("BACKEND.internal.")
    assert policy.host_trusted("api.ns.svc.cluster.local")
    assert not policy.host_trusted("svc.cluster.local.evil.com")
    assert not policy.host_trusted("backend.internal.evil.com")
    # A trusted host is not even resolved.
    assert check_url("http://backend.internal:8080/cb", policy) == []


def test_invalid_network_setting_is_an_error():
    with pytest.raises(ValueError):
        CallbackPolicy.from_settings(load_settings(callback_allowed_networks="10.0.0.0/33"))


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "http:///nohost",
    "http://127.0.0.1:6379/", "http://localhost/cb", "http://[::1]/cb", "http://169.254.169.254/latest",
    "http://2130706433/", "http://0x7f.1/", "http://0/", "http://10.0.0.1/", "http://host:99999/",
])
def test_unsafe_urls_are_refused(url):
    with pytest.raises(UnsafeCallbackURL):
        check_url(url, STRICT)


def test_loopback_url_with_allow(monkeypatch):
    assert check_url("http://127.0.0.1:9/cb", LOOPBACK) == ["127.0.0.1"]


def test_canonical_addresses_are_not_looked_up(monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("getaddrinfo called for an address literal")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    assert check_url("http://127.0.0.1:9/cb", LOOPBACK) == ["127.0.0.1"]
    assert check_url("https://[2606:4700::1111]/cb", STRICT) == ["2606:4700::1111"]
    with pytest.raises(UnsafeCallbackURL):
        check_url("http://10.0.0.1/cb", STRICT)
    # Other spellings of an address (2130706433, 0x7f.1) are left to getaddrinfo, and refused
    # when they resolve to a refused address (test_unsafe_urls_are_refused).
    with pytest.raises(AssertionError):
        check_url("http://2130706433/", STRICT)


def test_every_resolved_address_must_pass(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(UnsafeCallbackURL, match="10.0.0.7"):
        check_url("https://mixed.example.com/cb", STRICT)


def test_unresolvable_host():
    with pytest.raises(CallbackHostUnresolvable):
        check_url("https://no-such-host.invalid/cb", STRICT)


def test_delivery_refuses_loopback_without_allow():
    with CallbackReceiver() as receiver:
        with pytest.raises(CallbackRefused):
            post_callback(receiver.url, {"a": 1}, event_id="e", policy=STRICT)
        assert receiver.received.empty()  # nothing was sent
        assert post_callback(receiver.url, {"a": 1}, event_id="e", policy=LOOPBACK) == 200


def test_dns_rebinding_is_caught_on_connect(monkeypatch):
    """The name resolves to a public address when checked, to loopback when connected."""
    real = socket.getaddrinfo
    calls = []

    def rebinding_getaddrinfo(host, port, *args, **kwargs):
        if host == "rebind.example.com":
            calls.append(host)
            address = "93.184.216.34" if len(calls) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    with CallbackReceiver() as receiver:
        url = receiver.url.replace("127.0.0.1", "rebind.example.com")
        with pytest.raises(CallbackRefused, match="127.0.0.1"):
            post_callback(url, {"a": 1}, event_id="e", policy=STRICT)
        assert len(calls) == 2 and receiver.received.empty()


def test_guarded_session_ignores_proxy_environment(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    with CallbackReceiver() as receiver:
        session = guarded_session(LOOPBACK)
        assert session.trust_env is False
        assert session.post(receiver.url, data=b"{}", timeout=5).status_code == 200


def test_redirects_are_not_followed():
    with CallbackReceiver(status_codes=[307]) as receiver:
        with pytest.raises(CallbackError) as info:
            post_callback(receiver.url, {"a": 1}, event_id="e", policy=LOOPBACK)
        assert not isinstance(info.value, CallbackRetryableError)
        assert receiver.received.qsize() == 1


def test_read_timeout_is_retryable():
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cb"
        with pytest.raises(CallbackRetryableError, match="Timeout"):
            post_callback(url, {"a": 1}, event_id="e", policy=LOOPBACK,
                          timeout_seconds=0.5, connect_timeout_seconds=0.5)


def test_refused_connection_is_retryable():
    with pytest.raises(CallbackRetryableError):
        post_callback(f"http://127.0.0.1:{free_port()}/cb", {"a": 1}, event_id="e", policy=LOOPBACK,
                      timeout_seconds=2)
