"""ZeroMQ endpoints and IPv6.

libzmq opens IPv4 sockets only unless a socket has its IPV6 option set: without it,
``tcp://[::1]:5556`` fails to bind or connect with "No such device". With it, a wildcard
bind (``tcp://*:5556``) takes IPv6 and IPv4 both, but an IPv4 address is reported back
as ``[::ffff:127.0.0.1]`` (which a peer without IPv6 cannot use), so lavacore sets it
where the address needs it, or where the configuration asks for it.
"""


def needs_ipv6(url):
    """Does ``url`` name an IPv6 address (``tcp://[::1]:5556``, also in libzmq's
    ``tcp://SOURCE;DESTINATION`` form)?"""
    if not url:
        return False
    _, sep, rest = str(url).partition("://")
    if not sep:
        return False
    return any(part.startswith("[") for part in rest.split(";"))
